"""Recipes: what a method feeds the shared loop.

A recipe loads and tokenizes its data, collates micro-batches, and turns a batch into a summed
loss plus per-example metrics. The loop (`alignkit.train.loop`) never knows which method runs.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import losses
from alignkit.config import RunConfig
from alignkit.data import formats
from alignkit.data.examples import PreferenceExample
from alignkit.data.batching import (TokenBatch, collate_groups, collate_packed_groups, collate_packed_sft,
                                    collate_pairs, collate_sft)
from alignkit.data.tokenize import tokenize_pairs, tokenize_sft
from alignkit.errors import ConfigError
from alignkit.logprobs import segment_logps
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.reference import example_columns


@dataclass
class PreparedData:
    train: list
    eval: list
    notes: list = field(default_factory=list)  # what happened to the data, shown to the user
    # split -> the source ("pairs.jsonl:17") of each example, by the tokenized item's `index`: for
    # messages that name examples (a non-finite loss) and RUN/heldout.json (`write_heldout_record`)
    sources: dict = field(default_factory=dict)

    @property
    def heldout_sources(self) -> list | None:
        return self.sources.get("eval")

    @property
    def num_train(self) -> int | None:
        return len(self.sources["train"]) if "train" in self.sources else None

    def sources_of(self, split: str, items: list) -> list[str]:
        """Where each tokenized item of `split` came from."""
        return [self.sources[split][it.index] for it in items]


def example_sources(train: list, held: list) -> dict:
    return {"train": [e.source for e in train], "eval": [e.source for e in held]}


def split_heldout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) examples, chosen by a seeded shuffle."""
    n_eval = int(round(fraction * len(examples)))
    if n_eval == 0 or n_eval >= len(examples):
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def load_examples(cfg: RunConfig, loader) -> tuple[list, list, list]:
    """Load train (and eval) examples with `loader` (a `formats.load_*_examples`)."""
    d = cfg.data
    if not d.train:
        raise ConfigError("`data.train` is not set: give a data file, e.g. `data.train=pairs.jsonl`.")
    read = functools.partial(loader, columns=d.columns or None, on_bad_record=d.on_bad_record, split=d.split)
    result = read(d.train)
    notes = [result.summary()]
    examples = result.examples[: d.limit] if d.limit else result.examples
    if d.eval:
        ev = read(d.eval)
        notes.append(ev.summary())
        return examples, ev.examples, notes
    train, held = split_heldout(examples, d.eval_fraction, cfg.seed)
    if held:
        notes.append(f"held out {len(held)} of {len(examples)} examples for evaluation (data.eval_fraction={d.eval_fraction})")
    return train, held, notes


def prepare_data(cfg: RunConfig, tokenizer, loader, tokenize_fn) -> PreparedData:
    """Load, split and tokenize train and eval data with a recipe's loader and tokenize function."""
    train, held, notes = load_examples(cfg, loader)
    d = cfg.data
    train_items, stats = tokenize_fn(train, tokenizer, d.max_length, d.max_prompt_length)
    eval_items, _ = tokenize_fn(held, tokenizer, d.max_length, d.max_prompt_length)
    return PreparedData(train_items, eval_items, notes + [stats.summary(d.max_length)],
                        sources=example_sources(train, held))


def write_heldout_record(cfg: RunConfig, data: PreparedData, run_dir) -> Path:
    """Write RUN/heldout.json: which examples the run held out and the data settings that load them,
    so that `alignkit eval --run` evaluates exactly those (see `alignkit.data.heldout`)."""
    from alignkit.data.heldout import HeldoutRecord, write_heldout

    d = cfg.data
    record = HeldoutRecord(
        data=d.eval or d.train, recipe=cfg.recipe, split=d.split, columns=dict(d.columns or {}),
        on_bad_record=d.on_bad_record, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
        limit=d.limit, eval_fraction=0.0 if d.eval else d.eval_fraction, seed=cfg.seed,
        num_train=data.num_train, sources=data.heldout_sources)
    return write_heldout(run_dir, record)


class SFTRecipe:
    """Supervised fine-tuning on prompt/completion examples (token-mean NLL)."""

    name = "sft"
    needs_reference = False

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.spec, self.params = losses.resolve({"name": "sft"})

    @property
    def shares_prompts(self) -> bool:
        """Whether batches hold each prompt once (packed, prefix-shared layout); the token budget counts so."""
        return self.cfg.train.packing

    def prepare(self) -> PreparedData:
        return prepare_data(self.cfg, self.tokenizer, formats.load_sft_examples, tokenize_sft)

    def collate(self, items) -> TokenBatch:
        t = self.cfg.train
        if t.packing:
            return collate_packed_sft(items, self.tokenizer.pad_token_id, t.pack_tokens)
        return collate_sft(items, self.tokenizer.pad_token_id)

    def weight(self, batch: TokenBatch) -> int:
        return batch.num_scored  # token-mean: each completion token weighs the same

    def loss(self, model, batch: TokenBatch, split: str):
        out = segment_logps(model, batch, self.cfg.train.logprob_chunk_size)
        per_example, metrics = self.spec.fn(out.logps, out.counts, **self.params)
        metrics["logps"] = out.logps.detach()
        return per_example.sum(), metrics


class PreferenceRecipe:
    """The DPO family: any registered paired loss on (prompt, chosen, rejected) examples."""

    name = "dpo"
    data = "paired"

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.terms = resolve_terms(cfg.loss, cfg.losses, data=self.data)
        self.references = {}  # split -> CachedReference | LiveReference
        self.reward_shift = RunningMean()  # BCO's delta; unused by other losses

    @property
    def needs_reference(self) -> bool:
        return any(t.spec.needs_reference for t in self.terms)

    @property
    def shares_prompts(self) -> bool:
        """Whether batches hold each prompt once (packed, prefix-shared layout); the token budget counts so."""
        return self.cfg.train.packing

    def prepare(self) -> PreparedData:
        return prepare_data(self.cfg, self.tokenizer, formats.load_preference_examples, tokenize_pairs)

    def collate(self, items) -> TokenBatch:
        t = self.cfg.train
        if t.packing:
            return collate_packed_groups(items, self.tokenizer.pad_token_id, t.pack_tokens)
        return collate_pairs(items, self.tokenizer.pad_token_id)

    def weight(self, batch: TokenBatch) -> int:
        return batch.num_examples

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
        inputs.update(self.extra_inputs(inputs))
        per_example, metrics = apply_terms(self.terms, inputs)
        if split == "train" and "bco/reward_mean" in metrics:
            self.reward_shift.update(metrics["bco/reward_mean"])
        return per_example, metrics

    def reference_inputs(self, table: torch.Tensor) -> dict:
        """Loss inputs from the batch's [B, S] reference log-probs (columns as in the batch layout)."""
        return {"ref_chosen_logps": table[:, 0], "ref_rejected_logps": table[:, 1]}

    def extra_inputs(self, inputs: dict) -> dict:
        """More loss inputs derived from the standard ones (a subclass hook)."""
        return {}

    def state_dict(self) -> dict:
        """State that a resumed run needs besides weights and optimizer (BCO's running shift)."""
        return {"reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reward_shift.load_state_dict(state["reward_shift"])


class UnpairedRecipe(PreferenceRecipe):
    """KTO / BCO on unpaired records (prompt, completion, desirable label).

    Batches reuse the pair layout: row i holds prompt_i + completion_i and row B+i holds
    prompt_i + a mismatched completion, which KTO's KL baseline needs (KTO paper, sec. 4.1).
    The mismatch is fixed per data set (example i takes the completion of example i+1), unlike
    TRL's in-batch shift, so its reference log-probs can be cached like any pair's. BCO does not
    read the mismatched rows; they cost one extra forward per example until packing lands."""

    name = "unpaired"
    data = "unpaired"

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.terms = resolve_terms(cfg.loss, cfg.losses, data=self.data)
        self.references = {}
        self.labels = {}  # split -> bool tensor by example index
        self.reward_shift = RunningMean()

    def prepare(self) -> PreparedData:
        from alignkit.data.unpaired import load_unpaired_examples

        train, held, notes = load_examples(self.cfg, load_unpaired_examples)
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
        inputs = {"policy_logps": out.logps[:b], "policy_kl_logps": out.logps[b:].detach(),
                  "counts": out.counts[:b], "labels": self.labels[split][batch.example_ids].to(out.logps.device)}
        per_example, metrics = self.apply_losses(model, batch, split, inputs)
        good = inputs["labels"]
        metrics["logps/desirable"] = out.logps[:b][good].detach()
        metrics["logps/undesirable"] = out.logps[:b][~good].detach()
        if "rewards" in metrics:
            metrics["rewards/desirable"] = metrics["rewards"][good]
            metrics["rewards/undesirable"] = metrics["rewards"][~good]
        return per_example.sum(), metrics

    def reference_inputs(self, table: torch.Tensor) -> dict:
        return {"ref_logps": table[:, 0], "ref_kl_logps": table[:, 1]}


class RunningMean:
    """Mean of every value seen so far (BCO's reward shift delta; BCO paper, sec. 3.2)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, values: torch.Tensor) -> None:
        self.total += float(values.detach().float().sum())
        self.count += values.numel()

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = state["total"], state["count"]


def tokenize_unpaired(examples: list, tokenizer, max_length: int, max_prompt_length):
    """Unpaired examples -> TokenizedPairs (completion, mismatched completion)."""
    as_pairs = [
        PreferenceExample(e.prompt, e.completion, examples[(i + 1) % len(examples)].completion, e.source, e.plain_text)
        for i, e in enumerate(examples)
    ]
    return tokenize_pairs(as_pairs, tokenizer, max_length, max_prompt_length)


class MaskedRecipe(PreferenceRecipe):
    """Mask-DPO on sentence-labelled pairs: the pair's sums run over the scored sentences only.

    The masks are applied in the batch layout (unscored tokens get segment -1), so the sums the
    loop computes, for the policy and for the cached reference alike, are already the masked sums
    Mask-DPO needs (arXiv 2503.02846)."""

    name = "masked"
    data = "masked"

    def prepare(self) -> PreparedData:
        from alignkit.data.masked import load_masked_examples, tokenize_masked_pairs

        return prepare_data(self.cfg, self.tokenizer, load_masked_examples, tokenize_masked_pairs)

    def extra_inputs(self, inputs: dict) -> dict:
        return {k.replace("_logps", "_masked_logps"): v for k, v in inputs.items() if k.endswith("_logps")}


class NegativeRecipe(PreferenceRecipe):
    """D2O on negative-only data: each prompt's human-labelled bad response against K responses
    sampled from the initial model before training (the paper's offline setting, arXiv 2403.03419).

    `prepare` loads the records; `prepare_with_model` samples (cached on disk, so a resumed run
    trains on the same samples) and tokenizes each prompt's group [negative, sample_1..K]. The
    reference table then has 1 + K columns, computed once like a pair's."""

    name = "negative"
    data = "negative"

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.sample_files = {}  # split -> cache file of the sampled completions

    def prepare(self) -> PreparedData:
        from alignkit.data.negative import load_negative_examples

        train, held, notes = load_examples(self.cfg, load_negative_examples)
        notes.append(f"{self.cfg.generation.num_samples} completions per prompt will be sampled from the "
                     "initial model (generation.num_samples)")
        return PreparedData(train, held, notes, sources=example_sources(train, held))

    def prepare_with_model(self, model, data: PreparedData, fingerprint: dict, progress: bool = True) -> PreparedData:
        """Sample each prompt's K completions and tokenize the groups (examples -> TokenizedGroups)."""
        from alignkit.data.negative import prompt_text, tokenize_groups
        from alignkit.generation.cache import cached_samples
        from alignkit.generation.hf import SamplingParams
        from alignkit.models import cache_root

        g, d = self.cfg.generation, self.cfg.data
        params = SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k, n=g.num_samples)
        out, notes = {}, []
        for split, examples in (("train", data.train), ("eval", data.eval)):
            if not examples:
                out[split] = []
                continue
            prompts = [prompt_text(self.tokenizer, ex) for ex in examples]
            samples, path = cached_samples(
                model, self.tokenizer, prompts, params, seed=self.cfg.seed, fingerprint=fingerprint,
                cache_dir=cache_root(self.cfg.cache_dir) / "samples", batch_size=g.batch_size, progress=progress,
                desc=f"sampling {g.num_samples} completions per {split} prompt")
            self.sample_files[split] = path
            out[split], stats = tokenize_groups(examples, samples, self.tokenizer, d.max_length, d.max_prompt_length)
            notes.append(f"{split}: {len(examples)} prompts x {g.num_samples} samples (in {path}); "
                         + stats.summary(d.max_length))
        return PreparedData(out["train"], out["eval"], notes, sources=data.sources)

    def collate(self, items) -> TokenBatch:
        t = self.cfg.train
        if t.packing:
            return collate_packed_groups(items, self.tokenizer.pad_token_id, t.pack_tokens)
        return collate_groups(items, self.tokenizer.pad_token_id)

    def loss(self, model, batch: TokenBatch, split: str):
        out = segment_logps(model, batch, self.cfg.train.logprob_chunk_size)
        logps = example_columns(out.logps, batch.num_examples)  # [B, 1 + K]
        counts = example_columns(out.counts, batch.num_examples)
        inputs = {"policy_rejected_logps": logps[:, 0], "policy_sample_logps": logps[:, 1:],
                  "rejected_counts": counts[:, 0]}
        per_example, metrics = self.apply_losses(model, batch, split, inputs)
        metrics["logps/rejected"] = logps[:, 0].detach()
        metrics["logps/samples"] = logps[:, 1:].mean(dim=1).detach()
        return per_example.sum(), metrics

    def reference_inputs(self, table: torch.Tensor) -> dict:
        return {"ref_rejected_logps": table[:, 0], "ref_sample_logps": table[:, 1:]}


RECIPES = {"sft": SFTRecipe, "dpo": PreferenceRecipe, "unpaired": UnpairedRecipe, "masked": MaskedRecipe,
           "negative": NegativeRecipe}


def make_recipe(cfg: RunConfig, tokenizer):
    from alignkit.train.online import ONLINE

    if cfg.recipe in ONLINE:
        return ONLINE[cfg.recipe](cfg, tokenizer)
    if cfg.recipe == "reward":
        from alignkit.train.reward import RewardRecipe

        return RewardRecipe(cfg, tokenizer)
    return RECIPES[cfg.recipe](cfg, tokenizer)


def reference_cache_dir(cfg: RunConfig) -> Path:
    from alignkit.models import cache_root

    return cache_root(cfg.cache_dir) / "reference"
