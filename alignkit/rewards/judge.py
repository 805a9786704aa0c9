"""A judge that scores replies against written principles, read from its log-probabilities.

The reward follows the idea of SALMON's principle-following reward model (Sun et al., "SALMON:
Self-Alignment with Instructable Reward Models", arXiv 2310.05910): the principles are part of
the judge's input, so changing what the reward asks for means editing a list of sentences, not
collecting preferences and training a new reward model. Here the judge is any instruction-following
`TextModel` (a local model or an OpenAI-compatible endpoint) prompted zero-shot.

    judge = PrincipleJudge(lm, ["Answer the question that was asked.", "Be concise."])
    judge.score(prompts, replies)        # log p("Yes") - log p("No") per reply
    judge.compare(prompts, a, b)         # > 0: a is preferred; both orders averaged
    judge(prompts, completions)          # the reward interface (= score)

The conversations the judge sees come from the templates below (`SCORE_TEMPLATE`,
`COMPARE_TEMPLATE`); pass your own text, or put it in the principles file
(`alignkit.rewards.principles`), to change them. Placeholders are `{principles}`, `{prompt}`, `{reply}`
(scoring) and `{principles}`, `{prompt}`, `{reply_a}`, `{reply_b}` (comparing); every other brace is
left as written, so a template may contain JSON examples.
"""

from __future__ import annotations

import math
import re

from alignkit.errors import AlignkitError
from alignkit.prompt_templates import check_template
from alignkit.rewards.principles import check_lists, load_principles

SCORE_TEMPLATE = """You are checking whether an assistant's reply follows a set of principles.

Principles:
{principles}

The conversation so far:
{prompt}

The assistant's reply:
{reply}

Does the reply follow all of the principles? Answer with one word: Yes or No."""

COMPARE_TEMPLATE = """You are comparing two assistant replies against a set of principles.

Principles:
{principles}

The conversation so far:
{prompt}

Reply A:
{reply_a}

Reply B:
{reply_b}

Which reply follows the principles better? Answer with one letter: A or B."""

YES, NO = "Yes", "No"  # the options read from the judge's next-token distribution
A, B = "A", "B"
SCORE_LIMIT = 20.0  # nats: the score of an answer whose other option has log-prob -inf; see `_difference`

_SCORE_FIELDS = ("principles", "prompt", "reply")
_COMPARE_FIELDS = ("principles", "prompt", "reply_a", "reply_b")
_PLACEHOLDER = re.compile(r"\{(principles|prompt|reply|reply_a|reply_b)\}")


class PrincipleJudge:
    """A reward from a judge model asked whether a reply follows `principles`.

    The judge's answer is read from log-probabilities (`lm.option_logprobs`), not parsed from
    generated text: small models rarely produce a well-formed rating (they add preambles, repeat the
    question, or answer "Yes" and then argue for "No"), and a parser has to guess or drop those
    replies. The log-probability gap between the two answers is defined for every reply, is
    deterministic, and is graded: a judge that is barely sure gives a score near 0.

    `template` / `compare_template`: your own judge prompts (see the module docstring for the
    placeholders); None uses `SCORE_TEMPLATE` / `COMPARE_TEMPLATE`.

    `answers` counts the judge answers read (one per scored reply, two per comparison: both
    orders); `clipped` counts those bounded at +-SCORE_LIMIT because an option's log-prob was -inf
    (only an endpoint without exact log-probs reports that, see `_difference`), and
    `last_clipped[i]` how many of them are behind the i-th value the last `score`/`compare` returned.
    """

    name = "judge"

    def __init__(self, lm, principles: list[str], *, template: str | None = None, compare_template: str | None = None):
        self.lm = lm
        check_lists(principles, [], "PrincipleJudge")
        self.principles = list(principles)
        self.template = check_template(
            SCORE_TEMPLATE if template is None else template, _SCORE_FIELDS, "PrincipleJudge: `template`"
        )
        self.compare_template = check_template(
            COMPARE_TEMPLATE if compare_template is None else compare_template,
            _COMPARE_FIELDS,
            "PrincipleJudge: `compare_template`",
        )
        self.answers, self.clipped, self.last_clipped = 0, 0, []

    @classmethod
    def from_file(cls, lm, path) -> "PrincipleJudge":
        """A judge with the principles (and any templates) of a principles file
        (`alignkit.rewards.principles`); a template missing a placeholder names the file."""
        loaded = load_principles(path)
        where = f"principles file {path}"
        for key, fields in (("template", _SCORE_FIELDS), ("compare_template", _COMPARE_FIELDS)):
            if getattr(loaded, key) is not None:
                check_template(getattr(loaded, key), fields, f"{where}: `{key}`")
        return cls(lm, loaded.principles, template=loaded.template, compare_template=loaded.compare_template)

    def score(self, prompts: list, replies: list) -> list[float]:
        """log p("Yes") - log p("No") for each reply: > 0 when the judge thinks it follows the principles."""
        _same_length(prompts, replies, "replies")
        conversations = [self._conversation(self.template, prompt=p, reply=r) for p, r in zip(prompts, replies)]
        values, self.last_clipped = self._ask(conversations, (YES, NO))
        return values

    def compare(self, prompts: list, a: list, b: list) -> list[float]:
        """How much the judge prefers reply a over reply b: log p("A") - log p("B"), averaged over both orders.

        LLM judges favour one position whatever the replies say (Wang et al., "Large Language
        Models are not Fair Evaluators", arXiv 2305.17926; Zheng et al., arXiv 2306.05685). Asking
        again with the replies swapped and averaging, `(d(a, b) - d(b, a)) / 2`, cancels a constant
        preference for a position: the result is antisymmetric, `compare(p, a, b) = -compare(p, b, a)`,
        and 0 for identical replies."""
        _same_length(prompts, a, "replies a")
        _same_length(prompts, b, "replies b")
        forward = [
            self._conversation(self.compare_template, prompt=p, reply_a=x, reply_b=y) for p, x, y in zip(prompts, a, b)
        ]
        swapped = [
            self._conversation(self.compare_template, prompt=p, reply_a=y, reply_b=x) for p, x, y in zip(prompts, a, b)
        ]
        both, clipped = self._ask(forward + swapped, (A, B))
        n = len(prompts)
        self.last_clipped = [clipped[i] + clipped[n + i] for i in range(n)]
        return [(both[i] - both[n + i]) / 2 for i in range(n)]

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        """The reward interface (`alignkit.rewards.functions`): `score`; other columns are not used."""
        return self.score(prompts, completions)

    def __repr__(self) -> str:
        return f"PrincipleJudge({getattr(self.lm, 'name', type(self.lm).__name__)}, {len(self.principles)} principles)"

    def _conversation(self, template: str, **fields) -> list[dict]:
        values = {"principles": render_principles(self.principles), **fields}
        values["prompt"] = render_prompt(values["prompt"])
        # one pass, so a reply that happens to contain "{prompt}" is not substituted again; a
        # placeholder of the other template ({reply} in a comparison) stays as written
        text = _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), template)
        return [{"role": "user", "content": text}]

    def _ask(self, conversations: list, options: tuple) -> tuple[list[float], list[int]]:
        """(first option's log-prob - second's, 1 where that was bounded else 0) per conversation."""
        if not conversations:
            return [], []
        rows = self.lm.option_logprobs(conversations, list(options))
        if len(rows) != len(conversations):
            raise AlignkitError(
                f"judge {self!r}: option_logprobs returned {len(rows)} rows for {len(conversations)} conversations"
            )
        values = [_difference(row[0], row[1], i, options, self) for i, row in enumerate(rows)]
        clipped = [int(math.isinf(float(r[0]) - float(r[1]))) for r in rows]  # _difference bounded these
        self.answers += len(values)
        self.clipped += sum(clipped)
        return values, clipped


def _difference(first: float, second: float, index: int, options: tuple, judge) -> float:
    """first - second; +-SCORE_LIMIT where one of them is -inf.

    Exact log-probs (a local model, or an endpoint that echoes the log-probs of given text; see
    `EndpointModel.option_logprobs`) are finite, and their difference is the score as it is: a
    bound here would make a judge that strongly favours one position give the same bounded score
    in both orders, and `compare` exactly 0. An endpoint without that reports only its top 20 first
    tokens, so a judge sure of "Yes" gives "No" a log-prob of -inf; an infinite reward would break
    every mean and advantage downstream, so that score becomes +-SCORE_LIMIT (20 nats, a probability
    ratio of about 5e8: the sign is kept, the size is not known) and the judge counts it
    (`PrincipleJudge.clipped`), for the data tools to report. When neither option is among the top
    tokens, the judge did not answer the question at all; that is an error, not a score."""
    first, second = float(first), float(second)
    if first == -math.inf and second == -math.inf:
        raise AlignkitError(
            f"judge {judge!r}: for item {index}, neither {options[0]!r} nor {options[1]!r} is among "
            "the judge model's likely first tokens, so it gives no answer to read; use a model that "
            "follows instructions, or a template that asks for exactly these words."
        )
    if math.isnan(first) or math.isnan(second) or first == math.inf or second == math.inf:
        raise AlignkitError(
            f"judge {judge!r}: for item {index}, the judge model gave the log-probs {first} and "
            f"{second} for {options[0]!r} and {options[1]!r}; a log-prob is a finite number or -inf."
        )
    return max(-SCORE_LIMIT, min(SCORE_LIMIT, first - second)) if math.isinf(first - second) else first - second


def render_principles(principles: list[str]) -> str:
    """A numbered list, one principle a line: "1. ...\\n2. ..."."""
    return "\n".join(f"{i}. {p.strip()}" for i, p in enumerate(principles, 1))


def render_prompt(prompt) -> str:
    """A prompt as the judge reads it: a string as is; a single user message as its text; a longer
    conversation as "User: ...", "Assistant: ..." paragraphs (roles capitalised)."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0]["content"])
    return "\n\n".join(f"{str(m['role']).capitalize()}: {m['content']}" for m in messages)


def _same_length(prompts: list, replies: list, what: str) -> None:
    if len(prompts) != len(replies):
        raise ValueError(f"judge: {len(prompts)} prompts but {len(replies)} {what}; give one per prompt")
