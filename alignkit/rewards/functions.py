"""Python reward functions: `def reward(prompts, completions, **columns) -> list[float]`.

`prompts` are what the model saw (strings or message lists), `completions` the generated texts,
and `columns` any other fields of the data records, one list per field (e.g. `answer` for GSM8K),
so a verifier can compare a completion with its reference answer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from alignkit.data.reasoning import DEFAULT_TAGS, split_reasoning
from alignkit.errors import ConfigError
from alignkit.plugins import load_module


class RewardFunction:
    """A user's reward function, with its output checked: one finite float per completion."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        for key, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(
                    f"reward {self.name}: column {key!r} has {len(values)} values for {len(completions)} completions"
                )
        out = self.fn(prompts, completions, **columns)
        try:
            out = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ConfigError(
                f"reward {self.name} must return a list of numbers, one per completion; got {type(out).__name__}"
            ) from None
        if len(out) != len(completions):
            raise ConfigError(
                f"reward {self.name} returned {len(out)} values for {len(completions)} completions; "
                "return one number per completion"
            )
        bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
        if bad:
            raise ConfigError(
                f"reward {self.name} returned a non-finite value for completion(s) {bad[:5]}; "
                "return finite numbers (use a large negative value for a failure)"
            )
        return out

    def __repr__(self) -> str:
        return f"RewardFunction({self.name})"


def load_reward_function(spec: str) -> RewardFunction:
    """`path/to/file.py:function` or `package.module:function` -> a checked RewardFunction."""
    if ":" not in spec:
        raise ConfigError(f"reward function {spec!r} must look like `file.py:function` or `module:function`.")
    target, _, attr = spec.rpartition(":")
    module = load_module(
        target,
        "reward function file" if target.endswith(".py") else "reward module",
        f"alignkit_reward_{Path(target).stem}",
    )
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(f"{target} has no function {attr!r}; callables found: {', '.join(found[:10]) or 'none'}.")
    return RewardFunction(fn, spec)


def score_ragged(reward, prompts: list, groups: list, columns: dict, tags=DEFAULT_TAGS) -> tuple[list, dict]:
    """Score each prompt's group of completions (groups may differ in size): ([[reward per
    completion]] per prompt, {source: flat values}). Prompts and columns (one value per prompt) are
    repeated for each completion; a weighted sum of rewards (`WeightedSum`) also reports each of its
    sources.

    A completion with a reasoning block (`tags`, `data.thinking_tags`) is scored on its final
    answer, after the block; the block's text goes to the reward as the `reasoning` column (None for
    a completion without one), so a verifier reads the answer and a format reward the block."""
    flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
    texts = [t for g in groups for t in g]
    flat_columns = {k: [v for v, g in zip(values, groups) for _ in g] for k, values in columns.items()}
    if not texts:
        return [[] for _ in groups], {}
    replies = [split_reasoning(t, tuple(tags)) for t in texts] if tags else []
    if any(r.reasoning is not None for r in replies):
        texts = [r.answer if r.reasoning is not None else t for r, t in zip(replies, texts)]
        flat_columns["reasoning"] = [r.reasoning for r in replies]
    if hasattr(reward, "components"):
        parts = reward.components(flat_prompts, texts, **flat_columns)
        total = reward.combine(parts)
    else:
        total = reward(flat_prompts, texts, **flat_columns)
        parts = {getattr(reward, "name", "reward"): total}
    out, start = [], 0
    for g in groups:
        out.append([float(x) for x in total[start : start + len(g)]])
        start += len(g)
    return out, parts


def score_groups(reward, prompts: list, groups: list, columns: dict, tags=DEFAULT_TAGS) -> tuple:
    """`score_ragged` for equal-size groups: (rewards [P, n] float32 tensor, {source: [P * n] values})."""
    import torch

    n = len(groups[0]) if groups else 0
    scores, parts = score_ragged(reward, prompts, groups, columns, tags)
    return torch.tensor(scores, dtype=torch.float32).view(len(groups), n), parts
