"""`kolm generate`: the seed's inference step, `transformers.pipeline` on a converted model."""

from __future__ import annotations

from pathlib import Path

from kolm.errors import KolmError


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


def generate(model_dir: str, prompts: list[str], max_new_tokens: int = 64, repetition_penalty: float = 2.0,
             do_sample: bool = True, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
             min_new_tokens: int = 0) -> list[str]:
    """Continue each prompt with the model (on the GPU when there is one)."""
    import torch
    from transformers import pipeline, set_seed

    if not (Path(model_dir) / "config.json").is_file():
        raise KolmError(f"{model_dir}: not a Hugging Face model directory (no config.json); run `kolm convert` first")
    set_seed(seed)
    device = 0 if torch.cuda.is_available() else -1
    pipe = pipeline("text-generation", model=model_dir, device=device)
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    outputs = pipe(prompts, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                   repetition_penalty=repetition_penalty,
                   do_sample=do_sample, **sampling)
    return [o[0]["generated_text"] for o in outputs]
