"""Environments for multi-turn and tool-using RL (`env.name`; the rollouts are
`alignkit.generation.multiturn`, the training `alignkit.train.episodes`).

An environment runs one episode per rollout: `reset(record)` gives the first messages (from a
prompt record), then each `step(assistant_message)` answers the model's turn with new messages
(tool results, a user's reply), a reward for the turn and whether the episode is over.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from alignkit.errors import ConfigError
from alignkit.plugins import load_module


@dataclass
class StepResult:
    messages: list = field(default_factory=list)  # chat messages that follow the model's turn
    reward: float = 0.0  # this turn's reward (the final one on the last turn)
    done: bool = False


@runtime_checkable
class Environment(Protocol):
    def reset(self, record: dict) -> list:
        """The episode's first chat messages, from one prompt record (its columns included)."""

    def step(self, message: dict) -> StepResult:
        """Answer the model's turn (an assistant message: role, content)."""


# Optional: `schemas`, a list of JSON tool schemas given to the chat template (`tools=`); `tools`,
# {name: (schema, function)}, which `env.tools` replaces; `style`, the tool-call format to parse
# (set from the tokenizer's template); `counts`, {name: number} counters logged as episode/<name>.


# name -> "module:Class" of the built-in environments (imported when named)
ENVIRONMENTS: dict = {
    "calculator": "alignkit.envs.builtin:CalculatorEnvironment",
    "python": "alignkit.envs.builtin:PythonEnvironment",
    "gsm8k_tools": "alignkit.envs.builtin:GSM8KTools",
}


def load_environment_class(spec: str):
    """The environment class `spec` names: a registered name, or `file.py:Class` / `module:Class`.
    One instance is made per rollout, so the class (not an instance) is returned."""
    if spec in ENVIRONMENTS:
        module, _, name = ENVIRONMENTS[spec].partition(":")
        return getattr(importlib.import_module(module), name)
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        known = ", ".join(sorted(ENVIRONMENTS)) or "none yet"
        raise ConfigError(f"environment {spec!r}: give a built-in name ({known}) or `file.py:Class`.")
    module = load_module(target, f"environment {spec!r}: file" if target.endswith(".py") else f"environment {spec!r}")
    cls = getattr(module, name, None)
    if cls is None:
        raise ConfigError(f"environment {spec!r}: {target} has no {name}.")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(
            f"environment {spec!r}: {name} lacks {', '.join(missing)} (an environment has "
            "reset(record) -> messages and step(message) -> StepResult)."
        )
    return cls
