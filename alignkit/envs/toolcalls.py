"""Tool calls in the model's own chat-template format: find them in a reply, or say why not.

Two formats cover the common open chat templates:
  `hermes`  (Qwen2/Qwen2.5, Hermes, SmolLM3 and others): each call is a block
            <tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3"}}</tool_call>
  `llama3`  (Llama 3.1+): the reply is one JSON object {"name": ..., "parameters": {...}},
            optionally after the <|python_tag|> token's text.
`template_style(tokenizer)` reads which one the tokenizer's chat template speaks. A template with
no tool support (SmolLM2's, for one) gets the fallback: the `hermes` block format, described to
the model in a system message (`fallback_instructions`), so a model can still learn it.

A malformed call (a block that is not JSON, lacks a name, has non-object arguments, or is never
closed) is returned as a `ToolCallError` whose message is shown to the model as the tool's reply;
parsing never raises on model text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCallError:
    """A call the model tried to make and got wrong; `message` is what the model is told."""

    message: str


def template_style(tokenizer) -> str:
    """`hermes`, `llama3`, or `fallback` (the template has no tool support) for `tokenizer`."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = " ".join(str(t) for t in template.values())
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("tools" in template and '"parameters"' in template):
        return "llama3"
    return "fallback"


def _call_from_object(obj, args_key: str):
    if not isinstance(obj, dict):
        return ToolCallError('a tool call must be a JSON object with "name" and "' + args_key + '"')
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError('the tool call has no "name" (a string naming the tool)')
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models send the arguments JSON-encoded
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCallError(f"the arguments of {name} are not a JSON object")
    if not isinstance(args, dict):
        return ToolCallError(f"the arguments of {name} must be a JSON object")
    return ToolCall(name, args)


def parse_tool_calls(text: str, style: str = "hermes") -> list:
    """The tool calls (`ToolCall`) and malformed attempts (`ToolCallError`) in a reply, in order;
    [] when the reply calls no tool (it is an answer)."""
    if style in ("hermes", "fallback"):
        out = []
        for block in _BLOCK.findall(text):
            try:
                out.append(_call_from_object(json.loads(block.strip()), "arguments"))
            except json.JSONDecodeError as e:
                out.append(
                    ToolCallError(
                        f"the tool call is not valid JSON ({e.msg} at character {e.pos}); write "
                        '<tool_call>{"name": ..., "arguments": {...}}</tool_call>'
                    )
                )
        opened, closed = text.count("<tool_call>"), text.count("</tool_call>")
        if opened > closed:
            out.append(ToolCallError("a <tool_call> block was not closed with </tool_call>"))
        return out
    if style == "llama3":
        body = text.split("<|python_tag|>", 1)[-1].strip()
        if not body.startswith("{"):
            return []
        try:
            return [_call_from_object(json.loads(body), "parameters")]
        except json.JSONDecodeError as e:
            return [
                ToolCallError(
                    f"the tool call is not valid JSON ({e.msg} at character {e.pos}); write "
                    '{"name": ..., "parameters": {...}}'
                )
            ]
    raise ValueError(f"parse_tool_calls: unknown style {style!r}; choose hermes, llama3 or fallback")


def fallback_instructions(tools: list) -> str:
    """The system message that teaches a template without tool support the `hermes` block format.
    `tools`: JSON-schema tool descriptions, as for `apply_chat_template(..., tools=...)`."""
    listed = "\n".join(json.dumps(t, sort_keys=True) for t in tools)
    return (
        "You can call these tools:\n" + listed + "\nTo call one, reply with only\n"
        '<tool_call>{"name": <tool name>, "arguments": <JSON object>}</tool_call>\n'
        "and wait for its result. When you know the answer, reply with the answer."
    )
