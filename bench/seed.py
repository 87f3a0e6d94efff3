"""The seed as the benchmarks run it: the Hugging Face `Trainer` recipe kolm replaces. Every line of the
corpus is one sample (``tok(..., truncation=True)``), padded per batch by
``DataCollatorForLanguageModeling(mlm=False)``, and `PhiForCausalLM` is trained by ``transformers.Trainer``
on one process with the hyperparameters kept in ``recipes/phi-1_5-ko.yaml``: per-device batch 4 x gradient
accumulation 4, AdamW 5e-4, weight decay 0.1, 10,000 warmup steps, cosine, 2 epochs, clipping at 1.0."""

from __future__ import annotations

from pathlib import Path

import common

MICRO_BATCH, ACCUM = 4, 4  # the seed's per_device_train_batch_size, gradient_accumulation_steps
RECIPE = common.ROOT / "recipes" / "phi-1_5-ko.yaml"


def model_config(tok_dir: Path, model: str, seq_len: int, **overrides):
    """The exact PhiConfig kolm builds for this tokenizer and shape, so both sides train the same model."""
    from kolm.data.tokenizer import load_tokenizer_info
    from kolm.model.presets import build_config, get_shape, padded_vocab

    info = load_tokenizer_info(tok_dir)
    shape = get_shape(model, **overrides)
    return build_config(shape, padded_vocab(info.vocab_size), info.eos_id, info.eos_id,
                        max(seq_len, shape.max_position_embeddings))


def dataset(lines: list[str], tok, seq_len: int):
    """The seed's data: all lines in memory, one line = one sample, truncated at ``seq_len``."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": lines})
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=seq_len, return_overflowing_tokens=True),
                  batched=True, remove_columns=ds.column_names)


def tokenizer(tok_dir: Path):
    """The tokenizer as the seed loads it: padding with EOS (which the collator then leaves out of the loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.pad_token = tok.eos_token
    return tok


def recipe_hyperparameters() -> dict:
    """The seed's optimizer and schedule, read from the seed recipe, as `TrainingArguments` fields."""
    import yaml

    r = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    return {"per_device_train_batch_size": MICRO_BATCH, "gradient_accumulation_steps": ACCUM,
            "learning_rate": float(r["lr"]), "weight_decay": float(r["weight_decay"]),
            "adam_beta1": float(r["adam_beta1"]), "adam_beta2": float(r["adam_beta2"]),
            "adam_epsilon": float(r["adam_eps"]), "max_grad_norm": float(r["grad_clip"]),
            "warmup_steps": int(r["warmup_steps"]), "lr_scheduler_type": "cosine",
            "num_train_epochs": float(r["epochs"])}


def training_arguments(out: Path, **fields):
    """`TrainingArguments` for a CPU run of the seed with no checkpoints or reporting; ``fields`` win."""
    from transformers import TrainingArguments

    defaults = {"output_dir": str(out), "save_strategy": "no", "report_to": "none", "use_cpu": True,
                "dataloader_num_workers": 0, "disable_tqdm": True, "seed": 1234}
    return TrainingArguments(**{**defaults, **fields})


def require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401  (Trainer needs it)
    except ImportError:
        common.die("transformers.Trainer needs `accelerate`, which the `bench` extra brings: "
                   ".venv/bin/pip install -e '.[bench]'")
