"""Validated, model-independent examples: the output of `alignkit.data.formats`.

Every text is normalised to a list of chat messages (`{"role": ..., "content": ...}`), so that
tokenization has one path. A plain-string record becomes a single user turn (prompt) and a
single assistant turn (completion); `plain_text=True` remembers that, so tokenizers without a
chat template can concatenate the raw strings exactly as given.
"""

from __future__ import annotations

from dataclasses import dataclass

Message = dict  # {"role": "system" | "user" | "assistant" | "tool", "content": str}

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: a shared prompt and two completions, chosen preferred to rejected."""

    prompt: tuple  # tuple[Message, ...]: the conversation before the completions (>= 1 message)
    chosen: tuple  # tuple[Message, ...]: the preferred completion (>= 1 message, ends with assistant)
    rejected: tuple  # tuple[Message, ...]: the dispreferred completion
    source: str  # where it came from, "path:line" or "path:row N", for error messages
    plain_text: bool = False  # the record held plain strings, not message lists


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: a prompt and the completion to imitate."""

    prompt: tuple  # tuple[Message, ...], may be empty for pure language modelling
    completion: tuple  # tuple[Message, ...], >= 1 message
    source: str
    plain_text: bool = False


@dataclass(frozen=True)
class UnpairedExample:
    """One completion with a binary label (thumbs up / down), not paired with another."""

    prompt: tuple  # tuple[Message, ...]
    completion: tuple  # tuple[Message, ...]
    desirable: bool  # True: the completion is good (thumbs up)
    source: str
    plain_text: bool = False


@dataclass(frozen=True)
class MaskedPreferenceExample(PreferenceExample):
    """A pair whose completions carry sentence labels (Mask-DPO): only some characters are scored.

    Spans are (start, end) character ranges in the final assistant message's content: the correct
    sentences of chosen and the incorrect sentences of rejected."""

    chosen_spans: tuple = ()
    rejected_spans: tuple = ()


@dataclass(frozen=True)
class NegativeExample:
    """A prompt and one response a person marked bad, with no good response (D2O's data)."""

    prompt: tuple  # tuple[Message, ...]
    rejected: tuple  # tuple[Message, ...], ends with the assistant reply that was marked bad
    source: str
    plain_text: bool = False
