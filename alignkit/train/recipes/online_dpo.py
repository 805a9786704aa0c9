"""`recipe: online_dpo`: each prompt's best and worst sample form a pair for any registered pair loss:
`dpo` (online DPO, Guo et al., arXiv 2402.04792) or `ipo` (online IPO, Calandriello et al., arXiv
2403.08635). Prompts whose samples all score the same carry no preference and are left out. The
reference is the initial policy (LoRA: its base), kept in memory."""

from __future__ import annotations

import torch

from alignkit.losses import online as rl
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.base import RunningMean
from alignkit.train.online import MethodBase, OnlineRecipe
from alignkit.train.rollouts import Rollout


class BestWorstPairs(MethodBase):
    name = "online_dpo"
    uses_reference = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.terms = resolve_terms(cfg.loss, cfg.losses, data="paired")
        self.reward_shift = RunningMean()  # BCO's delta (loss bco_pair), carried over steps as offline

    def select(self, samples, rewards, metrics):
        best, worst, valid = rl.best_worst_pairs(rewards)
        kept = valid.nonzero().flatten().tolist()
        metrics["pairs"] = torch.tensor(float(len(kept)))
        return kept, [[int(best[i]), int(worst[i])] for i in kept]

    def loss(self, model, rollout: Rollout, split: str):
        recipe = self.recipe
        if rollout.batch is None:
            if any(t.spec.name.startswith("bco") for t in self.terms):  # the other processes gather their pairs
                self.reward_shift.update(recipe.ctx.gather(torch.zeros(0)))
            return recipe.empty(rollout.metrics)
        out, _, _, metrics = recipe.policy(model, rollout)
        assert rollout.ref is not None  # online DPO keeps a reference (uses_reference): `fill_common` scored the batch
        b = rollout.batch.num_examples
        inputs = {
            "policy_chosen_logps": out.logps[:b],
            "policy_rejected_logps": out.logps[b:],
            "ref_chosen_logps": rollout.ref.logps[:b],
            "ref_rejected_logps": rollout.ref.logps[b:],
            "chosen_counts": out.counts[:b],
            "rejected_counts": out.counts[b:],
            "reward_shift": torch.tensor(self.reward_shift.value, device=out.logps.device),
        }
        per_example, pair_metrics = apply_terms(self.terms, inputs)
        if split == "train" and "bco/reward_mean" in pair_metrics:  # every process's pairs: one shift
            self.reward_shift.update(recipe.ctx.gather(pair_metrics["bco/reward_mean"]))
        return per_example.sum(), {**metrics, **{k: v.mean() for k, v in pair_metrics.items()}}

    def weight(self, rollout: Rollout) -> int:
        return rollout.batch.num_examples if rollout.batch is not None else 0  # pairs: the loss is their mean

    def state_dict(self) -> dict:
        return {"reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reward_shift.load_state_dict(state["reward_shift"])


def build(cfg, tokenizer) -> OnlineRecipe:
    return OnlineRecipe(cfg, tokenizer, BestWorstPairs(cfg))
