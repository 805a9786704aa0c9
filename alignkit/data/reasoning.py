"""Reasoning blocks in assistant replies: split a reply into its reasoning and its final answer,
and decide what offline data trains on (`data.thinking`).

Reasoning models write `<think> ... </think>` before the answer (Qwen3, DeepSeek-R1, SmolLM3,
Phi-4-reasoning; the tags are `data.thinking_tags`). Some templates open the block in the
generation prompt (DeepSeek-R1's ends with `<think>\\n`), so a sampled reply may hold only the
closing tag; a reply cut by a length limit or a thinking budget may hold only the opening one.
`split_reasoning` reads all four shapes. Records may also carry the reasoning in a separate
`reasoning_content` field of the message, as Qwen3's and gpt-oss's templates expect.

`data.thinking` for SFT and preference data:
- `keep`: the reasoning is trained on, written inline before the answer (`<think>R</think>A`);
- `strip`: it is removed; only the answer is trained on;
- `as_template`: the message goes to the chat template with the answer as `content` and the
  reasoning as `reasoning_content`, and the template renders what it renders (Qwen3's keeps the
  reasoning of the final turn and drops it from earlier ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

THINKING_MODES = ("keep", "strip", "as_template")
DEFAULT_TAGS = ("<think>", "</think>")


@dataclass(frozen=True)
class Reply:
    reasoning: str | None  # None: the reply has no reasoning block
    answer: str  # what follows the block ("" when the block never closed)
    closed: bool  # the block was closed (or there was none)

    @property
    def well_formed(self) -> bool:
        """One closed block with some reasoning in it, then a non-empty answer free of tags."""
        return self.reasoning is not None and self.closed and bool(self.reasoning.strip()) and bool(self.answer.strip())


def split_reasoning(text: str, tags=DEFAULT_TAGS) -> Reply:
    """A reply's reasoning and final answer. The block may open at the start of the reply or in the
    prompt (only the closing tag is in the reply); an unclosed block is all reasoning, with no
    answer. Text before an opening tag is not reasoning and stays in the answer's place only when
    no tag follows it, so `"x <think>r</think>a"` reads as reasoning "r", answer "a"."""
    open_tag, close_tag = tags
    start = text.find(open_tag)
    end = text.find(close_tag, start + len(open_tag) if start >= 0 else 0)
    if start < 0 and end < 0:
        return Reply(None, text.strip(), True)
    if end < 0:  # opened, never closed: cut by a length limit or a thinking budget
        return Reply(text[start + len(open_tag) :].strip(), "", False)
    begin = start + len(open_tag) if 0 <= start < end else 0
    answer = text[end + len(close_tag) :]
    if open_tag in answer or close_tag in answer:  # a second block: not well formed, the answer is the rest
        return Reply(text[begin:end].strip(), answer.strip(), False)
    return Reply(text[begin:end].strip(), answer.strip(), True)


def message_reply(message: dict, tags=DEFAULT_TAGS) -> Reply:
    """An assistant message's reasoning and answer, from `reasoning_content` or inline tags."""
    field = message.get("reasoning_content")
    if isinstance(field, str) and field.strip():
        inline = split_reasoning(message["content"], tags)
        return Reply(field.strip(), inline.answer, True)
    return split_reasoning(message["content"], tags)


def apply_thinking(messages, mode: str, tags=DEFAULT_TAGS) -> tuple:
    """`messages` with each assistant turn's reasoning handled as `data.thinking` says (see the
    module docstring); other messages, and assistant turns without reasoning, unchanged."""
    out = []
    for m in messages:
        if m.get("role") != "assistant":
            out.append(m)
            continue
        reply = message_reply(m, tags)
        rest = {k: v for k, v in m.items() if k not in ("content", "reasoning_content")}
        if reply.reasoning is None:
            out.append({**rest, "content": m["content"]})
        elif mode == "keep":
            out.append({**rest, "content": f"{tags[0]}{reply.reasoning}{tags[1]}{reply.answer}"})
        elif mode == "strip":
            out.append({**rest, "content": reply.answer})
        elif mode == "as_template":
            out.append({**rest, "content": reply.answer, "reasoning_content": reply.reasoning})
        else:
            raise ValueError(f"data.thinking must be one of {', '.join(THINKING_MODES)}; got {mode!r}")
    return tuple(out)


def _is_messages(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def apply_thinking_to_example(example, mode: str, tags=DEFAULT_TAGS):
    """A loaded example (any of `data.examples`' dataclasses, nested ones included) with
    `apply_thinking` applied to every message list it holds."""
    if not dataclasses.is_dataclass(example) or isinstance(example, type):
        return example
    changes = {}
    for f in dataclasses.fields(example):
        value = getattr(example, f.name)
        if _is_messages(value):
            changes[f.name] = type(value)(apply_thinking(value, mode, tags))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = apply_thinking_to_example(value, mode, tags)
    return dataclasses.replace(example, **changes) if changes else example


def reasoning_span(tokenizer, completion_ids: list, tags=DEFAULT_TAGS) -> list:
    """One bool per completion token: True for the tokens of a reasoning block, its tags included
    (what `alignkit data show` marks as reasoning)."""
    out, text, inside = [], "", False
    for t in completion_ids:
        text += tokenizer.decode([t])
        now = text.count(tags[0]) > text.count(tags[1])
        out.append(inside or now)
        inside = now
    return out


def has_reasoning(example, tags=DEFAULT_TAGS) -> bool:
    """Whether any assistant message of a loaded example holds a reasoning block."""
    if not dataclasses.is_dataclass(example) or isinstance(example, type):
        return False
    for f in dataclasses.fields(example):
        value = getattr(example, f.name)
        if _is_messages(value):
            if any(m.get("role") == "assistant" and message_reply(m, tags).reasoning is not None for m in value):
                return True
        elif dataclasses.is_dataclass(value) and has_reasoning(value, tags):
            return True
    return False
