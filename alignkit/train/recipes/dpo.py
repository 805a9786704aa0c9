"""`recipe: dpo`: the DPO family, any registered paired loss on (prompt, chosen, rejected) examples.

The other offline preference recipes (unpaired, masked, negative) reuse this class: they differ in
the data they read and in how a batch's log-probs become the loss's inputs.
"""

from __future__ import annotations

import torch

from alignkit.data import formats
from alignkit.data.batching import TokenBatch, collate_packed_groups, collate_pairs
from alignkit.data.splits import PreparedData, prepare_data
from alignkit.data.tokenize import tokenize_pairs
from alignkit.logprobs import segment_logps
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.base import OfflineRecipe, RunningMean


class PreferenceRecipe(OfflineRecipe):
    """Any registered paired loss (or a weighted `losses` list) on preference pairs."""

    name = "dpo"
    data = "paired"  # the kind of registered loss it accepts
    pack, pad = collate_packed_groups, collate_pairs

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.terms = resolve_terms(cfg.loss, cfg.losses, data=self.data)
        self.reward_shift = RunningMean()  # BCO's delta; unused by other losses

    @property
    def needs_reference(self) -> bool:
        return any(t.spec.needs_reference for t in self.terms)

    def prepare(self) -> PreparedData:
        return prepare_data(self.cfg, self.tokenizer, formats.load_preference_examples, tokenize_pairs)

    def loss(self, model, batch: TokenBatch, split: str):
        out = segment_logps(model, batch, self.cfg.train.logprob_chunk_size)
        b = batch.num_examples
        inputs = {
            "policy_chosen_logps": out.logps[:b],
            "policy_rejected_logps": out.logps[b:],
            "chosen_counts": out.counts[:b],
            "rejected_counts": out.counts[b:],
        }
        per_example, metrics = self.apply_losses(model, batch, split, inputs)
        metrics["logps/chosen"] = inputs["policy_chosen_logps"].detach()
        metrics["logps/rejected"] = inputs["policy_rejected_logps"].detach()
        return per_example.sum(), metrics

    def apply_losses(self, model, batch: TokenBatch, split: str, inputs: dict):
        """Add the reference log-probs and the BCO reward shift to `inputs`, run the loss terms,
        and fold the batch into the shift."""
        device = next(iter(inputs.values())).device
        inputs["reward_shift"] = torch.tensor(self.reward_shift.value, device=device)
        if self.needs_reference:
            table = self.references[split].logps(model, batch, self.cfg.train.logprob_chunk_size, device)
            inputs.update(self.reference_inputs(table))
        inputs.update(self.extra_inputs(inputs, split))
        per_example, metrics = apply_terms(self.terms, inputs)
        if split == "train" and "bco/reward_mean" in metrics:  # every process's batch: the shift stays one
            self.reward_shift.update(self.ctx.gather(metrics["bco/reward_mean"]))
        return per_example, metrics

    def reference_inputs(self, table: torch.Tensor) -> dict:
        """Loss inputs from the batch's [B, S] reference log-probs (columns as in the batch layout)."""
        return {"ref_chosen_logps": table[:, 0], "ref_rejected_logps": table[:, 1]}

    def extra_inputs(self, inputs: dict, split: str) -> dict:
        """More loss inputs derived from the standard ones (a subclass hook)."""
        return {}

    def state_dict(self) -> dict:
        """State that a resumed run needs besides weights and optimizer (BCO's running shift)."""
        return {"reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reward_shift.load_state_dict(state["reward_shift"])
