"""Sequence log-probs of completion tokens, without materialising [B, T, V] logits.

The trunk produces hidden states [R, T, H]; we gather only the positions that predict a scored
token and apply the LM head + log-softmax to them in chunks. Each chunk is recomputed in the
backward pass (activation checkpointing), so at most one [chunk, V] float32 block is alive at a
time. This is the idea of Liger's fused linear losses and Cut Cross-Entropy (arXiv 2411.09009),
written with plain PyTorch ops.

Each segment's token log-probs are summed as exactly as a float64 sum rounded to float32: in
float64 where the device has it, with an error-free float32 splitting where it does not (mps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint

from alignkit import context_parallel
from alignkit.data.batching import TokenBatch
from alignkit.models import backbone_and_head


@dataclass
class SegmentLogps:
    logps: torch.Tensor  # [S] float32: summed log-prob of each segment's tokens
    counts: torch.Tensor  # [S] long: scored tokens per segment
    token_logps: torch.Tensor  # [N] float32: per scored token, in row-major order
    token_segments: torch.Tensor  # [N] long: the segment of each scored token
    token_entropy: torch.Tensor | None = None  # [N] float32, detached: entropy of the predicting distribution


class SamplingSettings(Protocol):
    """The settings that define the distribution a sampler draws from
    (`alignkit.generation.decode.SamplingParams` is one)."""

    temperature: float  # 0: greedy
    top_p: float  # 1: off
    top_k: int  # 0: off
    banned: tuple  # token ids never drawn (a vision-language model's image-layout tokens)


def is_model_distribution(sampling: SamplingSettings | None) -> bool:
    """Whether `sampling` draws from the model's own distribution, so that its log-probs are the
    raw ones: no settings, greedy (a greedy token's log-prob is read at temperature 1, untruncated,
    as vLLM's processed log-probs read it: vLLM sets top-p 1 and top-k 0 for temperature 0), or
    temperature 1 with neither top-k nor top-p; and no banned tokens (vLLM bans them by logit bias,
    before it computes even a greedy token's processed log-prob)."""
    return sampling is None or (
        not sampling.banned
        and (sampling.temperature <= 0 or (sampling.temperature == 1 and sampling.top_p >= 1 and sampling.top_k <= 0))
    )


def sampling_scores(logits: torch.Tensor, sampling: SamplingSettings, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[n, V] float32 logits -> [n, V] scores of the distribution `sampling` draws from: softmax of
    them is that distribution, and `x[t] - logsumexp(x)` the log-prob of token t under it. The one
    definition alignkit's sampler draws from and records, and the trainer scores with
    (`segment_logps(..., sampling=)`), so the two agree to float32 round-off.

    In order: drop the banned tokens (`sampling.banned`; greedy: only that); divide by the
    temperature (not at 0, greedy, nor at 1, which changes nothing); keep the
    top-k scores (ties with the k-th kept); keep the top-p nucleus of what is left, the smallest set
    of tokens, most likely first, whose probability reaches top_p (a token stays while the mass
    ranked above it is below top_p, so the first always stays; Holtzman et al. 2019, arXiv
    1904.09751); everything else is -inf. vLLM applies the same steps in the same order (its
    `processed_logprobs`: temperature, top-k, then top-p on the top-k-masked softmax, then a
    log-softmax, which renormalises over what is kept).

    `keep` [n]: a token per row that stays whatever the rules say (the trainer passes the scored
    tokens). The sampler drew each of them from its own set, so this changes nothing where the two
    sides agree; it keeps a token at the top-k / top-p boundary finite when the trainer's logits
    differ from the sampler's by round-off (or the policy moved since sampling), instead of -inf
    and an infinite ratio or KL estimate."""
    scores = logits
    if sampling.temperature > 0 and sampling.temperature != 1:
        scores = logits / sampling.temperature
    drop = None  # [n, V] True where a rule drops the token
    with torch.no_grad():  # which tokens are kept is not differentiable: no graph for the sort
        kept = scores.detach()
        if sampling.banned:
            drop = torch.zeros_like(kept, dtype=torch.bool)
            drop[:, list(sampling.banned)] = True
            kept = kept.masked_fill(drop, float("-inf"))
        sampled = sampling.temperature > 0  # greedy: vLLM truncates nothing (top-k 0, top-p 1)
        if sampled and sampling.top_k and sampling.top_k < kept.shape[-1]:
            kth = torch.topk(kept, sampling.top_k, dim=-1).values[:, -1:]
            drop = kept < kth
            kept = kept.masked_fill(drop, float("-inf"))
        if sampled and sampling.top_p < 1.0:
            sorted_scores, order = torch.sort(kept, dim=-1, descending=True, stable=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each token
            outside = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= sampling.top_p)
            drop = outside if drop is None else drop | outside
        if drop is not None and keep is not None:
            drop = drop.scatter(-1, keep[:, None], False)
    return scores if drop is None else scores.masked_fill(drop, float("-inf"))


def _token_logps(head, hidden, targets, entropy: bool = False, sampling: SamplingSettings | None = None):
    logits = head(hidden).float()  # [n, V]
    if not is_model_distribution(sampling):
        assert sampling is not None  # for mypy: `is_model_distribution(None)` is True
        logits = sampling_scores(logits, sampling, keep=targets)  # -inf outside the sampling distribution
    # x_t - logsumexp(x) rather than log_softmax(x)[t]: on CPU, torch's float32 log_softmax is
    # off by ~1e-6 per token in one direction, which adds up to ~4e-4 over a 300-token reply
    # (measured against float64; bench/dpo_vs_trl.py prints the comparison).
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not entropy:
        return picked, picked.new_zeros(0)
    with torch.no_grad():  # a diagnostic: no gradient through it
        p = torch.softmax(logits, dim=-1)
        if is_model_distribution(sampling):
            return picked, lse - (p * logits).sum(-1)
        # H = lse - sum p x over the kept tokens (a dropped token has p = 0 and x = -inf)
        return picked, lse - (p * logits.masked_fill(p == 0, 0.0)).sum(-1)


def chunked_token_logps(
    head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    entropy: bool = False,
    sampling: SamplingSettings | None = None,
):
    """log p(target | hidden) for hidden [N, H], targets [N] -> [N] float32, chunk by chunk; with
    `entropy`, also the entropy of each position's distribution ([N], detached). With `sampling`,
    p is the distribution those settings sample from (`sampling_scores`), and so is the entropy's;
    the transform runs inside each checkpointed chunk, so memory stays one [chunk, V] block."""
    out, ent = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, e = checkpoint(_token_logps, head, h, t, entropy, sampling, use_reentrant=False)
        else:
            lp, e = _token_logps(head, h, t, entropy, sampling)
        out.append(lp)
        ent.append(e)
    if not out:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if entropy else empty
    return (torch.cat(out), torch.cat(ent)) if entropy else torch.cat(out)


def trunk_inputs(model, batch: TokenBatch) -> dict:
    """Keyword inputs of the trunk: plain rows use the 2D padding mask (causal attention is
    implied); packed rows pass their own 4D mask and positions.

    The 4D mask goes in as an additive float mask (0 / dtype-min) in the compute dtype, built once
    per batch: given a boolean mask, SDPA converts it to float in every layer and keeps each copy
    for the backward pass (30 x T^2 x 4 bytes for a 30-layer model, 190 MB at T = 1288)."""
    pixels = batch.vision or {}  # a vision-language model's pixel inputs, for the images in the rows
    if not batch.packed:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **pixels}
    device = batch.allowed.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next(model.parameters()).dtype
    allowed = batch.allowed[:, None]  # [R, 1, T, T]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids, **pixels}


def final_hidden(model, batch: TokenBatch) -> torch.Tensor:
    """[R, T, H] the last layer's (normed) hidden states of `batch`, from the model's own forward.

    The model is called whole rather than its trunk alone, so that hooks on the model itself run:
    FSDP2 gathers and reduces the parameters it holds at its root (embeddings, final norm, heads)
    in the root's forward and backward. A causal LM computes logits at one position only
    (`logits_to_keep=1`); the hidden states are read from the trunk by a forward hook (asking for
    `output_hidden_states` would keep every layer's states alive in no-grad passes)."""
    from alignkit.models import decoder_of, is_reward_model

    captured = []
    handle = decoder_of(model).register_forward_hook(
        lambda module, args, out: captured.append(
            out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        )
    )
    try:
        kwargs = dict(trunk_inputs(model, batch), use_cache=False)
        if not is_reward_model(model):
            kwargs["logits_to_keep"] = 1
        model(**kwargs)
    finally:
        handle.remove()
    return captured[-1]


def _scored(batch: TokenBatch):
    pred = batch.predictor_positions()
    rows, cols = ((batch.segment_ids >= 0) & (pred >= 0)).nonzero(as_tuple=True)  # a row's first token has no predictor
    return rows, cols, pred[rows, cols]


def scored_hidden(model, batch: TokenBatch):
    """(hidden states predicting each scored token [N, H], the tokens [N], their segments [N],
    the head), in row-major token order."""
    _, head = backbone_and_head(model)
    hidden = final_hidden(model, batch)
    rows, cols, src = _scored(batch)
    return hidden[rows, src], batch.input_ids[rows, cols], batch.segment_ids[rows, cols], head


def scored_hidden_sharded(model, batch: TokenBatch, cp):
    """`scored_hidden` under context parallelism: the hidden states and tokens of the scored tokens
    whose predicting position this process holds, the segments of all [N], the head, and the owner
    (the process holding the predicting position) of every scored token [N]."""
    _, head = backbone_and_head(model)
    hidden = sharded_hidden(model, batch, cp)  # [R, T/N, H]: this process's positions
    rows, cols, src = _scored(batch)
    per = hidden.shape[1]
    owner = src // per
    mine = owner == cp.rank
    h = hidden[rows[mine], src[mine] - cp.rank * per]
    return h, batch.input_ids[rows[mine], cols[mine]], batch.segment_ids[rows, cols], head, owner


def sharded_hidden(model, batch: TokenBatch, cp) -> torch.Tensor:
    """[R, T/N, H]: the final hidden states of this process's share of the positions, the model
    run with context parallelism (`alignkit.context_parallel`)."""
    from alignkit.errors import ConfigError
    from alignkit.models import decoder_of, is_reward_model

    if batch.vision is not None:  # each process would need the pixels of the image tokens it holds
        raise ConfigError("dist.context_parallel does not take prompts with images yet; set it to 1 for them.")
    device = batch.input_ids.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next(model.parameters()).dtype
    kwargs, mask = context_parallel.local_inputs(batch, cp, dtype)
    captured = []
    handle = decoder_of(model).register_forward_hook(
        lambda module, args, out: captured.append(
            out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        )
    )
    try:
        with context_parallel.attending(mask):
            extra = {} if is_reward_model(model) else {"logits_to_keep": 1}
            model(**kwargs, use_cache=False, **extra)
    finally:
        handle.remove()
    return captured[-1]


def segment_logps(
    model, batch: TokenBatch, chunk_size: int = 1024, entropy: bool = False, sampling: SamplingSettings | None = None
) -> SegmentLogps:
    """Sum log-probs of the scored tokens of each segment of `batch` (and, with `entropy`, each
    scored position's entropy). With `sampling` (online training: the rollout's sampling settings),
    the log-probs and entropies are those of the distribution the sampler drew from (temperature,
    top-k, top-p, renormalised: `sampling_scores`), which is what the sampler records; without it,
    or when the settings leave the model's distribution as it is, the model's own (raw) ones,
    computed exactly as before."""
    cp = context_parallel.active()
    if cp is None:
        h, targets, token_segments, head = scored_hidden(model, batch)
        owner = None
    else:
        h, targets, token_segments, head, owner = scored_hidden_sharded(model, batch, cp)
    token_ent = None
    if entropy:
        token_lp, token_ent = chunked_token_logps(head, h, targets, chunk_size, entropy=True, sampling=sampling)
    else:
        token_lp = chunked_token_logps(head, h, targets, chunk_size, sampling=sampling)
    if cp is not None:  # context parallelism: every process gets the whole sequence's tokens
        if token_lp.numel() == 0:
            # none predicted from here: keep the graph through the trunk and the head, so that this
            # process's backward runs the same all-to-alls and gives every parameter a gradient
            # (zeros) as the others do (FSDP2 reduce-scatters the gradients that exist)
            token_lp = head(h).float().sum(-1) * 0
        token_lp = context_parallel.gather_tokens(token_lp, owner, cp)
        if token_ent is not None:
            token_ent = context_parallel.gather_tokens(token_ent.detach(), owner, cp)
    logps = sum_by_segment(token_lp, token_segments, batch.num_segments)
    counts = torch.bincount(token_segments, minlength=batch.num_segments)
    return SegmentLogps(logps, counts, token_lp, token_segments, token_ent)


# Devices whose kernels have no float64 (Apple's Metal backend); sums there take the float32 path
# of `sum_by_segment`. A module constant so that a test can force that path on CPU.
FLOAT64_UNSUPPORTED_DEVICES = frozenset({"mps"})


def sum_by_segment(
    values: torch.Tensor, segments: torch.Tensor, num_segments: int, *, float64: bool | None = None
) -> torch.Tensor:
    """Per-segment sums of float32 `values` [N] by `segments` [N] -> [num_segments] float32, as exact
    as a float64 sum rounded to float32, differentiable in `values`.

    A plain float32 index_add adds one token after another, and over a few hundred tokens of
    |log p| ~ 1 its round-off reaches 1e-4. Where float64 exists (`float64=None` decides by device)
    we sum in float64. Elsewhere `_split_sum` computes the value in float32; it stays on the device
    (summing on the host in float64 instead would stall the device queue at every forward)."""
    if float64 is None:
        float64 = values.device.type not in FLOAT64_UNSUPPORTED_DEVICES
    if float64:
        out = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
        return out.index_add(0, segments, values.double()).float()
    # The plain sum carries the gradient (d sum / d x = 1) and, for a segment holding an inf or a
    # nan, the value too (-inf stays -inf); the exact sum gives every other value.
    plain = torch.zeros(num_segments, dtype=torch.float32, device=values.device).index_add(0, segments, values)
    with torch.no_grad():
        exact = _split_sum(values.detach(), segments, num_segments)
    return torch.where(torch.isfinite(plain), exact + (plain - plain.detach()), plain)


_SPLIT_LEVELS = 2


def _split_sum(x: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-segment sums of finite float32 x [N] using float32 arithmetic only, within about half
    an ulp of the exact sum (for values of one sign, as log-probs are).

    Each level splits what is left of every value into a part on a power-of-two grid q, whose sums
    are exact in float32, and a remainder below q / 2: the ExtractScalar step of Rump, Ogita and
    Oishi, "Accurate floating-point summation part I: faithful rounding" (SIAM J. Sci. Comput.
    31(1), 2008). With S a segment's sum |x| and N its tokens, after two levels every remainder is
    below N S 2^-44, so their plain sum is off by at most N^3 S 2^-68: under a quarter ulp of S up
    to 16,384 tokens, and far less in practice (10^6 realistic log-probs: within half an ulp, the
    same float32 as the float64 sum). The exact level sums and the remainders' sum are then added
    with Neumaier's compensated summation."""
    zeros = x.new_zeros(num_segments)
    parts = []
    for _ in range(_SPLIT_LEVELS):
        # With S = sum |x| < 2P (P a power of two) and |hi| <= 2|x|, sum |hi| < 4P(1 + N eps), below
        # 2^24 q = 8P for q = P / 2^21: every partial sum of the hi parts is an integer multiple of q
        # under 2^24 q, exact in float32. P comes from the exponent bits (exact, unlike log2 and
        # exp2); the clamp keeps q > 0 for an all-zero segment.
        bound = zeros.index_add(0, segments, x.abs())
        pow2 = (bound.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_min(2.0**-100)
        q = (pow2 * 2.0**-21).index_select(0, segments)
        # round(x / q) * q is exact (q is a power of two), and so is x - hi (a multiple of the ulp
        # of x, below q / 2 in size).
        hi = torch.round(x / q) * q
        parts.append(zeros.index_add(0, segments, hi))
        x = x - hi
    parts.append(zeros.index_add(0, segments, x))
    total, compensation = parts[0], torch.zeros_like(zeros)
    for part in parts[1:]:
        # Neumaier: (big - new) + small is exactly the round-off of big + small; add those last.
        new = total + part
        first = total.abs() >= part.abs()
        big, small = torch.where(first, total, part), torch.where(first, part, total)
        compensation = compensation + ((big - new) + small)
        total = new
    return total + compensation


def in_segment_order(out: SegmentLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token log-probs, segments and entropies sorted by segment (stable: completion order within),
    the order per-token rollout tensors (advantages, values, the sampler's log-probs) are kept in."""
    order = torch.argsort(out.token_segments, stable=True)
    ent = out.token_entropy[order] if out.token_entropy is not None else None
    return out.token_logps[order], out.token_segments[order], ent
