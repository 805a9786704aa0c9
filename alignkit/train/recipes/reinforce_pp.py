"""`recipe: reinforce_pp`: REINFORCE++ (Hu, arXiv 2501.03262): PPO's stabilisers without a critic.

Per rollout (`fill`): the per-token KL to the reference (`online.kl_coef`, `online.kl_estimator`,
k1 by default as in the paper) is subtracted from every token's reward and the sequence reward is
added on the last token; each token's advantage is its return (the rewards still to come, no
discount) normalised over the whole batch, every process's tokens included. The policy loss is the
clipped ratio of `loss` (default `ppo_clip`), as GRPO's; the KL is in the reward, not in the loss.
"""

from __future__ import annotations

import torch

from alignkit.logprobs import in_segment_order, segment_logps
from alignkit.losses import ppo as P
from alignkit.train.recipes.grpo import GRPORecipe
from alignkit.train.rollouts import Rollout, policy_gradient, token_segments


class ReinforcePPRecipe(GRPORecipe):
    name = "reinforce_pp"

    @torch.no_grad()
    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        o, t = self.cfg.online, self.cfg.train
        batch, device = rollout.batch, rollout.batch.input_ids.device
        segs, num = token_segments(batch), batch.num_segments
        rollout.old_logps = in_segment_order(segment_logps(model, batch, t.logprob_chunk_size))[0]
        kl = torch.zeros_like(rollout.old_logps)
        if self.reference is not None:
            rollout.ref = self.reference.segment(batch, t.logprob_chunk_size)
            kl = P.kl_per_token(rollout.old_logps, in_segment_order(rollout.ref)[0], estimator=o.kl_estimator)
        seq_rewards = rewards.t().reshape(-1).to(device)  # [S]: segment of sample k of prompt j is k * P' + j
        token_rewards, _ = P.kl_shaped_rewards(seq_rewards, kl, segs, num, kl_coef=o.kl_coef)
        rollout.advantages, returns = P.reinforce_pp_advantages(token_rewards, segs, num, gather=self.ctx.gather)
        rollout.metrics.update({"kl": kl.mean(), "returns/mean": returns.mean(),
                                "advantages/std": rollout.advantages.std(unbiased=False)})

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self.empty(rollout.metrics)
        o = self.cfg.online
        out, logps, segs, metrics = self.policy(model, rollout)
        loss, pg = policy_gradient(self.policy_loss, logps, rollout.old_logps, rollout.advantages, segs,
                                   rollout.batch.num_segments, o.aggregation, self.cfg.generation.max_new_tokens,
                                   sampler_logps=rollout.generator_logps, tis_cap=o.tis_cap)
        return loss, {**metrics, **pg}
