"""`kolm eval`: loss, perplexity and next-token accuracy of a model on a shard split, for a
converted Hugging Face directory or a kolm checkpoint, with the metric code training uses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kolm.data.manifest import check_tokenizer, load_shard_dir
from kolm.data.packed import PackedDataset
from kolm.data.tokenizer import load_tokenizer_info
from kolm.errors import KolmError
from kolm.model.documents import document_inputs
from kolm.model.loss import EvalTotals, token_stats


@dataclass
class LoadedModel:
    model: object  # a PhiForCausalLM in fp32, in eval mode
    tokenizer: Path
    seq_len: int | None  # what it was trained with, where known
    attention: str  # causal | document, what it was trained with ("causal" where unknown)


def load_model(source: str, tag: str | None = None) -> LoadedModel:
    """A converted Hugging Face directory, or a checkpoint (run directory, tag), for evaluation."""
    p = Path(source)
    if (p / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from kolm.export.convert import EXPORT_INFO

        info = json.loads((p / EXPORT_INFO).read_text()) if (p / EXPORT_INFO).is_file() else {}
        trained = json.loads((p / "config.json").read_text()).get("kolm") or {}
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
        return LoadedModel(model, p, info.get("seq_len"), trained.get("attention", "causal"))
    from kolm.export.convert import exported_config, model_from_state_dict
    from kolm.train.checkpoint import consolidated_state_dict, resolve_checkpoint

    ckpt = resolve_checkpoint(source, tag)
    model = model_from_state_dict(exported_config(ckpt), consolidated_state_dict(ckpt))
    return LoadedModel(model, Path(ckpt.marker["tokenizer"]), ckpt.marker.get("seq_len"),
                       ckpt.marker.get("run_config", {}).get("attention", "causal"))


@dataclass(frozen=True)
class EvalReport:
    split: str
    seq_len: int
    windows: int
    attention: str
    eval_loss: float
    eval_perplexity: float
    eval_accuracy: float
    eval_tokens: int

    def __str__(self) -> str:
        return (f"{self.split}: loss {self.eval_loss:.4f}, perplexity {self.eval_perplexity:.3f}, next-token "
                f"accuracy {self.eval_accuracy:.4f} over {self.eval_tokens} tokens ({self.windows} windows of "
                f"{self.seq_len}, {self.attention} attention)")


def evaluate_model(source: str, data: str, split: str = "valid", seq_len: int | None = None,
                   micro_batch: int = 8, max_samples: int | None = None, tag: str | None = None,
                   attention: str | None = None) -> EvalReport:
    """Score a model on a shard split with the metric code training uses (``attention``: as the
    model was trained, unless given)."""
    check_eval_options(micro_batch, max_samples)
    loaded = load_model(source, tag)
    tok = load_tokenizer_info(loaded.tokenizer)
    check_tokenizer(load_shard_dir(data), tok.fingerprint(), str(loaded.tokenizer))
    seq_len = seq_len or loaded.seq_len or 512
    attention = attention or loaded.attention
    if seq_len > loaded.model.config.max_position_embeddings:
        raise KolmError(f"--seq-len {seq_len} exceeds the model's {loaded.model.config.max_position_embeddings} "
                        "positions")
    dataset = PackedDataset(data, split, seq_len)
    totals = EvalTotals()
    with torch.no_grad():
        for batch, _ in dataset.eval_batches(micro_batch, 0, 1, max_samples):  # one rank: never padding
            x = torch.from_numpy(batch)
            kw = document_inputs(x[:, :-1], tok.eos_id, "sdpa", torch.float32) if attention == "document" else {}
            totals.add(*token_stats(loaded.model(input_ids=x[:, :-1], use_cache=False, **kw).logits, x[:, 1:]))
    windows = min(max_samples or dataset.num_samples, dataset.num_samples)
    return EvalReport(split, seq_len, windows, attention, **totals.summary())


def check_eval_options(micro_batch: int, max_samples: int | None) -> None:
    """Refuse a micro batch or a window count that cannot score a single token."""
    if micro_batch < 1:
        raise KolmError(f"--micro-batch must be at least 1 (windows per forward pass), got {micro_batch}")
    if max_samples is not None and max_samples < 1:
        raise KolmError(f"--max-samples must be at least 1 window, got {max_samples}; leave it out to evaluate "
                        "every window of the split")
