"""`recipe: masked`: Mask-DPO on sentence-labelled pairs; a pair's sums run over its scored
sentences only (the chosen's correct ones, the rejected's incorrect ones).

The masks are applied in the batch layout (unscored tokens get segment -1), so the sums the loop
computes, for the policy and for the cached reference alike, are already the masked sums Mask-DPO
needs (Gu et al., arXiv 2503.02846).
"""

from __future__ import annotations

from alignkit.data.masked import load_masked_examples, tokenize_masked_pairs
from alignkit.data.splits import PreparedData, prepare_data
from alignkit.data.tokenize import explain
from alignkit.train.recipes.dpo import PreferenceRecipe


class MaskedRecipe(PreferenceRecipe):
    name = "masked"
    data = "masked"

    def prepare(self) -> PreparedData:
        return prepare_data(self.cfg, self.tokenizer, load_masked_examples, tokenize_masked_pairs)

    def extra_inputs(self, inputs: dict, split: str) -> dict:
        return {k.replace("_logps", "_masked_logps"): v for k, v in inputs.items() if k.endswith("_logps")}

    def show_example(self, data: PreparedData, index: int) -> str:
        item, tok = data.train[index], self.tokenizer
        return (explain(tok, item.prompt_ids, item.chosen_ids, label="chosen", scored=item.chosen_mask,
                        why="its correct sentences") + "\n\n"
                + explain(tok, item.prompt_ids, item.rejected_ids, label="rejected", scored=item.rejected_mask,
                          why="its incorrect sentences"))
