"""The reward-model recipe: a Bradley-Terry model on preference pairs, one or several named rewards.

The model is the causal LM's trunk with a linear head (`AutoModelForSequenceClassification`), read
at each sequence's last non-pad token; the run's `final/` directory loads back in `transformers` as
that sequence classifier. Rows are laid out as pairs (chosen rows, then rejected rows).
"""

from __future__ import annotations

import torch

from alignkit.config import RunConfig
from alignkit.data.batching import TokenBatch, collate_pairs
from alignkit.data.tokenize import tokenize_pairs
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.recipes import PreparedData, load_examples


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[R, K] rewards; transformers' classifier pools each row at its last non-pad token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


class RewardRecipe:
    """Bradley-Terry reward model (`recipe: reward`); held-out accuracy at every evaluation."""

    name = "reward"
    data = "reward"
    needs_reference = False

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.terms = resolve_terms(cfg.loss, cfg.losses, data=self.data)
        self.reward_names = list(cfg.reward.objectives)
        self.labels, self.margins = {}, {}  # split -> tensors by example index

    def prepare(self) -> PreparedData:
        import functools

        from alignkit.data.reward import load_reward_examples

        loader = functools.partial(load_reward_examples, objectives=tuple(self.reward_names),
                                   use_margin=self.cfg.reward.use_margin)
        train, held, notes = load_examples(self.cfg, loader)
        d = self.cfg.data
        out = []
        for split, examples in (("train", train), ("eval", held)):
            items, stats = tokenize_pairs([e.pair for e in examples], self.tokenizer, d.max_length, d.max_prompt_length)
            self.labels[split] = torch.tensor([e.labels for e in examples], dtype=torch.long).reshape(-1, len(self.reward_names))
            self.margins[split] = torch.tensor([e.margin for e in examples], dtype=torch.float32)
            out.append(items)
            if split == "train":
                notes.append(stats.summary(d.max_length))
                if len(self.reward_names) > 1:
                    judged = (self.labels["train"] != 0).sum(0).tolist()
                    notes.append("judged pairs per objective: " + ", ".join(
                        f"{n} {j}/{len(examples)}" for n, j in zip(self.reward_names, judged)))
        return PreparedData(out[0], out[1], notes)

    def collate(self, items) -> TokenBatch:
        return collate_pairs(items, self.tokenizer.pad_token_id)

    def weight(self, batch: TokenBatch) -> int:
        return batch.num_examples

    def loss(self, model, batch: TokenBatch, split: str):
        rewards = sequence_rewards(model, batch.input_ids, batch.attention_mask)  # [2B, K]
        b, device = batch.num_examples, rewards.device
        labels = self.labels[split][batch.example_ids].to(device)
        inputs = {"chosen_rewards": rewards[:b], "rejected_rewards": rewards[b:], "labels": labels,
                  "margins": self.margins[split][batch.example_ids].to(device)}
        per_example, metrics = apply_terms(self.terms, inputs)
        if len(self.reward_names) > 1:
            correct = (labels * (rewards[:b] - rewards[b:]) > 0).float()
            for k, name in enumerate(self.reward_names):
                judged = labels[:, k] != 0
                metrics[f"accuracy/{name}"] = correct[judged, k].detach()
        return per_example.sum(), metrics
