"""`recipe: rloo`: GRPO's machinery with the leave-one-out baseline instead of the group's mean and
std (REINFORCE Leave-One-Out, Ahmadian et al., Back to Basics, arXiv 2402.14740)."""

from __future__ import annotations

import torch

from alignkit.losses import online as rl
from alignkit.train.recipes.grpo import GRPORecipe


class RLOORecipe(GRPORecipe):
    name = "rloo"

    def sequence_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return rl.rloo_advantages(rewards)

    def advantage_scale(self, rewards: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(rewards[:, :1])  # r_i minus the others' mean: no scaling
