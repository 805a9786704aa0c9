"""Rollouts: what an online recipe (`alignkit.train.online`) samples, scores and trains on, and the
policy-gradient reduction its methods share.

Each micro-batch is a *rollout*: its prompts, `generation.num_samples` completions sampled from the
current policy (the generation backend: alignkit's KV-cache sampler, each prompt's prefill shared
by its samples, or vLLM), their rewards, and a packed batch laying each prompt out once with its
completions (prefix sharing, as for pairs). A rollout carries per-token tensors (advantages,
returns, the sampler's and the old policy's log-probs), all [M] over the scored tokens in segment
order (`logprobs.in_segment_order`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.data.batching import TokenBatch
from alignkit.data.negative import TokenizedGroup
from alignkit.data.vision import VisionInputs
from alignkit.generation.multiturn import episode_metrics
from alignkit.logprobs import SegmentLogps
from alignkit.losses import online as rl


@dataclass
class Rollout:
    """One micro-batch of samples, ready for the loss (on the model's device)."""

    batch: TokenBatch | None  # packed [prompt][completion 1]..[completion k] groups; None if nothing to train on
    groups: list = field(default_factory=list)  # the kept prompts' TokenizedGroups (to re-collate a minibatch)
    advantages: torch.Tensor | None = None  # [M] per token (per-sequence estimators broadcast theirs)
    returns: torch.Tensor | None = None  # [M] per token: the value targets (PPO)
    old_values: torch.Tensor | None = None  # [M] the critic's values at sampling time (PPO)
    generator_logps: torch.Tensor | None = None  # [M] the sampler's log-probs
    old_logps: torch.Tensor | None = None  # [M] the policy's before this rollout's first update
    ref: SegmentLogps | None = None  # the reference's log-probs of the batch (KL penalty, online DPO)
    turn_returns: torch.Tensor | None = None  # [M] multi-turn: the return of each token's turn (`train.episodes`)
    metrics: dict = field(default_factory=dict)
    updates: int = 0  # optimizer steps taken on this rollout so far
    key: int = 0  # the micro-batch it was sampled for (seeds what is drawn from it)

    _TOKEN_FIELDS = ("advantages", "returns", "old_values", "generator_logps", "old_logps", "turn_returns")

    def to(self, device) -> "Rollout":
        """Move to `device` in place (the recipe keeps this object to reuse it) and return it."""
        if self.batch is not None and self.batch.input_ids.device != torch.device(device):
            self.batch = self.batch.to(device)
            for name in self._TOKEN_FIELDS:
                value = getattr(self, name)
                setattr(self, name, None if value is None else value.to(device))
            if self.ref is not None:
                # the optional fields left out when None take their default, None
                self.ref = SegmentLogps(**{k: v.to(device) for k, v in vars(self.ref).items() if v is not None})
        return self

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens if self.batch is not None else 0

    @property
    def num_sequence_tokens(self) -> int:
        return self.batch.num_sequence_tokens if self.batch is not None else 0

    def state_dict(self) -> dict:
        """Tensors, numbers and dicts only (a checkpoint loads it with weights_only=True)."""
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        b = self.batch
        return {
            "batch": None if b is None else {k: _on_cpu(v) for k, v in vars(b).items()},
            "groups": [
                {
                    "prompt_ids": g.prompt_ids,
                    "completions": g.completions,
                    "index": g.index,
                    "masks": g.masks,
                    "vision": None if g.vision is None else _on_cpu(g.vision.checkpointed()),
                }
                for g in self.groups
            ],
            **{name: cpu(getattr(self, name)) for name in self._TOKEN_FIELDS},
            "ref": None if self.ref is None else {k: cpu(v) for k, v in vars(self.ref).items()},
            "metrics": {k: cpu(v) for k, v in self.metrics.items()},
            "updates": self.updates,
            "key": self.key,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "Rollout":
        return cls(
            batch=None if state["batch"] is None else TokenBatch(**state["batch"]),
            groups=[
                TokenizedGroup(**{**g, "vision": VisionInputs(**g["vision"]) if g.get("vision") else None})
                for g in state["groups"]
            ],
            **{name: state.get(name) for name in cls._TOKEN_FIELDS},
            ref=None if state["ref"] is None else SegmentLogps(**state["ref"]),
            metrics=dict(state["metrics"]),
            updates=state["updates"],
            key=state["key"],
        )


def _on_cpu(v):
    """A tensor, or a dict of them (a batch's pixel inputs), on the CPU; anything else as it is."""
    if torch.is_tensor(v):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _on_cpu(x) for k, x in v.items()}
    return v


def token_segments(batch: TokenBatch) -> torch.Tensor:
    """[M] the segment of each scored token, in segment order (as `in_segment_order` sorts them)."""
    pred = batch.predictor_positions()
    segs = batch.segment_ids[(batch.segment_ids >= 0) & (pred >= 0)]
    return torch.sort(segs, stable=True).values


def rollout_metrics(samples: list, rewards: torch.Tensor, parts: dict, generation_s: float) -> dict:
    """Metrics of sampled groups: reward (and each weighted term's), lengths, stops, zero-variance groups."""
    lengths = torch.tensor([len(s.token_ids) for group in samples for s in group], dtype=torch.float32)
    stopped = torch.tensor([s.finish_reason == "stop" for group in samples for s in group], dtype=torch.float32)
    metrics = {
        "reward": rewards.mean(),
        "reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
        "completion_length": lengths.mean(),
        "stopped_fraction": stopped.mean(),
        "time/generation_s": torch.tensor(generation_s),
    }
    if len(parts) > 1:
        for name, values in parts.items():
            v = torch.tensor(values, dtype=torch.float32)
            metrics[f"reward/{name}"], metrics[f"reward_std/{name}"] = v.mean(), v.std() if v.numel() > 1 else v * 0
    flat = [s for group in samples for s in group]
    tracked = [s for s in flat if s.reasoning_tokens is not None]
    if tracked and any(s.reasoning_tokens for s in tracked):  # reasoning and answer lengths apart
        reasoning = torch.tensor([float(s.reasoning_tokens) for s in tracked])
        metrics["reasoning_length"] = reasoning.mean()
        metrics["answer_length"] = torch.tensor([float(s.answer_tokens or 0) for s in tracked]).mean()
        metrics["thinking_cut"] = torch.tensor([float(s.thinking_cut) for s in tracked]).mean()
    if rewards.shape[1] > 1:
        metrics["zero_variance_groups"] = torch.tensor(rl.zero_variance_fraction(rewards))
    episodes = [s.episode for group in samples for s in group if s.episode is not None]
    if episodes:
        metrics.update({k: torch.tensor(v) for k, v in episode_metrics(episodes).items()})
    return metrics


def policy_gradient(
    term,
    logps,
    old_logps,
    advantages,
    segs,
    num_segments: int,
    aggregation: str,
    max_completion_length: int,
    ref_logps=None,
    kl_coef: float = 0.0,
    sampler_logps=None,
    tis_cap: float = 0.0,
    is_mask: tuple[float, float] = (0.0, 0.0),
) -> tuple[torch.Tensor, dict]:
    """A registered per-token policy loss `term` (a LossTerm, e.g. ppo_clip), plus GRPO's k3 KL term
    when `ref_logps` is given and `kl_coef` > 0, reduced by `aggregation` (`online.aggregation`) as
    a sum to be divided by the step's `aggregation_weight`s (`losses.online.aggregate_sum`). All
    inputs [M] in segment order; metrics are token means (the KL is reported whenever a reference
    is given).

    Sampler/trainer mismatch, both only when `sampler_logps` is given, from the old log-probs
    against the sampler's: `tis_cap` > 0 weights each token's policy term by min(r_t, tis_cap)
    (`truncated_importance_weights`), `is_mask` = (low, high) with high > 0 multiplies it by
    m_t = 1{low <= r_t <= high} (`masked_importance_weights`); with both, m_t * min(r_t, tis_cap):
    mask, then truncate the kept tokens' weights. The `tis/` and `mis/` metrics are each computed
    over all M tokens, independent of the other correction. Neither touches the KL term: it is
    added after them, to every token.

    A masked token stays in the normaliser: it counts as a token of its sequence (`grpo`) and of
    the batch (`dapo`), with a zero term. The normaliser of a step (`aggregation_weight`, summed
    over micro-batches and processes) comes from the token layout alone, so this keeps 1 x 8 equal
    to 8 x 1 without sharing masks; and the mask acts like the IS weight it sits beside, a
    per-token factor of the estimator rather than a change of the batch. Departure from verl, whose
    rejection edits the response mask and so drops masked tokens from the denominator: here a
    batch with many masked tokens takes a smaller step, in proportion to `mis/masked_fraction`."""
    extra = {"token_seq": segs} if "token_seq" in term.spec.inputs else {}  # sequence-level losses (GSPO)
    per_token, parts = term.spec.fn(logps, old_logps, advantages, **extra, **term.params)
    n = max(logps.numel(), 1)
    metrics = {k: v.detach().sum() / n for k, v in parts.items()}
    if is_mask[1] > 0 and sampler_logps is not None:  # masked importance sampling (`losses.online`)
        m, sums = rl.masked_importance_weights(old_logps, sampler_logps, *is_mask)
        per_token = per_token * m
        metrics.update({k: v / n for k, v in sums.items()})
    if tis_cap > 0 and sampler_logps is not None:  # truncated importance sampling (`losses.online`)
        w, sums = rl.truncated_importance_weights(old_logps, sampler_logps, tis_cap)
        per_token = per_token * w
        metrics.update({k: v / n for k, v in sums.items()})
    if ref_logps is not None:
        per_token, kl = rl.kl_penalty_in_loss(per_token, logps, ref_logps, kl_coef)
        metrics["kl"] = kl.sum() / n
    return rl.aggregate_sum(per_token, segs, num_segments, aggregation, max_completion_length), metrics
