"""Scalar heads on a causal LM's trunk: a reward read at one token per sequence, and a value read
at every completion position (PPO's critic).

Both models are `AutoModelForSequenceClassification`s (the trunk plus a linear `score` head), so
a saved reward or value model loads back in `transformers`. transformers' classifier reads the
head at each padded row's last non-pad token; `pooled_positions` finds that token in any layout
(padded or packed), so packed reward batches give the classifier's scores. `token_values` applies
the head where the log-prob code reads the policy: at the position that predicts each scored token.
"""

from __future__ import annotations

import torch

from alignkit.data.batching import TokenBatch
from alignkit.errors import ModelError
from alignkit.logprobs import final_hidden, trunk_inputs


def reward_trunk_and_head(model):
    """The classifier's transformer trunk and its `score` head, under peft wrappers too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk, head = getattr(base, base.base_model_prefix, None), getattr(base, "score", None)
    if trunk is None or head is None:
        raise ModelError(
            f"{type(base).__name__} has no trunk `{base.base_model_prefix}` and `score` head; "
            "packed reward batches need a standard sequence classifier (or set train.packing=false)."
        )
    return trunk, head


def pooled_positions(batch: TokenBatch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each segment's last non-pad token in its chain prompt + completion: the
    token transformers' classifier pools in a padded row (its predictor chain covers the prompt,
    so a completion made only of pad-id tokens pools the prompt's last token, as there)."""
    seg, pred, ids = batch.segment_ids, batch.predictor_positions(), batch.input_ids
    width = ids.shape[1]
    rows, cols = (seg >= 0).nonzero(as_tuple=True)
    segs = seg[rows, cols]
    src = pred[rows, cols]
    candidates = torch.cat([cols, src])  # each scored token and the token predicting it
    owner = torch.cat([segs, segs])
    rows2 = torch.cat([rows, rows])
    keep = (candidates >= 0) & (ids[rows2, candidates.clamp(min=0)] != pad_id)
    flat = torch.full((batch.num_segments,), -1, dtype=torch.long, device=ids.device)
    flat = flat.scatter_reduce(0, owner[keep], rows2[keep] * width + candidates[keep], reduce="amax")
    if (flat < 0).any():
        raise ValueError("a reward segment has no non-pad token to pool")
    return flat // width, flat % width


def pooled_hidden(model, batch: TokenBatch, pad_id: int) -> torch.Tensor:
    """[S, H] the trunk's final hidden state at each segment's pooled token (any layout)."""
    hidden = final_hidden(model, batch)
    rows, cols = pooled_positions(batch, pad_id)
    return hidden[rows, cols]


def sequence_rewards(model, batch: TokenBatch, pad_id: int) -> torch.Tensor:
    """[S, K] rewards, one row per segment (chosen rows, then rejected rows)."""
    if not batch.packed:  # transformers' classifier pools each row at its last non-pad token
        return model(**trunk_inputs(model, batch)).logits.float()
    return reward_trunk_and_head(model)[1](pooled_hidden(model, batch, pad_id)).float()


def use_distinct_pad(tokenizer) -> str | None:
    """Make the pad token differ from end-of-sequence, so the classifier's pooling (last non-pad
    token) reads the reward at the end-of-turn token, after the whole reply, rather than one token
    before it. Returns a note for the user, or None when nothing changed."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None or pad != eos:
        return None
    for name in ("unk_token", "bos_token"):
        candidate = getattr(tokenizer, name)
        if candidate is not None and getattr(tokenizer, f"{name}_id") not in (eos, None):
            tokenizer.pad_token = candidate
            return (
                f"the tokenizer pads with its end-of-turn token {tokenizer.eos_token!r}; the reward model pads "
                f"with {candidate!r} instead, so its reward is read at the end of each reply"
            )
    return (
        f"the tokenizer pads with its end-of-turn token {tokenizer.eos_token!r} and has no other special token "
        "to pad with; the reward is read at the token before it"
    )


def token_values(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N] float32, segments [N]) of a value model at the position predicting each scored
    token of `batch`, in row-major token order (the order of `logprobs.segment_logps`' tokens).

    V(s_t) is read from the hidden state that predicts token t: the state before the token is
    chosen, as the policy's log-prob of t is read there too."""
    _, head = reward_trunk_and_head(model)
    hidden = final_hidden(model, batch)
    pred = batch.predictor_positions()
    rows, cols = ((batch.segment_ids >= 0) & (pred >= 0)).nonzero(as_tuple=True)
    values = head(hidden[rows, pred[rows, cols]]).float()[:, 0]
    return values, batch.segment_ids[rows, cols]
