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
    logp = torch.log_softmax(head(hidden).float(), dim=-1)  # [n, V]
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return picked, picked.new_zeros(0)
    with torch.no_grad():  # a diagnostic: no gradient through it
        return picked, -(logp.exp() * logp).sum(-1)


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
    implied); packed rows pass their own 4D mask and positions. SDPA takes a boolean mask; the
    eager kernel adds a float mask, so it gets 0 / dtype-min."""
    if not batch.packed:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    mask = batch.allowed[:, None]  # [R, 1, T, T]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", "sdpa") != "sdpa":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
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
    logps = torch.zeros(batch.num_segments, dtype=torch.float32, device=token_lp.device)
    logps = logps.index_add(0, token_segments, token_lp)
    counts = torch.bincount(token_segments, minlength=batch.num_segments)
    return SegmentLogps(logps, counts, token_lp, token_segments, token_ent)
