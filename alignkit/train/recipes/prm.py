"""`recipe: prm`: a process reward model, one score per reasoning step (Lightman et al., "Let's
Verify Step by Step", arXiv 2305.20050; Wang et al., Math-Shepherd, arXiv 2312.08935).

The model is the causal LM's trunk with a one-output linear head (`AutoModelForSequenceClassification`,
as for `recipe: reward`), read at the last token of every step of the reply instead of the reply's
last token only, and fitted to each step's label with binary cross-entropy (`step_bce`). The reply
is the steps joined by `reward.step_separator`, laid out as scoring lays it out
(`data.steps.encode_steps`); rows are padded, one reply each. The saved model carries the
separator in its config (`alignkit_step_separator`), so a reward read from it scores each step and
aggregates (`rewards.model.RewardModel`: min by default, product or last).
"""

from __future__ import annotations

import functools

import torch

from alignkit.data.batching import TokenBatch, collate_sft
from alignkit.data.splits import PreparedData, example_sources, load_examples
from alignkit.data.steps import load_step_examples, tokenize_steps
from alignkit.data.tokenize import explain
from alignkit.data.vision import vision_of
from alignkit.errors import ConfigError
from alignkit.heads import reward_trunk_and_head, use_distinct_pad
from alignkit.logprobs import final_hidden
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.models import is_peft
from alignkit.train.base import OfflineRecipe, SetupContext


def _padded(items: list, pad_id: int, capacity: int | None = None) -> TokenBatch:
    """One reply a row (`train.packing` lays nothing out differently here)."""
    return collate_sft(items, pad_id)


class PRMRecipe(OfflineRecipe):
    """Process reward model on step-labelled replies (`recipe: prm`)."""

    name = "prm"
    pack, pad = _padded, _padded

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.terms = resolve_terms(cfg.loss, cfg.losses, data="steps")
        self.separator = cfg.reward.step_separator
        self.pad_note = use_distinct_pad(tokenizer)
        self.steps = {}  # split -> {example index: (step ends, labels)}

    @property
    def shares_prompts(self) -> bool:
        return False  # padded rows: each reply carries its prompt

    def prepare(self) -> PreparedData:
        d = self.cfg.data
        if vision_of(self.tokenizer) is not None:  # step scoring lays out text prompts only
            raise ConfigError(
                f"recipe prm does not train on a vision-language model ({self.cfg.model.name_or_path}) yet; "
                "recipe reward does (docs/vision.md)."
            )
        loader = functools.partial(load_step_examples, separator=self.separator)
        train, held, notes = load_examples(d, self.cfg.seed, loader)
        if self.pad_note:
            notes.append(self.pad_note)
        out = []
        for split, examples in (("train", train), ("eval", held)):
            items, split_notes = tokenize_steps(
                examples, self.tokenizer, d.max_length, d.max_prompt_length, self.separator
            )
            self.steps[split] = {it.index: (it.step_ends, it.labels) for it in items}
            out.append(items)
            if split == "train":
                notes += split_notes
        return PreparedData(out[0], out[1], notes, sources=example_sources(train, held))

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData:
        self._ctx = ctx
        base = model.get_base_model() if is_peft(model) else model
        base.config.alignkit_step_separator = self.separator  # saved with the model: it scores steps
        return data.replace()

    def weight(self, batch: TokenBatch) -> int:
        return batch.num_examples

    def loss(self, model, batch: TokenBatch, split: str):
        table = self.steps[split]
        rows, cols, labels, owner = [], [], [], []
        prompt_lens = (batch.segment_ids < 0).long().argmin(dim=1)  # first scored token = the reply's start
        for r, index in enumerate(batch.example_ids.tolist()):
            ends, step_labels = table[index]
            start = int(prompt_lens[r]) if (batch.segment_ids[r] >= 0).any() else 0
            for e, y in zip(ends, step_labels):
                rows.append(r)
                cols.append(start + e)
                labels.append(y)
                owner.append(r)
        device = batch.input_ids.device
        hidden = final_hidden(model, batch)  # [R, T, H]
        head = reward_trunk_and_head(model)[1]
        r_idx, c_idx = torch.tensor(rows, device=device, dtype=torch.long), torch.tensor(cols, device=device)
        logits = head(hidden[r_idx, c_idx]).float()[:, 0]  # [S]
        inputs = {
            "step_logits": logits,
            "step_labels": torch.tensor(labels, device=device, dtype=torch.float32),
            "step_example": torch.tensor(owner, device=device, dtype=torch.long),
            "num_examples": batch.num_examples,
        }
        per_example, metrics = apply_terms(self.terms, inputs)
        return per_example.sum(), metrics

    def show_example(self, data: PreparedData, index: int) -> str:
        item = data.train[index]
        ends = set(item.step_ends)
        return explain(
            self.tokenizer,
            item.prompt_ids,
            item.completion_ids,
            label="reply",
            scored=[j in ends for j in range(len(item.completion_ids))],
            why="each step is scored at its last token",
        )
