"""`kolm model expand`: grow a Phi model's embedding rows to cover an extended tokenizer.

Rows of the base vocabulary are copied bitwise. Each new token's input row, LM-head row and bias
entry is the mean of those of its pieces: the base tokenizer's BPE applied to the new token's
byte string, i.e. exactly the tokens the base model saw for that text, so the new token starts
where its pieces' average meaning is. Rows past the tokenizer (padding up to `vocab_multiple`)
get a zero LM-head row and a bias of PAD_BIAS, so they take no probability from real tokens, and
a zero input row. The result is verified before it is put in place: on a text encoded with the
base tokenizer, the expanded model's logits over the old ids equal the base model's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kolm.data.tokenizer_extend import read_extension
from kolm.errors import KolmError
from kolm.files import refuse_output_over_sources, swap_in_directory
from kolm.log import say
from kolm.model.presets import padded_vocab
from kolm.model.pretrained import PretrainedPhi, read_pretrained

PAD_BIAS = -1e4  # exp(-1e4) is 0 in every float format: a padding row is never predicted
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "kolm_extension.json")
CHECK_TEXT = "The model keeps every old row. 대한민국은 민주공화국이다. def f(x): return x + 1"
ROWS = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight", "bias": "lm_head.bias"}


@dataclass(frozen=True)
class ExpansionReport:
    out: str
    base_vocab: int
    tokenizer_vocab: int
    rows_before: int
    rows_after: int
    max_logit_error: float

    def __str__(self) -> str:
        new = self.tokenizer_vocab - self.base_vocab
        return (f"model written to {self.out}: {self.rows_before} -> {self.rows_after} embedding rows; ids below "
                f"{self.base_vocab} copied bitwise, {new} new tokens as the mean of their base pieces, "
                f"{self.rows_after - self.tokenizer_vocab} padding rows\nverified: logits over the old ids "
                f"match the base model's (max difference {self.max_logit_error:.2e})")


def _load_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise KolmError(f"{directory}: no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise KolmError(f"{path}: cannot be loaded as a tokenizer ({e})") from e


def base_tokenizer_dir(model: PretrainedPhi, extended: Path) -> Path:
    """The tokenizer the base model was trained with: the model directory's own, else the one the
    extension recorded as its base."""
    if model.tokenizer_dir is not None:
        return model.tokenizer_dir
    base = (read_extension(extended) or {}).get("base")
    if base and (Path(base) / "tokenizer.json").is_file():
        return Path(base)
    raise KolmError(f"{model.path} holds no tokenizer.json and {extended} names no base tokenizer: copy the base "
                    "model's tokenizer files into its directory")


def check_extends(base, extended, base_dir: Path, ext_dir: Path) -> None:
    """Every base token keeps its string and id in the extended tokenizer."""
    ext_vocab = extended.get_vocab(with_added_tokens=True)
    moved = [(t, i) for t, i in base.get_vocab(with_added_tokens=True).items() if ext_vocab.get(t) != i]
    if moved:
        t, i = moved[0]
        raise KolmError(f"{ext_dir} does not extend {base_dir}: {len(moved)} base tokens changed id (e.g. {t!r}, id "
                        f"{i} in the base, {ext_vocab.get(t)} in the extension); make it with `kolm tokenizer extend "
                        f"--base {base_dir}`")


def pieces(base, token: str, is_added: bool) -> list[int]:
    """The base ids a new token's text falls into under the base tokenizer."""
    if is_added:
        return base.encode(token, add_special_tokens=False).ids
    return [t.id for t in base.model.tokenize(token)]


def grown_rows(state: dict[str, torch.Tensor], base, extended, base_len: int, rows: int) -> dict[str, torch.Tensor]:
    """The three row tensors at their new size: old rows copied, new rows the mean of their pieces,
    padding rows inert."""
    added = {t.content for t in extended.get_added_tokens_decoder().values()}
    old = {k: state[name] for k, name in ROWS.items() if name in state}
    out = {k: torch.zeros((rows, *t.shape[1:]), dtype=t.dtype) for k, t in old.items()}
    for k, t in old.items():
        out[k][:base_len] = t[:base_len]
    ext_len = extended.get_vocab_size(with_added_tokens=True)
    for new_id in range(base_len, ext_len):
        token = extended.id_to_token(new_id)
        ids = pieces(base, token, token in added)
        if not ids or max(ids) >= base_len:
            raise KolmError(f"new token {token!r} (id {new_id}) has no pieces in the base vocabulary")
        for k, t in old.items():
            out[k][new_id] = t[ids].float().mean(dim=0).to(t.dtype)
    if "bias" in out:
        out["bias"][ext_len:] = PAD_BIAS
    return {ROWS[k]: v for k, v in out.items()}


def expand_model(model_dir: str, tokenizer_dir: str, out: str, vocab_multiple: int = 64,
                 force: bool = False) -> ExpansionReport:
    """Write ``out``: the model of ``model_dir`` with rows for every token of ``tokenizer_dir``."""
    out_path, ext_dir = Path(out), Path(tokenizer_dir)
    refuse_output_over_sources(out_path, model_dir, tokenizer_dir)
    if out_path.exists() and not force:
        raise KolmError(f"{out_path} already exists; choose another --out or pass --force to replace it")
    if vocab_multiple < 1:
        raise KolmError(f"--vocab-multiple must be at least 1, got {vocab_multiple}")
    model = read_pretrained(model_dir)
    base_dir = base_tokenizer_dir(model, ext_dir)
    base, extended = _load_tokenizer(base_dir), _load_tokenizer(ext_dir)
    check_extends(base, extended, base_dir, ext_dir)
    base_len, ext_len = base.get_vocab_size(True), extended.get_vocab_size(True)
    if base_len > model.rows:
        raise KolmError(f"{base_dir} has {base_len} tokens but {model.path} only {model.rows} rows: not its tokenizer")
    rows = padded_vocab(ext_len, vocab_multiple)
    say(f"expanding {model.path}: {model.rows} -> {rows} rows for {ext_len - base_len} new tokens")
    state = model.state_dict()
    state.update(grown_rows(state, base, extended, base_len, rows))
    config = {**model.config, "vocab_size": rows,
              "kolm": {**(model.config.get("kolm") or {}), "base_vocab_size": base_len}}
    tmp = _temporary_beside(out_path)
    try:
        _write(tmp, model, config, state, ext_dir)
        error = verify_expansion(model.path, tmp, base_dir, base_len)
        swap_in_directory(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExpansionReport(str(out_path), base_len, ext_len, model.rows, rows, error)


def _temporary_beside(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _write(tmp: Path, model: PretrainedPhi, config: dict, state: dict[str, torch.Tensor], ext_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (model.path / "generation_config.json").is_file():
        shutil.copy(model.path / "generation_config.json", tmp / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (ext_dir / name).is_file():
            shutil.copy(ext_dir / name, tmp / name)
    os.chmod(tmp, 0o755)


def verify_expansion(base_dir: Path, expanded_dir: Path, tokenizer_dir: Path, base_len: int) -> float:
    """Logits over the old ids of both models on a base-tokenized text; they must agree."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([_load_tokenizer(tokenizer_dir).encode(CHECK_TEXT, add_special_tokens=False).ids])
    logits = []
    for directory in (base_dir, expanded_dir):
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits[..., :base_len].float())
        del model
    try:
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    except AssertionError as e:
        raise KolmError(f"verification failed: the expanded model's logits over the old ids differ:\n{e}") from e
    return float((logits[1] - logits[0]).abs().max())
