"""`recipe: rloo`: every sample, the leave-one-out baseline instead of the group's mean and std,
through the same clipped policy loss as GRPO (REINFORCE Leave-One-Out, Ahmadian et al., Back to
Basics, arXiv 2402.14740). The whole method is this composition: a new online method is one such
file and its line in `alignkit.registries.recipes`."""

from __future__ import annotations

from alignkit.losses import online as rl
from alignkit.train.online import OnlineRecipe, PolicyGradient, SequenceAdvantages, unscaled


def build(cfg, tokenizer) -> OnlineRecipe:
    # r_i minus the mean of the group's other rewards: no rescaling
    return OnlineRecipe(cfg, tokenizer, PolicyGradient(cfg, "rloo", SequenceAdvantages(rl.rloo_advantages, unscaled)))
