"""`recipe: unpaired`: KTO and BCO on unpaired records (prompt, completion, desirable label).

Batches reuse the pair layout: row i holds prompt_i + completion_i and row B+i holds prompt_i + a
mismatched completion, which KTO's KL baseline needs (KTO paper, arXiv 2402.01306, sec. 4.1). The
mismatch is fixed per data set (example i takes the completion of example i+1), unlike TRL's
in-batch shift, so its reference log-probs can be cached like any pair's. BCO does not read the
mismatched rows; they cost one extra forward per example.
"""

from __future__ import annotations

import torch

from alignkit.data.batching import TokenBatch, collate_packed_groups, collate_pairs
from alignkit.data.splits import PreparedData, example_sources, load_examples
from alignkit.data.tokenize import explain
from alignkit.data.unpaired import load_unpaired_examples, tokenize_unpaired
from alignkit.logprobs import segment_logps
from alignkit.train.base import OfflineRecipe
from alignkit.train.recipes.dpo import PreferenceLosses


def unpaired_reference_inputs(table: torch.Tensor) -> dict:
    return {"ref_logps": table[:, 0], "ref_kl_logps": table[:, 1]}


class UnpairedRecipe(OfflineRecipe):
    name = "unpaired"
    pack, pad = collate_packed_groups, collate_pairs

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.losses = PreferenceLosses(cfg, "unpaired", unpaired_reference_inputs, self.kl_anchor_inputs)
        self.terms = self.losses.terms
        self.labels = {}  # split -> bool tensor by example index

    @property
    def needs_reference(self) -> bool:
        return self.losses.needs_reference

    def state_dict(self) -> dict:
        return self.losses.state_dict()  # BCO's running reward shift

    def load_state_dict(self, state: dict) -> None:
        self.losses.load_state_dict(state)

    def prepare(self) -> PreparedData:
        train, held, notes = load_examples(self.cfg.data, self.cfg.seed, load_unpaired_examples)
        d = self.cfg.data
        out = []
        for split, examples in (("train", train), ("eval", held)):
            items, stats = tokenize_unpaired(examples, self.tokenizer, d.max_length, d.max_prompt_length)
            self.labels[split] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
            out.append(items)
            if split == "train":
                notes.append(stats.summary(d.max_length))
                n_good = int(self.labels["train"].sum())
                notes.append(f"{n_good} desirable and {len(examples) - n_good} undesirable training completions")
        return PreparedData(out[0], out[1], notes, sources=example_sources(train, held))

    def loss(self, model, batch: TokenBatch, split: str):
        out = segment_logps(model, batch, self.cfg.train.logprob_chunk_size)
        b = batch.num_examples
        inputs = {
            "policy_logps": out.logps[:b],
            "policy_kl_logps": out.logps[b:].detach(),
            "counts": out.counts[:b],
            "labels": self.labels[split][batch.example_ids].to(out.logps.device),
        }
        per_example, metrics = self.losses.apply(self, model, batch, split, inputs)
        good = inputs["labels"]
        metrics["logps/desirable"] = out.logps[:b][good].detach()
        metrics["logps/undesirable"] = out.logps[:b][~good].detach()
        if "rewards" in metrics:
            metrics["rewards/desirable"] = metrics["rewards"][good]
            metrics["rewards/undesirable"] = metrics["rewards"][~good]
        return per_example.sum(), metrics

    def kl_anchor_inputs(self, inputs: dict, split: str) -> dict:
        """In training, KTO's KL anchor z0 is a mean over the whole global micro-batch (every
        process's mismatched pairs, as one process with all of them computes it; TRL also gathers
        it across ranks). Evaluation keeps each batch's own (processes evaluate different numbers
        of batches, so there is nothing to gather with)."""
        if split != "train":
            return {}
        return {k: self.ctx.gather(inputs[k].detach()) for k in ("policy_kl_logps", "ref_kl_logps") if k in inputs}

    def show_example(self, data: PreparedData, index: int) -> str:
        """The labelled completion (scored) and the KL-baseline completion (never scored)."""
        item, tok = data.train[index], self.tokenizer
        good = bool(self.labels["train"][index])
        readers = [t.spec.name for t in self.terms if "policy_kl_logps" in t.spec.inputs]
        others = [t.spec.name for t in self.terms if t.spec.name not in readers]
        why = "; ".join(
            [f"{', '.join(readers)} reads it only for its KL estimate z0 (detached: no gradient)"] * bool(readers)
            + [f"{', '.join(others)} does not read it"] * bool(others)
        )
        return (
            explain(
                tok, item.prompt_ids, item.chosen_ids, label=f"completion ({'desirable' if good else 'undesirable'})"
            )
            + "\n\n"
            + explain(
                tok,
                item.prompt_ids,
                item.rejected_ids,
                scored=False,
                why=why,
                label="KL baseline (the next example's completion, mismatched to this prompt)",
            )
        )
