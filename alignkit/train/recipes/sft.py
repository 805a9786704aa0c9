"""`recipe: sft`: supervised fine-tuning, the token-mean NLL of the completions."""

from __future__ import annotations

from alignkit.data import formats
from alignkit.data.batching import TokenBatch, collate_packed_sft, collate_sft
from alignkit.data.splits import PreparedData, prepare_data
from alignkit.data.tokenize import explain, tokenize_sft
from alignkit.logprobs import segment_logps
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.base import OfflineRecipe


class SFTRecipe(OfflineRecipe):
    """Supervised fine-tuning on prompt/completion examples (token-mean NLL)."""

    name = "sft"
    pack, pad = collate_packed_sft, collate_sft

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.terms = resolve_terms(cfg.loss, cfg.losses, data="sft")

    def prepare(self) -> PreparedData:
        return prepare_data(self.cfg.data, self.cfg.seed, self.tokenizer, formats.load_sft_examples, tokenize_sft)

    def weight(self, batch: TokenBatch) -> int:
        return batch.num_scored  # token-mean: each completion token weighs the same

    def loss(self, model, batch: TokenBatch, split: str):
        out = segment_logps(model, batch, self.cfg.train.logprob_chunk_size)
        per_example, metrics = apply_terms(self.terms, {"policy_logps": out.logps, "counts": out.counts})
        metrics["logps"] = out.logps.detach()
        return per_example.sum(), metrics

    def show_example(self, data: PreparedData, index: int) -> str:
        item = data.train[index]
        return explain(self.tokenizer, item.prompt_ids, item.completion_ids)
