"""Instruction rewriting before the model answers ("pre-alignment").

P-Aligner (Song et al., "P-Aligner: Enabling Pre-Alignment of Language Models via Principled
Instruction Synthesis", arXiv 2508.04626) observes that models fail to be helpful, harmless and
honest mostly when the instruction itself is flawed (missing context, ambiguous directives, an
unsuitable tone), and that rewriting the instruction, keeping its intent, before any model answers it
is a cheap way to better replies. The paper trains a small rewriter on UltraPrompt, instructions
found by a principle-guided Monte-Carlo tree search. Departure: we prompt any instruction-following
`TextModel` zero-shot with the principles written into `REWRITE_TEMPLATE` instead of training a
rewriter; a model trained as P-Aligner is (given its own prompt as `template`) can be used the same way.

    out = rewrite(lm, ["write poem dog"], SamplingParams(max_new_tokens=128))
    out[0]            # "Write a short, light-hearted poem about a dog ..."
    out.fallbacks     # indices where the rewrite came back empty and the original was kept
"""

from __future__ import annotations

import re

from alignkit.errors import AlignkitError, ConfigError
from alignkit.prompt_templates import fill_template

REWRITE_TEMPLATE = """Rewrite the instruction below so that an assistant can give the best possible answer to it.
- Keep its intent, and every fact, constraint and requirement it states.
- Make it clear and specific: resolve ambiguity, add the context a good answer needs, and say what
  the answer should contain and its format where that helps.
- Give it a polite, neutral tone.
- Keep it safe, helpful and honest: if it asks for something harmful, ask for the safe, helpful
  version of it instead.
Do not answer the instruction. Reply with the rewritten instruction only.

Instruction:
{instruction}"""

# A label the model may put before its rewrite despite being told not to ("Rewritten instruction: ...").
_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:rewritten|improved|revised|new)\s+(?:instruction|prompt)(?:\*\*)?\s*:\s*", re.IGNORECASE
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "`": "`"}


class Rewrites(list):
    """The rewritten items (a list, in input order), with `fallbacks`: the indices where the model's
    rewrite was empty and the original was kept (so a caller can count and report them)."""

    def __init__(self, items, fallbacks):
        super().__init__(items)
        self.fallbacks = list(fallbacks)


def rewrite_requests(instructions: list[str], template: str | None = None) -> list[list[dict]]:
    """The conversations sent to the rewriting model: one user message per instruction."""
    tpl = REWRITE_TEMPLATE if template is None else template
    out = []
    for i, text in enumerate(instructions):
        if not isinstance(text, str):
            raise AlignkitError(
                f"rewrite: instruction {i} is a {type(text).__name__}, not text; pass strings "
                "(or message lists to `rewrite_messages`)."
            )
        out.append([{"role": "user", "content": fill_template(tpl, "rewrite: `template`", instruction=text)}])
    return out


def parse_rewrite(reply: str) -> str:
    """The rewritten instruction in a model reply: stripped of surrounding space, of a leading label
    ("Rewritten instruction:") and of one pair of wrapping quotes, which small models add although the
    template asks for the instruction only. "" when nothing is left."""
    text = _LABEL.sub("", reply or "", count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        text = text[1:-1].strip()
    return text


def rewrite(
    lm, instructions: list[str], params, seed: int = 0, template: str | None = None, progress: bool = False
) -> Rewrites:
    """Each instruction rewritten by `lm` with `template` (default `REWRITE_TEMPLATE`, which must hold
    `{instruction}`). An empty rewrite keeps the original instruction, listed in `.fallbacks`: a
    missing instruction would drop the example, and an empty one would train on nothing.

    `params.n` must be 1 (one rewrite per instruction)."""
    if params.n != 1:
        raise ConfigError(f"rewrite: one rewrite per instruction; set n=1 in the sampling settings (got n={params.n}).")
    instructions = list(instructions)
    replies = lm.chat(rewrite_requests(instructions, template), params, seed=seed, progress=progress)
    if len(replies) != len(instructions):
        raise AlignkitError(f"rewrite: the model returned {len(replies)} replies for {len(instructions)} instructions.")
    out, fallbacks = [], []
    for i, (original, reply) in enumerate(zip(instructions, replies)):
        text = parse_rewrite(reply[0] if reply else "")
        if not text:
            fallbacks.append(i)
            text = original
        out.append(text)
    return Rewrites(out, fallbacks)


def _a(value) -> str:
    kind = type(value).__name__
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def rewrite_messages(
    lm, conversations: list, params, seed: int = 0, template: str | None = None, progress: bool = False
) -> Rewrites:
    """Conversations (message lists) with their last user message rewritten as `rewrite` does; the
    other messages (a system prompt, earlier turns) are kept as they are. The input is not modified."""
    conversations = list(conversations)
    where = []
    for i, conv in enumerate(conversations):
        if isinstance(conv, (str, bytes)) or not isinstance(conv, (list, tuple)):
            raise AlignkitError(
                f"rewrite: conversation {i} is {_a(conv)}, not a list of messages; pass message lists "
                "here (or strings to `rewrite`)."
            )
        users = [j for j, m in enumerate(conv) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise AlignkitError(
                f"rewrite: conversation {i} has no user message to rewrite; each conversation needs "
                "at least one {'role': 'user', 'content': ...} message."
            )
        content = conv[users[-1]].get("content")
        if not isinstance(content, str):
            # str() of a missing or structured content would send "None" or a dict's repr to be rewritten
            raise AlignkitError(
                f"rewrite: conversation {i}, message {users[-1]} (the last user message) has "
                f"{'no content' if content is None else _a(content) + ' as content'}"
                "; give its text as `content`."
            )
        where.append(users[-1])
    conversations = [list(c) for c in conversations]
    texts = [conv[j]["content"] for conv, j in zip(conversations, where)]
    new = rewrite(lm, texts, params, seed=seed, template=template, progress=progress)
    out = []
    for conv, j, text in zip(conversations, where, new):
        conv[j] = {**conv[j], "content": text}
        out.append(conv)
    return Rewrites(out, new.fallbacks)
