"""`recipe: grpo`: every sample of every prompt, with group-normalised advantages, through a clipped
policy loss (GRPO, Shao et al., DeepSeekMath, arXiv 2402.03300; Dr. GRPO's unscaled advantages and
aggregation, arXiv 2503.20783; DAPO's clip-higher and token-level aggregation, arXiv 2503.14476).

The policy loss is registered (`loss: {name: ppo_clip, clip_low: 0.2, clip_high: 0.28}`); each
token gets its sequence's advantage; an optional k3 KL penalty (`online.kl_coef`) joins the loss.
"""

from __future__ import annotations

import torch

from alignkit.losses import online as rl
from alignkit.train.online import OnlineRecipe, PolicyGradient, SequenceAdvantages, unscaled


def build(cfg, tokenizer) -> OnlineRecipe:
    scale_by_std = cfg.online.scale_rewards

    def advantages(rewards: torch.Tensor) -> torch.Tensor:
        return rl.group_advantages(rewards, scale_by_std=scale_by_std)

    def scale(rewards: torch.Tensor) -> torch.Tensor:
        return rewards.std(dim=1, keepdim=True) + 1e-4 if scale_by_std else unscaled(rewards)  # as group_advantages

    return OnlineRecipe(cfg, tokenizer, PolicyGradient(cfg, "grpo", SequenceAdvantages(advantages, scale)))
