"""Sequence log-probs of completion tokens, without materialising [B, T, V] logits.

The trunk produces hidden states [R, T, H]; we gather only the positions that predict a scored
token and apply the LM head + log-softmax to them in chunks. Each chunk is recomputed in the
backward pass (activation checkpointing), so at most one [chunk, V] float32 block is alive at a
time. This is the idea of Liger's fused linear losses and Cut Cross-Entropy (arXiv 2411.09009),
written with plain PyTorch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignkit.data.batching import TokenBatch
from alignkit.models import backbone_and_head


@dataclass
class SegmentLogps:
    logps: torch.Tensor  # [S] float32: summed log-prob of each segment's tokens
    counts: torch.Tensor  # [S] long: scored tokens per segment
    token_logps: torch.Tensor  # [N] float32: per scored token, in row-major order
    token_segments: torch.Tensor  # [N] long: the segment of each scored token
    token_entropy: torch.Tensor | None = None  # [N] float32, detached: entropy of the predicting distribution


def _token_logps(head, hidden, targets, entropy: bool = False):
    logits = head(hidden).float()  # [n, V]
    # x_t - logsumexp(x) rather than log_softmax(x)[t]: on CPU, torch's float32 log_softmax is
    # off by ~1e-6 per token in one direction, which adds up to ~4e-4 over a 300-token reply
    # (measured against float64; bench/dpo_vs_trl.py prints the comparison).
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not entropy:
        return picked, picked.new_zeros(0)
    with torch.no_grad():  # a diagnostic: no gradient through it
        p = torch.softmax(logits, dim=-1)
        return picked, lse - (p * logits).sum(-1)


def chunked_token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                        entropy: bool = False):
    """log p(target | hidden) for hidden [N, H], targets [N] -> [N] float32, chunk by chunk; with
    `entropy`, also the entropy of each position's distribution ([N], detached)."""
    out, ent = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start: start + chunk_size], targets[start: start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, e = checkpoint(_token_logps, head, h, t, entropy, use_reentrant=False)
        else:
            lp, e = _token_logps(head, h, t, entropy)
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
    if not batch.packed:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    device = batch.allowed.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next(model.parameters()).dtype
    allowed = batch.allowed[:, None]  # [R, 1, T, T]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids}


def scored_hidden(model, batch: TokenBatch):
    """(hidden states predicting each scored token [N, H], the tokens [N], their segments [N],
    the head), in row-major token order."""
    trunk, head = backbone_and_head(model)
    hidden = trunk(**trunk_inputs(model, batch)).last_hidden_state
    pred = batch.predictor_positions()
    rows, cols = ((batch.segment_ids >= 0) & (pred >= 0)).nonzero(as_tuple=True)  # a row's first token has no predictor
    src = pred[rows, cols]
    return hidden[rows, src], batch.input_ids[rows, cols], batch.segment_ids[rows, cols], head


def segment_logps(model, batch: TokenBatch, chunk_size: int = 1024, entropy: bool = False) -> SegmentLogps:
    """Sum log-probs of the scored tokens of each segment of `batch` (and, with `entropy`, each
    scored position's entropy)."""
    h, targets, token_segments, head = scored_hidden(model, batch)
    token_ent = None
    if entropy:
        token_lp, token_ent = chunked_token_logps(head, h, targets, chunk_size, entropy=True)
    else:
        token_lp = chunked_token_logps(head, h, targets, chunk_size)
    # Summed in float64: index_add adds one token after another, and over a few hundred tokens of
    # |log p| ~ 1 float32 round-off reaches 1e-4 (a pairwise sum would not; this is simpler).
    logps = torch.zeros(batch.num_segments, dtype=torch.float64, device=token_lp.device)
    logps = logps.index_add(0, token_segments, token_lp.double()).float()
    counts = torch.bincount(token_segments, minlength=batch.num_segments)
    return SegmentLogps(logps, counts, token_lp, token_segments, token_ent)
