"""Weighted combinations of registered losses, e.g. DPO + 0.2 * SFT on the chosen completion.

    losses: [{name: dpo, weight: 1.0, beta: 0.1}, {name: sft, weight: 0.2}]

In a pair recipe an `sft` term reads the chosen completion and is normalised per pair (NLL per
token of the chosen completion, averaged over pairs), so every term has the same per-example scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignkit.errors import ConfigError
from alignkit.losses.registry import LossSpec, resolve

if TYPE_CHECKING:  # annotations only: combining terms needs no torch of its own
    import torch

# How an `sft`-data loss reads a pair batch: it trains on the chosen completion.
_CHOSEN_AS_SFT = {"policy_logps": "policy_chosen_logps", "counts": "chosen_counts"}


@dataclass(frozen=True)
class LossTerm:
    spec: LossSpec
    params: dict
    weight: float


def resolve_terms(loss: dict, terms: list, data: str) -> list[LossTerm]:
    """The loss terms of a run: `losses` (a weighted list) when given, else the single `loss`."""
    out = []
    if not terms:
        spec, params = resolve(loss)
        out.append(LossTerm(spec, params, 1.0))
    for i, term in enumerate(terms):
        if not isinstance(term, dict) or "name" not in term:
            raise ConfigError(
                f"`losses[{i}]` must be a mapping with a `name`, e.g. {{name: sft, weight: 0.2}}; got {term!r}."
            )
        term = dict(term)
        weight = term.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"`losses[{i}].weight` must be a number; got {weight!r}.")
        spec, params = resolve(term)
        out.append(LossTerm(spec, params, float(weight)))
    for t in out:
        if t.spec.data not in (data, "sft"):
            raise ConfigError(f"loss `{t.spec.name}` needs {t.spec.data} data; this recipe trains on {data} data.")
    return out


def apply_terms(terms: list[LossTerm], inputs: dict) -> tuple:
    """Per-example weighted sum of the terms, and their metrics (plus `loss/<name>` per term)."""
    total: float | torch.Tensor = 0.0  # a tensor from the first term on
    metrics: dict = {}
    pair_batch = "policy_chosen_logps" in inputs
    for t in terms:
        names = [(_CHOSEN_AS_SFT.get(n, n) if pair_batch else n) for n in t.spec.inputs]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ConfigError(f"loss `{t.spec.name}` needs {', '.join(missing)}, which this recipe does not provide.")
        per_example, m = t.spec.fn(*(inputs[n] for n in names), **t.params)
        if pair_batch and t.spec.reduction == "token":
            per_example = per_example / inputs["chosen_counts"].clamp(min=1)
        total = total + t.weight * per_example
        metrics.update(m)
        if len(terms) > 1:
            metrics[f"loss/{t.spec.name}"] = per_example.detach()
    return total, metrics
