"""`recipe: grpo`: every sample of every prompt, with group-normalised advantages, through a clipped
policy loss (GRPO, Shao et al., DeepSeekMath, arXiv 2402.03300; Dr. GRPO's unscaled advantages and
aggregation, arXiv 2503.20783; DAPO's clip-higher and token-level aggregation, arXiv 2503.14476).

The policy loss is registered (`loss: {name: ppo_clip, clip_low: 0.2, clip_high: 0.28}`); each
token gets its sequence's advantage; an optional k3 KL penalty (`online.kl_coef`) joins the loss.
"""

from __future__ import annotations

import torch

from alignkit.logprobs import in_segment_order
from alignkit.losses import online as rl
from alignkit.losses.combine import resolve_terms
from alignkit.train.rollouts import OnlineRecipe, Rollout, policy_gradient, token_segments


class GRPORecipe(OnlineRecipe):
    name = "grpo"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.uses_reference = cfg.online.kl_coef > 0
        (self.policy_loss,) = resolve_terms(cfg.loss, [], data="rollout")

    def sequence_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """[P, G] advantages from [P, G] rewards."""
        return rl.group_advantages(rewards, scale_by_std=self.cfg.online.scale_rewards)

    def select(self, samples, rewards, metrics):
        p, n = rewards.shape
        return list(range(p)), [list(range(n))] * p

    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        super().fill(model, rollout, rewards, picks)
        per_segment = self.sequence_advantages(rewards).t().reshape(-1)  # segment of sample k of prompt i: k * P + i
        rollout.advantages = per_segment.to(rollout.batch.input_ids.device)[token_segments(rollout.batch)]

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self.empty(rollout.metrics)
        o = self.cfg.online
        out, logps, segs, metrics = self.policy(model, rollout)
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        ref = in_segment_order(rollout.ref)[0] if rollout.ref is not None else None
        loss, pg = policy_gradient(self.policy_loss, logps, old, rollout.advantages, segs, rollout.batch.num_segments,
                                   o.aggregation, self.cfg.generation.max_new_tokens, ref, o.kl_coef,
                                   sampler_logps=rollout.generator_logps, tis_cap=o.tis_cap)
        return loss, {**metrics, **pg}
