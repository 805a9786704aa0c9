"""`recipe: reinforce_pp`: REINFORCE++ (Hu, arXiv 2501.03262): PPO's stabilisers without a critic.

Per rollout (`kl_shaped_returns`): the per-token KL to the reference (`online.kl_coef`,
`online.kl_estimator`, k1 by default as in the paper) is subtracted from every token's reward and
the sequence reward is added on the last token; each token's advantage is its return (the rewards
still to come, no discount) normalised over the whole batch, every process's tokens included. The
policy loss is the clipped ratio of `loss` (default `ppo_clip`), as GRPO's; the KL is in the reward,
not in the loss.
"""

from __future__ import annotations

import torch

from alignkit.logprobs import in_segment_order, segment_logps
from alignkit.losses import ppo as P
from alignkit.train.online import OnlineRecipe, PolicyGradient
from alignkit.train.rollouts import Rollout, token_segments


@torch.no_grad()
def kl_shaped_returns(recipe: OnlineRecipe, model, rollout: Rollout, rewards: torch.Tensor) -> None:
    """The estimator: old log-probs (always: the loss's ratio starts from them), the KL-shaped token
    rewards, their batch-normalised returns as advantages."""
    o, t = recipe.cfg.online, recipe.cfg.train
    batch = rollout.batch
    assert batch is not None  # `fill` runs only on a rollout with samples to train on
    device = batch.input_ids.device
    segs, num = token_segments(batch), batch.num_segments
    rollout.old_logps = in_segment_order(segment_logps(model, batch, t.logprob_chunk_size, sampling=recipe.params))[0]
    kl = torch.zeros_like(rollout.old_logps)
    if recipe.reference is not None:
        rollout.ref = recipe.reference.segment(batch, t.logprob_chunk_size)
        kl = P.kl_per_token(rollout.old_logps, in_segment_order(rollout.ref)[0], estimator=o.kl_estimator)
    seq_rewards = rewards.t().reshape(-1).to(device)  # [S]: segment of sample k of prompt j is k * P' + j
    token_rewards, _ = P.kl_shaped_rewards(seq_rewards, kl, segs, num, kl_coef=o.kl_coef)
    rollout.advantages, returns = P.reinforce_pp_advantages(token_rewards, segs, num, gather=recipe.ctx.gather)
    rollout.metrics.update(
        {"kl": kl.mean(), "returns/mean": returns.mean(), "advantages/std": rollout.advantages.std(unbiased=False)}
    )


def build(cfg, tokenizer) -> OnlineRecipe:
    return OnlineRecipe(cfg, tokenizer, PolicyGradient(cfg, "reinforce_pp", kl_shaped_returns, kl_in_loss=False))
