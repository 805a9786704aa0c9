"""Text in, text out: chat-rendered prompts sampled with `alignkit.generation.decode`."""

from __future__ import annotations

from alignkit.data.vision import PixelPrompt, require_vision
from alignkit.generation.decode import SamplingParams, sample

__all__ = ["SamplingParams", "encode_prompts", "generate", "render_prompts"]


def render_prompts(tokenizer, prompts: list) -> list[str]:
    """Message lists -> prompt strings ending in the generation prompt; strings pass through."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        else:
            out.append(tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True))
    return out


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Prompt token ids; with a chat template the special tokens are in the rendered text already.
    A prompt with images comes back as a `PixelPrompt` (its ids as the processor lays the images
    out, and their pixels), which alignkit's sampler reads."""
    templated = tokenizer.chat_template is not None
    out = []
    for i, p in enumerate(prompts):
        vision = None if isinstance(p, str) else require_vision(tokenizer, p, f"prompt {i}")
        (text,) = render_prompts(tokenizer, [p])
        if vision is not None:
            out.append(PixelPrompt(*vision.encode_prompt(text, p, f"prompt {i}")))
        else:
            out.append(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    return out


def generate(
    model,
    tokenizer,
    prompts: list,
    params: SamplingParams = SamplingParams(),
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generating",
    prompt_seeds: list | None = None,
) -> list[list[str]]:
    """Return, for each prompt, `params.n` completions (decoded, special tokens removed).

    Prompts are message lists (rendered with the chat template) or raw strings. `prompt_seeds`: a
    seed per prompt (see `decode.sample`)."""
    samples = sample(
        model,
        encode_prompts(tokenizer, prompts),
        params,
        eos_ids=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        seed=seed,
        tokenizer=tokenizer,
        progress=progress,
        desc=desc,
        prompt_seeds=prompt_seeds,
    )
    return [[s.text for s in group] for group in samples]
