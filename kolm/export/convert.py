"""`kolm convert`: a DeepSpeed ZeRO checkpoint to a Hugging Face model directory, verified.

Consolidation is DeepSpeed's own (`deepspeed.utils.zero_to_fp32`, lazily memory-mapped; a stage-0
checkpoint is read from rank 0's file, kolm.train.checkpoint). The
output is written into a temporary directory beside the target and renamed at the end, so an
interrupted conversion leaves nothing behind. Peak memory is about twice the fp32 model: the
consolidated fp32 weights, plus the exported model loaded back for verification.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kolm.data.tokenizer import load_tokenizer_info
from kolm.errors import KolmError
from kolm.export.average import average_weights, check_same_run, select_checkpoints
from kolm.export.generate import SEED_PROMPT, GenerationSettings
from kolm.files import refuse_output_over_sources, swap_in_directory
from kolm.log import say
from kolm.model.phi import phi_from_state_dict
from kolm.model.presets import padded_vocab, untie_padding
from kolm.train import checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_from_state_dict(config_dict: dict, state: dict[str, torch.Tensor]):
    """A PhiForCausalLM whose parameters are the given tensors (no copy)."""
    from transformers import PhiConfig

    config = PhiConfig(**{k: v for k, v in config_dict.items() if k not in ("transformers_version", "kolm")})
    try:
        return phi_from_state_dict(config, state).eval()
    except KolmError as e:
        raise KolmError(f"checkpoint {e}") from None


def check_tokenizer_fits(tokenizer_dir: Path, config_dict: dict, exact_rows: bool = True,
                         vocab_multiple: int = 64) -> None:
    """The tokenizer must fit the rows; a model kolm sized itself (no init_from) has exactly its
    tokenizer's vocabulary rounded up to the run's ``vocab_multiple``."""
    info = load_tokenizer_info(tokenizer_dir)
    rows = config_dict["vocab_size"]
    if info.vocab_size > rows or (exact_rows and padded_vocab(info.vocab_size, vocab_multiple) != rows):
        raise KolmError(
            f"{tokenizer_dir}: vocabulary of {info.vocab_size} tokens does not match the model's {rows} "
            "embedding rows; pass the tokenizer the model was trained with (--tokenizer)"
        )


def prompt_ids(tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return torch.tensor([tok(SEED_PROMPT)["input_ids"]])


@dataclass(frozen=True)
class ConversionReport:
    checkpoint: str
    out: str
    dtype: str
    max_logit_error: float

    def __str__(self) -> str:
        verified = f"verified: max logit difference {self.max_logit_error:.2e} against the consolidated fp32 weights"
        return f"model written to {self.out} from {self.checkpoint} ({self.dtype}); {verified}"


def convert(src: str, out: str, tag: str | None = None, best: bool = False, dtype: str = "bf16",
            tokenizer: str | None = None, force: bool = False, max_shard_size: str = "2GB", average: int = 0,
            tags: list[str] | None = None) -> ConversionReport:
    """Convert a checkpoint (or the mean of several: ``average`` newest, or ``tags``) into a verified
    Hugging Face directory at ``out``."""
    if dtype not in DTYPES:
        raise KolmError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    out_path = Path(out)
    _remove_stale_temporaries(out_path)
    if out_path.exists() and not force:
        raise KolmError(f"{out_path} already exists; choose another --out or pass --force to replace it")
    ckpts = _checkpoints(src, tag, best, average, tags)
    ckpt, averaging = ckpts[0], bool(average or tags)
    config_dict = {**exported_config(ckpt), "kolm": training_settings(ckpt, ckpts if averaging else None)}
    tok_dir = Path(tokenizer or ckpt.marker["tokenizer"])
    refuse_output_over_sources(out_path, *(c.path for c in ckpts), tok_dir)
    check_tokenizer_fits(tok_dir, config_dict, exact_rows=not ckpt.marker.get("init_from"),
                         vocab_multiple=ckpt.marker.get("run_config", {}).get("vocab_multiple", 64))
    say(f"converting the average of {', '.join(c.tag for c in ckpts)} ({dtype})" if averaging else
        f"converting {ckpt.path} ({dtype})")
    state = average_weights(ckpts) if averaging else checkpoint.consolidated_state_dict(ckpt)
    model = model_from_state_dict(config_dict, state)
    del state
    ids = prompt_ids(tok_dir)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-{os.getpid()}-", dir=out_path.parent))
    try:
        _write(model.to(DTYPES[dtype]), tok_dir, tmp, max_shard_size, config_dict)
        info = {**_export_info(ckpt, dtype), **({"averaged": [str(c.path) for c in ckpts]} if averaging else {})}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        del model
        max_err = verify_export(tmp, ids, reference, dtype)
        os.chmod(tmp, 0o755)
        swap_in_directory(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    source = f"the mean of {', '.join(c.tag for c in ckpts)} in {ckpt.path.parent}" if averaging else str(ckpt.path)
    return ConversionReport(source, str(out_path), dtype, max_err)


def _checkpoints(src: str, tag: str | None, best: bool, average: int, tags: list[str] | None) -> list:
    """The checkpoint to convert, or those to average (newest first, checked to be of one run)."""
    if not (average or tags):
        return [checkpoint.resolve_checkpoint(src, tag, best)]
    if tag or best or (average and tags):
        raise KolmError("--average and --tags pick the checkpoints themselves: use one of them, without --tag or "
                        "--best")
    ckpts = select_checkpoints(src, average, tags)
    check_same_run(ckpts)
    return ckpts


def training_settings(ckpt: checkpoint.Checkpoint, averaged: list | None = None) -> dict:
    """How the model was trained, kept in config.json under "kolm" for the record (and for `kolm
    eval`): settings that are not part of the architecture, so loading never depends on them."""
    run = ckpt.marker.get("run_config", {})
    settings = {"attn_implementation": run.get("attn_implementation", "sdpa"),
                "attention": run.get("attention", "causal"), "seq_len": ckpt.marker.get("seq_len")}
    if ckpt.marker.get("base_vocab_size"):  # a model grown by `kolm model expand`: which rows are new
        settings["base_vocab_size"] = ckpt.marker["base_vocab_size"]
    if averaged:  # the element-wise mean of these checkpoints' fp32 weights
        settings["averaged_checkpoints"] = [c.tag for c in averaged]
    return settings


def exported_config(ckpt: checkpoint.Checkpoint) -> dict:
    """The model config a checkpoint's marker records, as the exported config.json will hold it."""
    config_dict = ckpt.marker.get("model_config")
    if not config_dict:
        raise KolmError(f"{ckpt.path}: the completion marker has no model config (not written by kolm train)")
    config_dict, untied = untie_padding(config_dict)
    if untied:
        say(f"{ckpt.tag} was trained with pad_token_id = EOS (its EOS embedding is the zero row); "
            "config.json is written without a padding index, generation_config.json pads with EOS")
    return config_dict


EXPORT_INFO = "kolm_export.json"


def _export_info(ckpt: checkpoint.Checkpoint, dtype: str) -> dict:
    """Where an exported model came from (kolm eval reads its seq_len)."""
    keys = ("step", "seq_len", "consumed_samples", "eval_loss", "data_fingerprint", "zero_stage", "world_size")
    return {"checkpoint": str(ckpt.path), "dtype": dtype, **{k: ckpt.marker.get(k) for k in keys}}


def _remove_stale_temporaries(out: Path) -> None:
    """Clean up after a conversion to the same target that was killed (its process is gone):
    remove its half-written model, and put back the model it was replacing if it got no further."""
    for left in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, rest = left.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(left, out)
            say(f"restored {out} (an interrupted --force conversion had set it aside)")
        else:
            shutil.rmtree(left, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(model, tok_dir: Path, out: Path, max_shard_size: str, config_dict: dict) -> None:
    from transformers import GenerationConfig

    model.config.dtype = model.dtype
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    _complete_config_json(out / "config.json", config_dict)
    for f in out.iterdir():
        f.chmod(0o644)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, out / name)
    _pad_on_the_left(out / "tokenizer_config.json")
    eos = model.config.eos_token_id
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=eos,
                     **GenerationSettings().generation_config()).save_pretrained(str(out))


def _pad_on_the_left(path: Path) -> None:
    """Batched prompts are padded (with EOS) on the left, so each one's last token is its own and
    generation continues every prompt as it would alone."""
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        config["padding_side"] = "left"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _complete_config_json(path: Path, config_dict: dict) -> None:
    """Add back fields the installed transformers folds away (top-level rope_theta and
    partial_rotary_factor, which older releases read), so every field is explicit."""
    written = json.loads(path.read_text(encoding="utf-8"))
    for key, value in config_dict.items():
        written.setdefault(key, value)
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify_export(out: Path, ids: torch.Tensor, reference: torch.Tensor, dtype: str) -> float:
    """Load the written directory with transformers and compare its logits to the fp32 weights'."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.float()
    # bf16 export rounds every weight to 8 mantissa bits; fp32 export must match exactly.
    scale = reference.abs().max().item()
    tol = {"bf16": (2e-2, 2e-2 * scale), "fp32": (1e-5, 1e-5 * max(scale, 1.0))}[dtype]
    try:
        torch.testing.assert_close(logits, reference, rtol=tol[0], atol=tol[1])
    except AssertionError as e:
        raise KolmError(f"verification failed: the exported model's logits differ from the checkpoint's:\n{e}") from e
    return float((logits - reference).abs().max())
