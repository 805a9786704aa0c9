"""Batched generation with `transformers`: left padding, KV cache, greedy or sampled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    n: int = 1  # samples per prompt


def render_prompts(tokenizer, prompts: list) -> list[str]:
    """Message lists -> prompt strings ending in the generation prompt; strings pass through."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        else:
            out.append(tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True))
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list, params: SamplingParams = SamplingParams(), batch_size: int = 32,
             seed: int = 0, progress: bool = False, desc: str = "generating") -> list[list[str]]:
    """Return, for each prompt, `params.n` completions (decoded, special tokens removed).

    Prompts are message lists (rendered with the chat template) or raw strings. Batches are
    formed longest-first so padding stays small."""
    texts = render_prompts(tokenizer, prompts)
    templated = tokenizer.chat_template is not None
    encoded = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    results: list = [None] * len(texts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad = tokenizer.pad_token_id
    with tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            sample = params.temperature > 0
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=params.max_new_tokens,
                do_sample=sample, temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None, top_k=params.top_k if sample else None,
                num_return_sequences=params.n, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, width:].cpu()
            for r, i in enumerate(idx):
                rows = new[r * params.n: (r + 1) * params.n]
                results[i] = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
            bar.update(len(idx))
    model.train(was_training)
    return results
