"""Examples for a run: load the training (and held-out) records, split off the held-out part, and
carry what happened to the data and where each example came from.

Every recipe loads its data through `load_examples` with its own record loader, so `data.limit`,
`data.columns`, `data.split`, `data.on_bad_record` and the held-out split mean the same thing
whatever the method.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

from alignkit.config import DataConfig
from alignkit.data.reasoning import apply_thinking_to_example, has_reasoning
from alignkit.errors import ConfigError


@dataclass
class PreparedData:
    train: list
    eval: list
    notes: list = field(default_factory=list)  # what happened to the data, shown to the user
    # split -> the source ("pairs.jsonl:17") of each example, by the tokenized item's `index`: for
    # messages that name examples (a non-finite loss) and RUN/heldout.json
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

    def replace(self, train: list | None = None, eval: list | None = None, notes: list | None = None) -> "PreparedData":
        """The same examples' sources with other items (e.g. after a model-dependent step) and new notes."""
        return PreparedData(
            self.train if train is None else train,
            self.eval if eval is None else eval,
            [] if notes is None else notes,
            self.sources,
        )


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


def _thinking(examples: list, d: DataConfig, notes: list) -> list:
    """`data.thinking` applied to every example; a note says how many held reasoning."""
    tags = tuple(d.thinking_tags)
    out = [apply_thinking_to_example(e, d.thinking, tags) for e in examples]
    with_reasoning = sum(has_reasoning(e, tags) for e in examples)
    if with_reasoning:
        notes.append(f"{with_reasoning} of {len(examples)} examples hold reasoning blocks (data.thinking={d.thinking})")
    return out


def load_examples(d: DataConfig, seed: int, loader) -> tuple[list, list, list]:
    """Load train (and eval) examples as `d` (the run's `data` settings) says, with `loader` (a
    `formats.load_*_examples`), holding out a seeded share: (train, held-out, notes)."""
    if not d.train:
        raise ConfigError("`data.train` is not set: give a data file, e.g. `data.train=pairs.jsonl`.")
    read = functools.partial(loader, columns=d.columns or None, on_bad_record=d.on_bad_record, split=d.split)
    result = read(d.train)
    notes = [result.summary()]
    examples = result.examples[: d.limit] if d.limit else result.examples
    examples = _thinking(examples, d, notes)
    if d.eval:
        ev = read(d.eval)
        notes.append(ev.summary())
        return examples, _thinking(ev.examples, d, []), notes
    train, held = split_heldout(examples, d.eval_fraction, seed)
    if held:
        notes.append(
            f"held out {len(held)} of {len(examples)} examples for evaluation (data.eval_fraction={d.eval_fraction})"
        )
    return train, held, notes


def prepare_data(d: DataConfig, seed: int, tokenizer, loader, tokenize_fn) -> PreparedData:
    """Load, split and tokenize train and eval data with a recipe's loader and tokenize function."""
    train, held, notes = load_examples(d, seed, loader)
    train_items, stats = tokenize_fn(train, tokenizer, d.max_length, d.max_prompt_length)
    eval_items, _ = tokenize_fn(held, tokenizer, d.max_length, d.max_prompt_length)
    return PreparedData(
        train_items, eval_items, notes + [stats.summary(d.max_length)], sources=example_sources(train, held)
    )
