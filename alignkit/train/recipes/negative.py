"""`recipe: negative`: D2O on negative-only data. Each prompt's human-labelled bad response is
trained against K responses sampled from the initial model before training (the paper's offline
setting: Duan et al., Negating Negatives, arXiv 2403.03419).

`prepare` loads the records; `setup` samples (cached on disk, so a resumed run trains on the same
samples) and tokenizes each prompt's group [negative, sample_1..K]. The reference table then has
1 + K columns, computed once like a pair's.
"""

from __future__ import annotations

import torch

from alignkit.data.batching import TokenBatch, collate_groups, collate_packed_groups
from alignkit.data.negative import load_negative_examples, sampling_prompt, tokenize_groups
from alignkit.data.splits import PreparedData, example_sources, load_examples
from alignkit.data.tokenize import explain
from alignkit.generation.cache import cached_samples
from alignkit.generation.decode import sampling_params
from alignkit.logprob_passes import segment_table
from alignkit.logprobs import segment_logps
from alignkit.train.base import OfflineRecipe, SetupContext
from alignkit.train.recipes.dpo import PreferenceLosses


def group_reference_inputs(table: torch.Tensor) -> dict:
    """[B, 1 + K] reference log-probs: the negative, then the K samples."""
    return {"ref_rejected_logps": table[:, 0], "ref_sample_logps": table[:, 1:]}


class NegativeRecipe(OfflineRecipe):
    name = "negative"
    pack, pad = collate_packed_groups, collate_groups

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.losses = PreferenceLosses(cfg, "negative", group_reference_inputs)
        self.sample_files = {}  # split -> cache file of the sampled completions

    @property
    def needs_reference(self) -> bool:
        return self.losses.needs_reference

    def state_dict(self) -> dict:
        return self.losses.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.losses.load_state_dict(state)

    def prepare(self) -> PreparedData:
        train, held, notes = load_examples(self.cfg.data, self.cfg.seed, load_negative_examples)
        notes.append(
            f"{self.cfg.generation.num_samples} completions per prompt will be sampled from the "
            "initial model (generation.num_samples)"
        )
        return PreparedData(train, held, notes, sources=example_sources(train, held))

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData:
        """Sample each prompt's K completions and tokenize the groups (examples -> TokenizedGroups),
        then attach the reference log-probs of the groups."""
        g, d = self.cfg.generation, self.cfg.data
        params = sampling_params(g)
        out: dict[str, list] = {}  # split -> TokenizedGroups
        notes: list[str] = []
        for split, examples in (("train", data.train), ("eval", data.eval)):
            if not examples:
                out[split] = []
                continue
            prompts = [sampling_prompt(self.tokenizer, ex) for ex in examples]
            samples, path = cached_samples(
                model,
                self.tokenizer,
                prompts,
                params,
                seed=self.cfg.seed,
                fingerprint=ctx.fingerprint,
                cache_dir=ctx.cache_root / "samples",
                batch_size=g.batch_size,
                progress=ctx.progress,
                desc=f"sampling {g.num_samples} completions per {split} prompt",
                parallel=ctx,
            )
            self.sample_files[split] = path
            out[split], stats = tokenize_groups(examples, samples, self.tokenizer, d.max_length, d.max_prompt_length)
            notes.append(
                f"{split}: {len(examples)} prompts x {g.num_samples} samples (in {path}); "
                + stats.summary(d.max_length)
            )
        grouped = data.replace(out["train"], out["eval"], notes)
        super().setup(model, grouped, ctx)  # the reference log-probs of the groups
        return grouped

    def loss(self, model, batch: TokenBatch, split: str):
        out = segment_logps(model, batch, self.cfg.train.logprob_chunk_size)
        logps = segment_table(out.logps, batch.num_examples)  # [B, 1 + K]
        counts = segment_table(out.counts, batch.num_examples)
        inputs = {
            "policy_rejected_logps": logps[:, 0],
            "policy_sample_logps": logps[:, 1:],
            "rejected_counts": counts[:, 0],
        }
        per_example, metrics = self.losses.apply(self, model, batch, split, inputs)
        metrics["logps/rejected"] = logps[:, 0].detach()
        metrics["logps/samples"] = logps[:, 1:].mean(dim=1).detach()
        return per_example.sum(), metrics

    def show_example(self, data: PreparedData, index: int) -> str:
        """The negative as training scores it (the samples come from the model when training starts)."""
        d = self.cfg.data
        (group,), _ = tokenize_groups([data.train[index]], [[]], self.tokenizer, d.max_length, d.max_prompt_length)
        return (
            explain(self.tokenizer, group.prompt_ids, group.completions[0], label="rejected")
            + f"\n\n(+ {self.cfg.generation.num_samples} completions sampled from the model when training starts)"
        )
