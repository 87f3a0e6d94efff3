"""Byte-level BPE tokenizers: training from a corpus stream, loading, fingerprinting."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kolm.data.clean_config import PII_TOKENS
from kolm.data.corpus import Decoder, check_documents, find_inputs, iter_chunks, plan_units
from kolm.data.jobs import check_at_least, check_out_dir
from kolm.errors import KolmError
from kolm.files import refuse_output_over_sources, sha256_file

EOS = "<|endoftext|>"
MIN_VOCAB = 512
HOLDOUT_EVERY = 50
HOLDOUT_MAX_CHARS = 2_000_000


@dataclass(frozen=True)
class TokenizerInfo:
    """What shards and models must agree on: the tokenizer file's hash, vocabulary and EOS."""

    path: str
    sha256: str
    vocab_size: int
    eos_id: int

    def fingerprint(self) -> dict:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def load_tokenizer_info(directory: str | os.PathLike) -> TokenizerInfo:
    """Read a tokenizer directory (Hugging Face format) and check it is usable for sharding."""
    from tokenizers import Tokenizer

    d = Path(directory)
    tok_file = d / "tokenizer.json"
    if not tok_file.is_file():
        raise KolmError(
            f"{d}: no tokenizer.json; train one with `kolm tokenizer train --input ... --out {d}`"
        )
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        raise KolmError(f"{tok_file}: cannot be loaded as a tokenizer ({e})") from e
    eos = _eos_token(d)
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise KolmError(f"{d}: end-of-text token {eos!r} is not in the vocabulary")
    return TokenizerInfo(str(d), sha256_file(tok_file), tok.get_vocab_size(True), eos_id)


def _eos_token(d: Path) -> str:
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return EOS
    value = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token") or EOS
    return value["content"] if isinstance(value, dict) else value


def _is_holdout(text: str) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"kolm-tok").digest()
    return int.from_bytes(digest, "little") % HOLDOUT_EVERY == 0


def iter_documents(inputs: list[str], text_field: str, skip_malformed: bool, stats: Counter,
                   documents: str = "lines") -> Iterator[str]:
    """Stream normalized documents from corpus inputs (long ones arrive in pieces); ``documents``
    says how plain text holds them (lines, paragraphs or files)."""
    files = find_inputs(inputs)
    check_documents(documents, files)
    decoder = Decoder(text_field, skip_malformed)
    for unit in plan_units(files, 1 << 62, documents):
        for chunk in iter_chunks(unit, chunk_docs=4096, chunk_bytes=1 << 22, piece_bytes=1 << 20, documents=documents):
            for i, record in enumerate(chunk.records):
                text = decoder.text(chunk, i, record, stats)
                if text:
                    yield text


@dataclass(frozen=True)
class TokenizerReport:
    """What `kolm tokenizer train` made, and how well it compresses held-back text."""

    out: str
    vocab_size: int
    documents: int
    heldout_documents: int
    chars_per_token: float
    repaired_utf8: int = 0
    malformed_skipped: int = 0

    def __str__(self) -> str:
        sample = (f"{self.heldout_documents} held-back documents" if self.heldout_documents
                  else "training text (corpus too small to hold any back)")
        return (f"tokenizer written to {self.out}: vocabulary {self.vocab_size}, trained on {self.documents} "
                f"documents\ncompression: {self.chars_per_token:.3f} characters per token on {sample}")


class TrainingStream:
    """The corpus as training text, holding back a deterministic ~2% to measure compression."""

    def __init__(self, inputs: list[str], text_field: str, skip_malformed: bool, max_documents: int | None,
                 documents: str = "lines"):
        self.inputs, self.text_field, self.skip_malformed = inputs, text_field, skip_malformed
        self.documents = documents
        self.max_documents = max_documents
        self.stats: Counter = Counter()
        self.holdout: list[str] = []
        self.holdout_chars = 0
        self.used = 0
        self.pii_tokens: set[str] = set()  # kolm clean's PII masks seen in the corpus

    def __iter__(self) -> Iterator[str]:
        for text in iter_documents(self.inputs, self.text_field, self.skip_malformed, self.stats, self.documents):
            if self.max_documents is not None and self.used >= self.max_documents:
                return
            if "<|" in text:
                text = self._take_pii_tokens(text)
            if _is_holdout(text) and self.holdout_chars < HOLDOUT_MAX_CHARS:
                self.holdout.append(text)
                self.holdout_chars += len(text)
                continue
            self.used += 1
            yield text

    def _take_pii_tokens(self, text: str) -> str:
        """Note the PII masks in ``text`` and train on the text without them: they become special
        tokens, so BPE should not spend merges on their pieces."""
        for token in PII_TOKENS.values():
            if token in text:
                self.pii_tokens.add(token)
                text = text.replace(token, " ")
        return text

    def sample(self) -> list[str]:
        """The held-back text, or (for a tiny corpus) the first documents."""
        docs = iter_documents(self.inputs, self.text_field, True, Counter(), self.documents)
        return self.holdout or [t for t, _ in zip(docs, range(1000))]


def _bpe(vocab_size: int, min_frequency: int, progress: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    return tok, trainer


def train_tokenizer(
    inputs: list[str],
    out: str | os.PathLike,
    vocab_size: int,
    min_frequency: int = 2,
    text_field: str = "text",
    skip_malformed: bool = False,
    max_documents: int | None = None,
    force: bool = False,
    progress: bool = True,
    documents: str = "lines",
) -> TokenizerReport:
    """Train a byte-level BPE with ``<|endoftext|>`` as BOS/EOS/PAD and save it to ``out``."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    if vocab_size < MIN_VOCAB:
        raise KolmError(f"--vocab-size {vocab_size} is too small: use at least {MIN_VOCAB}")
    check_at_least("--min-frequency", min_frequency)
    check_at_least("--max-documents", max_documents)
    refuse_existing_output(out, force, *inputs)
    stream = TrainingStream(inputs, text_field, skip_malformed, max_documents, documents)
    tok, trainer = _bpe(vocab_size, min_frequency, progress)
    tok.train_from_iterator(iter(stream), trainer=trainer)
    if stream.used == 0:
        raise KolmError("the corpus holds no text: every line was empty or skipped")
    if stream.pii_tokens:
        tok.add_special_tokens(sorted(stream.pii_tokens))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                      unk_token=EOS, additional_special_tokens=sorted(stream.pii_tokens))
    write_dir_atomically(out, force, lambda tmp: wrapped.save_pretrained(str(tmp)))
    sample = stream.sample()
    tokens = sum(len(e.ids) for e in tok.encode_batch(sample, add_special_tokens=False))
    return TokenizerReport(str(out), tok.get_vocab_size(True), stream.used, len(stream.holdout),
                           sum(len(t) for t in sample) / max(tokens, 1), stream.stats["repaired_utf8"],
                           stream.stats["malformed_skipped"])


def refuse_existing_output(out: Path, force: bool, *sources: str | os.PathLike) -> None:
    """Stop before any work if ``out`` holds something that --force has not allowed us to replace, or
    if replacing it would delete one of the ``sources`` the command reads."""
    refuse_output_over_sources(out, *sources)
    check_out_dir(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise KolmError(f"{out} already exists and is not empty; choose another --out or pass --force")


def write_dir_atomically(out: Path, force: bool, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary directory beside ``out``, then rename it into place, so that
    ``out`` is either what it was or complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        if out.exists() and force:
            shutil.rmtree(out)
        elif out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
