"""A reward from several reward models (or any rewards), combined conservatively.

An ensemble of reward models disagrees most where the policy has left the data they were trained
on, which is where a single model is easiest to exploit. Combining the members conservatively
(their minimum, or their mean less k standard deviations) makes over-optimisation pay less
(Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization", arXiv 2310.02743: worst-case
and uncertainty-weighted optimisation), and the disagreement itself is a warning the health monitor
reads (`reward/ensemble_std`, the `over_optimisation` rule). Members can be reward models trained
with different seeds, LoRA members, or one weight-averaged model (WARM, arXiv 2401.12187:
`alignkit average`), or any reward alignkit takes.

Spec: `{name: ensemble, members: [SPEC, ...], combine: mean | min | mean_minus_std, k: 1.0}`.
"""

from __future__ import annotations

import math

from alignkit.errors import ConfigError

COMBINE = ("mean", "min", "mean_minus_std")


class EnsembleReward:
    """Members' rewards per completion, combined by `combine`; `components` also reports the
    members' standard deviation (`ensemble_std`), which a training loop logs."""

    def __init__(self, members: list, names: list, combine: str = "mean", k: float = 1.0):
        if len(members) < 2:
            raise ConfigError(f"reward ensemble: give at least two `members`; got {len(members)}.")
        if combine not in COMBINE:
            raise ConfigError(f"reward ensemble: `combine` must be one of {', '.join(COMBINE)}; got {combine!r}.")
        if isinstance(k, bool) or not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 0):
            raise ConfigError(f"reward ensemble: `k` must be a number >= 0; got {k!r}.")
        self.members, self.member_names, self.how, self.k = list(members), list(names), combine, float(k)
        self.name = f"ensemble_{combine}"

    def components(self, prompts: list, completions: list, **columns) -> dict[str, list[float]]:
        """{member name: its values, ..., "ensemble_std": the members' (population) standard deviation}."""
        out = {}
        for name, reward in zip(self.member_names, self.members):
            values = [float(v) for v in reward(prompts, completions, **columns)]
            if len(values) != len(completions):
                raise ConfigError(f"reward {name} returned {len(values)} values for {len(completions)} completions")
            out[name] = values
        columns_ = list(zip(*(out[n] for n in self.member_names)))
        out["ensemble_std"] = [_std(v) for v in columns_]
        return out

    def combine(self, components: dict[str, list[float]]) -> list[float]:
        rows = list(zip(*(components[n] for n in self.member_names)))
        if self.how == "min":
            return [min(v) for v in rows]
        means = [sum(v) / len(v) for v in rows]
        if self.how == "mean":
            return means
        return [m - self.k * s for m, s in zip(means, components["ensemble_std"])]

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        return self.combine(self.components(prompts, completions, **columns))

    def __repr__(self) -> str:
        return f"EnsembleReward({self.how}, {', '.join(self.member_names)})"


def _std(values) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
