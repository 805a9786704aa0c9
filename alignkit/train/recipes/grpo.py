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

    def advantage_scale(self, rewards: torch.Tensor) -> torch.Tensor:
        """[P, 1]: what `sequence_advantages` divides a reward's distance from its baseline by."""
        if not self.cfg.online.scale_rewards:
            return torch.ones_like(rewards[:, :1])
        return rewards.std(dim=1, keepdim=True) + 1e-4  # as rl.group_advantages

    def select(self, samples, rewards, metrics):
        p, n = rewards.shape
        return list(range(p)), [list(range(n))] * p

    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        super().fill(model, rollout, rewards, picks)
        device, segs = rollout.batch.input_ids.device, token_segments(rollout.batch)
        flat = lambda t: t.expand_as(rewards).t().reshape(-1).to(device)[segs]  # noqa: E731  (segment k * P + i)
        rollout.advantages = flat(self.sequence_advantages(rewards))
        if rollout.turn_returns is not None:
            # Multi-turn (`train.episodes`): turn t's tokens are credited with its own return G_t
            # against the same baseline, A_t = A + (G_t - G_0) / scale; equal to A when G_t = G_0.
            rollout.advantages = rollout.advantages + (rollout.turn_returns - flat(rewards)) / flat(self.advantage_scale(rewards))

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
