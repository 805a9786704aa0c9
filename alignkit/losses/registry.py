"""The loss registry: one function per method, registered by name.

A loss is a pure function of log-probs. Its positional parameters name the inputs it needs
(`policy_chosen_logps`, `ref_rejected_logps`, `chosen_counts`, ...; each tensor is [B], or [B, K]
where an example carries K values: D2O's K samples, a reward model's K objectives); its
keyword-only parameters are hyper-parameters, and their defaults are the documented defaults.
It returns (per-example losses [B], metrics {name: [B] tensor}). The training loop never
branches on a loss name: it reads the spec.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from alignkit.errors import ConfigError
from alignkit.suggest import closest, did_you_mean

if TYPE_CHECKING:  # annotations only: the registry imports nothing heavy at run time
    import torch

# Inputs a preference recipe can provide to a loss.
PAIR_INPUTS = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_counts",
    "rejected_counts",
    "reward_shift",  # bco_pair: running mean of beta * (policy - ref) rewards, see losses/anchored.py
)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., tuple[torch.Tensor, dict]]  # (inputs..., **params) -> (per-example losses [B], metrics)
    summary: str  # one line for `alignkit losses`
    citation: str  # paper title + arXiv id
    data: str  # "paired" or "sft"
    reduction: str  # "example": mean over examples; "token": sum over examples / scored tokens
    inputs: tuple  # positional parameter names
    params: dict  # hyper-parameter name -> default

    @property
    def needs_reference(self) -> bool:
        return any(name.startswith("ref_") for name in self.inputs)


_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, *, summary: str, citation: str, data: str = "paired", reduction: str = "example"):
    def wrap(fn):
        sig = inspect.signature(fn)
        inputs = tuple(p.name for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD)
        params = {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert name not in _REGISTRY, f"loss {name} registered twice"
        _REGISTRY[name] = LossSpec(name, fn, summary, citation, data, reduction, inputs, params)
        return fn

    return wrap


def available() -> list[LossSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def get(name: str) -> LossSpec:
    if name not in _REGISTRY:
        hint = did_you_mean(name, _REGISTRY)
        raise ConfigError(f"`loss.name`: unknown loss `{name}`.{hint} Run `alignkit losses` for the list.")
    return _REGISTRY[name]


def resolve(loss_cfg: dict) -> tuple[LossSpec, dict]:
    """Check a `loss: {name: ..., <param>: ...}` mapping; return the spec and the full parameters."""
    cfg = dict(loss_cfg)
    spec = get(cfg.pop("name"))
    params = dict(spec.params)
    for key, value in cfg.items():
        if key not in spec.params:
            near = closest(key, spec.params)
            hint = f" Did you mean `loss.{near}`?" if near else ""
            valid = ", ".join(spec.params) or "none"
            raise ConfigError(f"`loss.{key}` is not a parameter of `{spec.name}` (its parameters: {valid}).{hint}")
        default = spec.params[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and not isinstance(value, type(default)):
            raise ConfigError(f"`loss.{key}` must be a {type(default).__name__}; got {value!r}.")
        params[key] = value
    return spec, params
