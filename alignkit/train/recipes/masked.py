"""`recipe: masked`: Mask-DPO on sentence-labelled pairs; a pair's sums run over its scored
sentences only (the chosen's correct ones, the rejected's incorrect ones).

The masks are applied in the batch layout (unscored tokens get segment -1), so the sums the loop
computes, for the policy and for the cached reference alike, are already the masked sums Mask-DPO
needs (Gu et al., arXiv 2503.02846).
"""

from __future__ import annotations

from alignkit.data.batching import TokenBatch, collate_packed_groups, collate_pairs
from alignkit.data.masked import load_masked_examples, tokenize_masked_pairs
from alignkit.data.splits import PreparedData, prepare_data
from alignkit.data.tokenize import explain
from alignkit.train.base import OfflineRecipe
from alignkit.train.recipes.dpo import PreferenceLosses, pair_loss


def masked_inputs(inputs: dict, split: str) -> dict:
    """Mask-DPO's losses read the (already masked) sums under their own names."""
    return {k.replace("_logps", "_masked_logps"): v for k, v in inputs.items() if k.endswith("_logps")}


class MaskedRecipe(OfflineRecipe):
    name = "masked"
    pack, pad = collate_packed_groups, collate_pairs

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.losses = PreferenceLosses(cfg, "masked", extra_inputs=masked_inputs)

    @property
    def needs_reference(self) -> bool:
        return self.losses.needs_reference

    def prepare(self) -> PreparedData:
        return prepare_data(self.cfg.data, self.cfg.seed, self.tokenizer, load_masked_examples, tokenize_masked_pairs)

    def loss(self, model, batch: TokenBatch, split: str):
        return pair_loss(self, model, batch, split, self.losses)

    def state_dict(self) -> dict:
        return self.losses.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.losses.load_state_dict(state)

    def show_example(self, data: PreparedData, index: int) -> str:
        item, tok = data.train[index], self.tokenizer
        return (
            explain(
                tok,
                item.prompt_ids,
                item.chosen_ids,
                label="chosen",
                scored=item.chosen_mask,
                why="its correct sentences",
            )
            + "\n\n"
            + explain(
                tok,
                item.prompt_ids,
                item.rejected_ids,
                label="rejected",
                scored=item.rejected_mask,
                why="its incorrect sentences",
            )
        )
