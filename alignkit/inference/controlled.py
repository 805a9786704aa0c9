"""Controlled decoding (Mudgal et al. 2024, arXiv 2310.17022): token-level steering by a value.

At every step the next token is drawn from the model's top-k candidates with

    pi(z | x, y) proportional to p(z | x, y) * exp(strength * V(x, y + z))

(at temperature 0, the argmax), where V is a prefix value (`alignkit.inference.value`) read from
the model's own final hidden state after z. Scoring the k candidates costs one forward of k
tokens per row from the shared KV cache: the cache is repeated k times, the k candidates run as
one batch, and the chosen row's cache and logits are kept, so the forward that scores z is also
the forward that advances decoding. The prompt is prefilled once.

KL: pi is explicit here, so the reported KL is an estimate, the mean over completions of
sum_t [log pi(z_t) - log p(z_t)] (unbiased for KL(pi || p) when sampling at temperature 1).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from alignkit.errors import ConfigError
from alignkit.generation.decode import SamplingParams, left_pad, stopped_by_string
from alignkit.inference.result import Choice, StrategyResult
from alignkit.inference.value import ValueHead
from alignkit.models import backbone_and_head
from alignkit.rewards.functions import score_ragged


@torch.no_grad()
def controlled_batch(
    model,
    value: ValueHead,
    prompts: list,
    params: SamplingParams,
    *,
    candidates: int,
    strength: float,
    tokenizer,
    generator,
) -> list[dict]:
    """Decode one completion per prompt; per row: tokens, text, raw log-probs, steered log-probs."""
    trunk, head = backbone_and_head(model)
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = trunk(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, head(out.last_hidden_state[:, -1]).float()
    rows, k = len(prompts), min(candidates, logits.shape[-1])
    tokens, raw, steered = [[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)]
    done = [False] * rows
    next_pos = positions[:, -1] + 1
    for _ in range(params.max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1)
        cand_lp, cand = torch.topk(logp, k, dim=-1)  # [R, k]
        cache.batch_repeat_interleave(k)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1).repeat_interleave(k, 0)
        out = trunk(
            input_ids=cand.reshape(-1, 1),
            attention_mask=mask,
            position_ids=next_pos.repeat_interleave(k)[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state[:, -1]  # [R * k, H]: the state after each candidate
        score = cand_lp + strength * value(hidden).view(rows, k)
        pi = torch.log_softmax(score / params.temperature if params.temperature > 0 else score, dim=-1)
        if params.temperature > 0:
            j = torch.multinomial(pi.exp(), 1, generator=generator)[:, 0]
        else:
            j = score.argmax(-1)
        sel = torch.arange(rows, device=device) * k + j
        out.past_key_values.batch_select_indices(sel)
        cache, mask, logits = out.past_key_values, mask[sel], head(hidden[sel]).float()
        next_pos = next_pos + 1
        tok = cand.gather(-1, j[:, None])[:, 0].tolist()
        step_raw = cand_lp.gather(-1, j[:, None])[:, 0].tolist()
        step_pi = pi.gather(-1, j[:, None])[:, 0].tolist() if params.temperature > 0 else [0.0] * rows
        for r in range(rows):
            if done[r]:
                continue
            tokens[r].append(tok[r])
            raw[r].append(step_raw[r])
            steered[r].append(step_pi[r])
            if tok[r] == eos or (params.stop and stopped_by_string(tokenizer, tokens[r], params.stop)):
                done[r] = True
        if all(done):
            break
    return [
        {"tokens": t, "text": tokenizer.decode(t, skip_special_tokens=True).strip(), "raw": a, "steered": b}
        for t, a, b in zip(tokens, raw, steered)
    ]


def controlled_decoding(
    model,
    tokenizer,
    reward,
    prompts: list,
    prompt_ids: list,
    columns: dict,
    params: SamplingParams,
    value: ValueHead,
    *,
    candidates: int = 8,
    strength: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> StrategyResult:
    if candidates < 1:
        raise ValueError(f"controlled decoding needs candidates >= 1; got {candidates}")
    vocab_size, hidden_size = backbone_and_head(model)[1].weight.shape
    if value.weight.numel() != hidden_size:
        raise ConfigError(
            f"the value head was fitted on a model with hidden size {value.weight.numel()} "
            f"({value.meta.get('model', '?')}); this model's is {hidden_size}. Fit one for this model."
        )
    start = time.perf_counter()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was = model.training
    model.eval()
    rows = []
    try:
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        rows = [None] * len(prompt_ids)
        for b in tqdm(
            range(0, len(order), batch_size),
            desc="controlled decoding",
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            idx = order[b : b + batch_size]
            for i, row in zip(
                idx,
                controlled_batch(
                    model,
                    value,
                    [prompt_ids[i] for i in idx],
                    params,
                    candidates=candidates,
                    strength=strength,
                    tokenizer=tokenizer,
                    generator=generator,
                ),
            ):
                rows[i] = row
    finally:
        model.train(was)
    scores, _ = score_ragged(reward, prompts, [[r["text"]] for r in rows], columns)
    # each step runs k candidate tokens per row: that is the decoding cost
    k = min(candidates, vocab_size)
    choices = [
        Choice(r["text"], s[0], [r["text"]], s, 0, len(r["tokens"]) * k, kl=sum(r["steered"]) - sum(r["raw"]))
        for r, s in zip(rows, scores)
    ]
    kl = sum(c.kl for c in choices) / max(1, len(choices))
    return StrategyResult(
        "controlled-decoding",
        choices,
        time.perf_counter() - start,
        sum(len(p) for p in prompt_ids),
        kl,
        "estimate",
        {"candidates": candidates, "strength": strength, "value_heldout_r2": value.meta.get("heldout_r2")},
    )
