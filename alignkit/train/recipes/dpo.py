"""`recipe: dpo`: the DPO family, any registered paired loss on (prompt, chosen, rejected) examples.

`PreferenceLosses` is the family's machinery: the loss terms, their reference inputs and BCO's
running reward shift. The other offline preference recipes (unpaired, masked, negative) compose it;
they differ in the data they read and in how a batch's log-probs become the losses' inputs.
"""

from __future__ import annotations

from typing import Callable

import torch

from alignkit.data import formats
from alignkit.data.batching import TokenBatch, collate_packed_groups, collate_pairs
from alignkit.data.splits import PreparedData, prepare_data
from alignkit.data.tokenize import tokenize_pairs
from alignkit.logprobs import segment_logps
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.base import OfflineRecipe, RunningMean


def pair_reference_inputs(table: torch.Tensor) -> dict:
    """Loss inputs from a pair batch's [B, 2] reference log-probs (chosen, rejected columns)."""
    return {"ref_chosen_logps": table[:, 0], "ref_rejected_logps": table[:, 1]}


class PreferenceLosses:
    """Registered loss terms of kind `data` (`loss`, or a weighted `losses` list) applied to a
    batch's inputs: with the reference's columns (`reference_inputs(table) -> inputs`), any
    `extra_inputs(inputs, split) -> inputs` the data needs, and BCO's running reward shift (BCO,
    arXiv 2404.04656, sec. 3.2: the mean reward over every batch so far, every process's included)."""

    def __init__(
        self, cfg, data: str, reference_inputs: Callable = pair_reference_inputs, extra_inputs: Callable | None = None
    ):
        self.cfg = cfg
        self.terms = resolve_terms(cfg.loss, cfg.losses, data=data)
        self.reference_inputs, self.extra_inputs = reference_inputs, extra_inputs
        self.reward_shift = RunningMean()  # BCO's delta; unused by other losses

    @property
    def needs_reference(self) -> bool:
        return any(t.spec.needs_reference for t in self.terms)

    def apply(self, recipe: OfflineRecipe, model, batch: TokenBatch, split: str, inputs: dict):
        """Add the reference log-probs and the reward shift to `inputs`, run the terms, and fold the
        batch into the shift. Returns (per-example loss, metrics)."""
        device = next(iter(inputs.values())).device
        inputs["reward_shift"] = torch.tensor(self.reward_shift.value, device=device)
        if self.needs_reference:
            table = recipe.references[split].logps(model, batch, self.cfg.train.logprob_chunk_size, device)
            inputs.update(self.reference_inputs(table))
        if self.extra_inputs is not None:
            inputs.update(self.extra_inputs(inputs, split))
        per_example, metrics = apply_terms(self.terms, inputs)
        if split == "train" and "bco/reward_mean" in metrics:  # every process's batch: the shift stays one
            self.reward_shift.update(recipe.ctx.gather(metrics["bco/reward_mean"]))
        return per_example, metrics

    def state_dict(self) -> dict:
        """What a resumed run needs besides weights and optimizer (BCO's running shift)."""
        return {"reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reward_shift.load_state_dict(state["reward_shift"])


def pair_loss(recipe: OfflineRecipe, model, batch: TokenBatch, split: str, losses: PreferenceLosses):
    """The summed loss and metrics of a chosen/rejected batch under `losses`."""
    out = segment_logps(model, batch, recipe.cfg.train.logprob_chunk_size)
    b = batch.num_examples
    inputs = {
        "policy_chosen_logps": out.logps[:b],
        "policy_rejected_logps": out.logps[b:],
        "chosen_counts": out.counts[:b],
        "rejected_counts": out.counts[b:],
    }
    per_example, metrics = losses.apply(recipe, model, batch, split, inputs)
    metrics["logps/chosen"] = inputs["policy_chosen_logps"].detach()
    metrics["logps/rejected"] = inputs["policy_rejected_logps"].detach()
    return per_example.sum(), metrics


class PreferenceRecipe(OfflineRecipe):
    """Any registered paired loss (or a weighted `losses` list) on preference pairs."""

    name = "dpo"
    pack, pad = collate_packed_groups, collate_pairs

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.losses = PreferenceLosses(cfg, "paired")

    @property
    def terms(self) -> list:
        return self.losses.terms

    @property
    def needs_reference(self) -> bool:
        return self.losses.needs_reference

    def prepare(self) -> PreparedData:
        return prepare_data(
            self.cfg.data, self.cfg.seed, self.tokenizer, formats.load_preference_examples, tokenize_pairs
        )

    def loss(self, model, batch: TokenBatch, split: str):
        return pair_loss(self, model, batch, split, self.losses)

    def state_dict(self) -> dict:
        return self.losses.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.losses.load_state_dict(state)
