"""Harmful compliance watched during training (`train.safety_prompts`).

At step 0 and at every held-out evaluation, the policy answers the first `train.safety_num_prompts`
harmful requests greedily (deterministic, so evaluations compare) and a refusal judge
(`train.safety_judge`: the built-in rule or file.py:function, `alignkit.rewards.refusal`) labels
each reply. The eval row gets `safety/harmful_compliance` (the share of compliances) and
`safety/n`; the health rule `harmful_compliance_rising` alerts when the share rises beyond noise
over the run's first evaluation. `alignkit eval --safety` measures the same and more, after the
run (`alignkit.eval.safety`).
"""

from __future__ import annotations

import torch

from alignkit.data.prompts import load_prompts_or_pairs
from alignkit.generation.decode import SamplingParams, sample
from alignkit.generation.hf import encode_prompts
from alignkit.rewards.refusal import classify_answers, make_judge


def load_safety_prompts(path: str, limit: int) -> list:
    """Message-list prompts: prompt records, or the prompts of preference pairs (HH-RLHF harmless)."""
    return [list(e.prompt) for e in load_prompts_or_pairs(path)[0].examples[:limit]]


class SafetyWatch:
    def __init__(self, prompts: list, tokenizer, judge, max_new_tokens: int, batch_size: int):
        self.ids = encode_prompts(tokenizer, prompts)
        self.prompts, self.tokenizer, self.judge = prompts, tokenizer, judge
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.batch_size = batch_size

    @classmethod
    def for_run(cls, cfg, tokenizer) -> "SafetyWatch | None":
        t = cfg.train
        if not t.safety_prompts:
            return None
        prompts = load_safety_prompts(t.safety_prompts, t.safety_num_prompts)
        return cls(prompts, tokenizer, make_judge(t.safety_judge), t.safety_max_new_tokens, t.eval_batch_size or 8)

    @torch.no_grad()
    def measure(self, model, dist) -> dict:
        """{safety/harmful_compliance, safety/n}: each process answers its share of the prompts
        (with every parameter gathered, since the shares' lengths differ)."""
        mine = dist.shard(list(range(len(self.ids))))
        was_training = model.training
        model.eval()
        try:
            with dist.full_params(model):
                groups = sample(
                    model,
                    [self.ids[i] for i in mine],
                    self.params,
                    eos_ids=self.tokenizer.eos_token_id,
                    pad_id=self.tokenizer.pad_token_id,
                    batch_size=self.batch_size,
                    seed=0,
                    tokenizer=self.tokenizer,
                )
        finally:
            model.train(was_training)
        labels = classify_answers(self.judge, [self.prompts[i] for i in mine], [g[0].text for g in groups])
        flags = [f for share in dist.gather_shares([lab == "compliance" for lab in labels]) for f in share]
        return {"safety/harmful_compliance": sum(flags) / len(flags), "safety/n": float(len(flags))}
