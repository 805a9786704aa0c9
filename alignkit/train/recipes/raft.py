"""`recipe: raft`: SFT on each prompt's best sample (RAFT, Dong et al., Reward rAnked FineTuning,
arXiv 2304.06767). Since every step samples from the current policy, ranking and fine-tuning are
iterated. Prompts whose samples all score the same are left out: nothing singles one out."""

from __future__ import annotations

import torch

from alignkit.losses import online as rl
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.online import MethodBase, OnlineRecipe
from alignkit.train.rollouts import Rollout


class BestOfK(MethodBase):
    name = "raft"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.terms = resolve_terms(cfg.loss, [], data="sft")

    def select(self, samples, rewards, metrics):
        best = rl.best_of_k(rewards)
        varied = rewards.max(1).values > rewards.min(1).values
        kept = varied.nonzero().flatten().tolist()
        metrics["kept_fraction"] = torch.tensor(len(kept) / max(1, rewards.shape[0]))
        metrics["reward_of_kept"] = rewards.max(1).values[varied].mean() if kept else torch.tensor(0.0)
        return kept, [[int(best[i])] for i in kept]

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self.recipe.empty(rollout.metrics)
        out, _, _, metrics = self.recipe.policy(model, rollout)
        per_example, sft_metrics = apply_terms(self.terms, {"policy_logps": out.logps, "counts": out.counts})
        # token-mean NLL, as SFT: the sum here, divided by the step's tokens (`weight`)
        return per_example.sum(), {**metrics, **{k: v.float().mean() for k, v in sft_metrics.items()}}

    def weight(self, rollout: Rollout) -> int:
        return rollout.batch.num_scored if rollout.batch is not None else 0


def build(cfg, tokenizer) -> OnlineRecipe:
    return OnlineRecipe(cfg, tokenizer, BestOfK(cfg))
