"""`kolm generate`: the seed's inference step, `transformers.pipeline` on a converted model.

The seed's prompt and generation settings live here, once: `kolm generate`'s defaults, the
`generation_config.json` that `kolm convert` writes, and the demo all read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kolm.errors import KolmError

SEED_PROMPT = "밥을 먹고 나면 늘 하는 생각이 있는데"


@dataclass(frozen=True)
class GenerationSettings:
    """The seed's settings: sampling with a strong repetition penalty for Korean text."""

    max_new_tokens: int = 64
    repetition_penalty: float = 2.0
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    min_new_tokens: int = 0

    def pipeline_kwargs(self) -> dict:
        kwargs = asdict(self)
        if not self.do_sample:
            del kwargs["temperature"], kwargs["top_p"]
        return kwargs

    def generation_config(self) -> dict:
        """The fields of a model's generation_config.json."""
        return {k: v for k, v in asdict(self).items() if k != "min_new_tokens"}


def load_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    found = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise KolmError(f"{path}: prompts file not found")
        found += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not found:
        raise KolmError("no prompt given: pass a prompt or --prompts-file FILE (one prompt per line)")
    return found


def generate(model_dir: str, prompts: list[str], settings: GenerationSettings = GenerationSettings(),
             seed: int = 0) -> list[str]:
    """Continue each prompt with the model (on the GPU when there is one)."""
    import torch
    from transformers import pipeline, set_seed

    if not (Path(model_dir) / "config.json").is_file():
        raise KolmError(f"{model_dir}: not a Hugging Face model directory (no config.json); run `kolm convert` first")
    set_seed(seed)
    pipe = pipeline("text-generation", model=model_dir, device=0 if torch.cuda.is_available() else -1)
    outputs = pipe(prompts, **settings.pipeline_kwargs())
    return [o[0]["generated_text"] for o in outputs]
