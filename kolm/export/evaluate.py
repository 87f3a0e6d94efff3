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
from kolm.model.loss import EvalTotals, token_stats


def load_model(source: str, tag: str | None = None):
    """(model, tokenizer directory, seq_len or None) from an HF directory or a checkpoint."""
    p = Path(source)
    if (p / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from kolm.export.convert import EXPORT_INFO

        info = json.loads((p / EXPORT_INFO).read_text()) if (p / EXPORT_INFO).is_file() else {}
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval(), p, info.get("seq_len")
    from kolm.export.convert import consolidated_state_dict, exported_config, model_from_state_dict, resolve_checkpoint

    ckpt = resolve_checkpoint(source, tag)
    model = model_from_state_dict(exported_config(ckpt), consolidated_state_dict(ckpt))
    return model, Path(ckpt.marker["tokenizer"]), ckpt.marker.get("seq_len")


@dataclass(frozen=True)
class EvalReport:
    split: str
    seq_len: int
    windows: int
    eval_loss: float
    eval_perplexity: float
    eval_accuracy: float
    eval_tokens: int

    def __str__(self) -> str:
        return (f"{self.split}: loss {self.eval_loss:.4f}, perplexity {self.eval_perplexity:.3f}, next-token "
                f"accuracy {self.eval_accuracy:.4f} over {self.eval_tokens} tokens ({self.windows} windows of "
                f"{self.seq_len})")


def evaluate_model(source: str, data: str, split: str = "valid", seq_len: int | None = None,
                   micro_batch: int = 8, max_samples: int | None = None, tag: str | None = None) -> EvalReport:
    """Score a model on a shard split with the metric code training uses."""
    model, tok_dir, trained_len = load_model(source, tag)
    shards = load_shard_dir(data)
    check_tokenizer(shards, load_tokenizer_info(tok_dir).fingerprint(), str(tok_dir))
    seq_len = seq_len or trained_len or 512
    if seq_len > model.config.max_position_embeddings:
        raise KolmError(f"--seq-len {seq_len} exceeds the model's {model.config.max_position_embeddings} positions")
    dataset = PackedDataset(data, split, seq_len)
    totals = EvalTotals()
    with torch.no_grad():
        for batch in dataset.eval_batches(micro_batch, 0, 1, max_samples):
            x = torch.from_numpy(batch)
            totals.add(*token_stats(model(input_ids=x[:, :-1]).logits, x[:, 1:]))
    windows = min(max_samples or dataset.num_samples, dataset.num_samples)
    return EvalReport(split, seq_len, windows, **totals.summary())
