"""Verifiable rewards: checks that code can score exactly, with no reward model.

Each reward has the interface of `alignkit.rewards.functions`,
`reward(prompts, completions, **columns) -> list[float]`, and a readable `name`.

- `NumericMatch`: math word problems with a numeric reference (GSM8K, arXiv 2110.14168, whose
  reference answers end with `#### 72`); the reward for RL with verifiable rewards in GRPO
  (arXiv 2402.03300) and DAPO (arXiv 2503.14476).
- `RegexMatch`: a required format in the answer (rewards read the answer after any reasoning block).
- `ReasoningFormat`: a well-formed reasoning block before the answer (the format reward of
  DeepSeek-R1, arXiv 2501.12948, Sec. 2.2.2), from the `reasoning` column the reward loop fills.
- `LengthLimit`: a word or character budget; a guard against the length exploitation that reward
  models invite.
- `Keywords`: include / avoid given words, the "verifiable instructions" of IFEval (arXiv 2311.07911).
- `WeightedSum`: several of the above (or any reward) combined, with each term's raw values
  available through `components()` so a training loop can log every source separately.

`alignkit.rewards.build_reward` builds any of these (and Python functions and reward models) from a
config value or a command-line argument.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from alignkit.errors import ConfigError, DataError

# A number as people and models write it: "1,000", "$18.00", "-5", ".5", "25%", "42 apples".
# The look-behind rejects digits glued to a word or to another number ("H2O", "v1.2.3", the "5" of
# "3-5"), so a hyphen between two numbers is not read as a minus sign. Currency may come before
# or after the sign ("-$5", "$-5"). Thousands groups must be exactly three digits, so "1,2,3" is
# a list of three numbers, not 123.
_NUMBER = re.compile(
    r"""
    (?<![\w.])
    (?:[$€£¥]\s?)?
    (?P<sign>[-−])?
    (?:[$€£¥]\s?)?
    (?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d) | \d+(?:\.\d+)? | \.\d+)
""",
    re.VERBOSE,
)

MARKER = "####"  # GSM8K's final-answer marker


def _numbers(text: str) -> list[Decimal]:
    out = []
    for m in _NUMBER.finditer(text):
        sign = "-" if m.group("sign") else ""
        out.append(Decimal(sign + m.group("digits").replace(",", "")))
    return out


def extract_number(text: str) -> Decimal | None:
    """The first number in `text` ("$1,000.50 per day" -> 1000.50), or None if there is none.

    The first, because this reads the text right after an answer marker, where units and
    explanations follow the answer ("#### 18 dollars, since 3 * 6 = 18")."""
    numbers = _numbers(text)
    return numbers[0] if numbers else None


def final_answer(text: str, require_marker: bool = False) -> Decimal | None:
    """The final numeric answer of a GSM8K-style text: the first number after the last `####`;
    without a marker, the last number in the text (None with `require_marker=True`).

    A marker with no number after it gives None rather than an earlier number: the model did
    write a final answer, and it was not a number."""
    _, marker, tail = text.rpartition(MARKER)
    if marker:
        return extract_number(tail)
    if require_marker:
        return None
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def numbers_equal(a: Decimal | None, b: Decimal | None) -> bool:
    """Exact equality of two parsed numbers (18 == 18.00, 0.5 == .50); None equals nothing.

    Decimal comparison is numeric and exact, so there is no float rounding to tune a tolerance for."""
    return a is not None and b is not None and a == b


def require(ok, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class NumericMatch:
    """`correct` when the completion's final answer equals the reference's, else `wrong`.

    The reference comes from `columns[answer_column]`: a GSM8K answer string ending in `#### 72`,
    or a bare number."""

    name = "numeric_match"

    def __init__(
        self, answer_column: str = "answer", require_marker: bool = False, correct: float = 1.0, wrong: float = 0.0
    ):
        require(
            isinstance(answer_column, str) and answer_column,
            f"reward numeric_match: `answer_column` must be a column name; got {answer_column!r}.",
        )
        require(
            isinstance(require_marker, bool),
            f"reward numeric_match: `require_marker` must be true or false; got {require_marker!r}.",
        )
        require(
            is_number(correct) and is_number(wrong),
            f"reward numeric_match: `correct` and `wrong` must be numbers; got {correct!r}, {wrong!r}.",
        )
        self.answer_column, self.require_marker = answer_column, require_marker
        self.correct, self.wrong = float(correct), float(wrong)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        if self.answer_column not in columns:
            present = ", ".join(sorted(columns)) or "none"
            raise ConfigError(
                f"reward numeric_match needs the reference answers in column {self.answer_column!r}, "
                f"but the records have columns: {present}. Set `answer_column` to the right one."
            )
        references = columns[self.answer_column]
        if len(references) != len(completions):
            raise ValueError(
                f"reward numeric_match: column {self.answer_column!r} has {len(references)} values "
                f"for {len(completions)} completions"
            )
        out = []
        for i, (completion, reference) in enumerate(zip(completions, references)):
            want = self._reference(reference, i)
            got = final_answer(completion, self.require_marker)
            out.append(self.correct if numbers_equal(got, want) else self.wrong)
        return out

    def _reference(self, reference, i: int) -> Decimal:
        # JSON numbers arrive as int/float; str(float) keeps 0.1 as 0.1 and 1e+20 parseable by Decimal.
        want = (
            Decimal(str(reference))
            if is_number(reference)
            else (final_answer(reference) if isinstance(reference, str) else None)
        )
        if want is None:
            # A reference with no number would make every completion "wrong" without a trace.
            raise DataError(
                f"reward numeric_match: reference {reference!r} (column {self.answer_column!r}, "
                f"item {i} of the batch) has no number; write it as `#### <number>` or a bare number."
            )
        return want


class RegexMatch:
    """1.0 if the completion matches `pattern` (anywhere with `search=True`, the whole completion
    with `search=False`), else 0.0. `.` matches newlines too (DOTALL): completions span lines."""

    name = "regex"

    def __init__(self, pattern: str, search: bool = True):
        require(isinstance(pattern, str), f"reward regex: `pattern` must be a string; got {pattern!r}.")
        require(isinstance(search, bool), f"reward regex: `search` must be true or false; got {search!r}.")
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ConfigError(f"reward regex: invalid pattern {pattern!r}: {e}.") from None
        self.pattern, self.search = pattern, search

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        match = self.regex.search if self.search else self.regex.fullmatch
        return [1.0 if match(c) else 0.0 for c in completions]


class ReasoningFormat:
    """1.0 when the reply had one closed, non-empty reasoning block followed by a non-empty answer
    free of reasoning tags, else 0.0. Reads the `reasoning` column (the text of the reply's block,
    None when it had none), which the reward loop fills from `data.thinking_tags`
    (`rewards.functions.score_ragged`); `completions` are the answers after the block, so a block
    that never closed leaves an empty answer and scores 0."""

    name = "reasoning_format"

    def __init__(self, tags: list | None = None, min_reasoning_words: int = 1):
        tags = ["<think>", "</think>"] if tags is None else tags
        require(
            isinstance(tags, list) and len(tags) == 2 and all(isinstance(t, str) and t for t in tags),
            f"reward reasoning_format: `tags` must be [open, close] strings; got {tags!r}.",
        )
        require(
            _is_count(min_reasoning_words),
            "reward reasoning_format: `min_reasoning_words` must be a non-negative integer; "
            f"got {min_reasoning_words!r}.",
        )
        self.tags, self.min_words = list(tags), min_reasoning_words

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        reasoning = columns.get("reasoning") or [None] * len(completions)
        return [1.0 if self._ok(r, c) else 0.0 for r, c in zip(reasoning, completions)]

    def _ok(self, reasoning, answer: str) -> bool:
        if not isinstance(reasoning, str) or len(reasoning.split()) < max(self.min_words, 1):
            return False
        return bool(answer.strip()) and not any(t in answer for t in self.tags)


class LengthLimit:
    """1.0 when the completion is within every given limit (bounds inclusive), else 0.0.
    Words are whitespace-separated tokens (`str.split()`); characters are `len(completion)`."""

    name = "length"

    def __init__(self, max_words: int | None = None, min_words: int | None = None, max_chars: int | None = None):
        limits = {"max_words": max_words, "min_words": min_words, "max_chars": max_chars}
        require(
            any(v is not None for v in limits.values()),
            "reward length needs at least one of `max_words`, `min_words`, `max_chars`.",
        )
        for key, value in limits.items():
            require(
                value is None or _is_count(value),
                f"reward length: `{key}` must be a non-negative integer; got {value!r}.",
            )
        require(
            min_words is None or max_words is None or min_words <= max_words,
            f"reward length: `min_words` ({min_words}) is above `max_words` ({max_words}); no text can pass.",
        )
        self.max_words, self.min_words, self.max_chars = max_words, min_words, max_chars

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        return [1.0 if self._ok(c) else 0.0 for c in completions]

    def _ok(self, text: str) -> bool:
        words = len(text.split())
        return (
            (self.max_words is None or words <= self.max_words)
            and (self.min_words is None or words >= self.min_words)
            and (self.max_chars is None or len(text) <= self.max_chars)
        )


def _keyword_regex(word: str, case_sensitive: bool) -> re.Pattern:
    # Word boundaries only at ends that are word characters, so "cat" is not found in
    # "concatenate" while "c++" or "?!" still match where they stand.
    body = re.escape(word)
    if re.match(r"\w", word[0]):
        body = r"(?<!\w)" + body
    if re.match(r"\w", word[-1]):
        body += r"(?!\w)"
    return re.compile(body, 0 if case_sensitive else re.IGNORECASE)


class Keywords:
    """Required words present and forbidden words absent (whole words where alphanumeric).

    `required_column`: per-record required words from that column (a list, or a comma-separated
    string), added to `required`: constrained generation where each prompt names its own words
    (CommonGen-style "use these words").
    `partial=True`: the fraction of constraints met (each required word present and each forbidden
    word absent counts one), a denser signal for RL; `partial=False`: 1.0 only if all are met."""

    name = "keywords"

    def __init__(
        self,
        required=(),
        forbidden=(),
        case_sensitive: bool = False,
        partial: bool = True,
        required_column: str | None = None,
    ):
        # A lone string is one keyword; iterating it would make every letter a keyword.
        required = [required] if isinstance(required, str) else list(required)
        forbidden = [forbidden] if isinstance(forbidden, str) else list(forbidden)
        require(
            required or forbidden or required_column,
            "reward keywords needs at least one `required` or `forbidden` keyword, or a `required_column`.",
        )
        require(
            required_column is None or (isinstance(required_column, str) and required_column),
            f"reward keywords: `required_column` must be a column name; got {required_column!r}.",
        )
        for key, words in (("required", required), ("forbidden", forbidden)):
            require(
                all(isinstance(w, str) and w for w in words),
                f"reward keywords: `{key}` must be a list of non-empty strings; got {words!r}.",
            )
        fold = (lambda w: w) if case_sensitive else str.casefold
        both = sorted({fold(w) for w in required} & {fold(w) for w in forbidden})
        require(not both, f"reward keywords: {both} are both required and forbidden; no text can pass.")
        require(isinstance(partial, bool), f"reward keywords: `partial` must be true or false; got {partial!r}.")
        self.required, self.forbidden, self.case_sensitive, self.partial = required, forbidden, case_sensitive, partial
        self.required_column = required_column
        self._required = [_keyword_regex(w, case_sensitive) for w in required]
        self._forbidden = [_keyword_regex(w, case_sensitive) for w in forbidden]

    def _row_words(self, columns: dict, n: int) -> list:
        if self.required_column is None:
            return [[]] * n
        if self.required_column not in columns:
            present = ", ".join(sorted(columns)) or "none"
            raise ConfigError(
                f"reward keywords reads required words from column {self.required_column!r}, but the "
                f"records have columns: {present}. Set `required_column` to the right one."
            )
        rows = []
        for i, value in enumerate(columns[self.required_column]):
            words = [w.strip() for w in value.split(",")] if isinstance(value, str) else value
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                raise DataError(
                    f"reward keywords: record {i} column {self.required_column!r} must be a list of "
                    f"words or a comma-separated string; got {value!r}."
                )
            rows.append([_keyword_regex(w.strip(), self.case_sensitive) for w in words])
        return rows

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        out = []
        for text, extra in zip(completions, self._row_words(columns, len(completions))):
            required = self._required + extra
            total = len(required) + len(self._forbidden)
            met = sum(1 for r in required if r.search(text)) + sum(1 for r in self._forbidden if not r.search(text))
            out.append((met / total if total else 1.0) if self.partial else float(met == total))
        return out

    def __repr__(self) -> str:
        parts = [f"required={self.required}"] if self.required else []
        parts += [f"forbidden={self.forbidden}"] if self.forbidden else []
        parts += [f"required_column={self.required_column!r}"] if self.required_column else []
        return f"Keywords({', '.join(parts)})"


def _reward_name(reward) -> str:
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


class WeightedSum:
    """sum_k w_k r_k(completion) over (reward, weight) terms.

    A loop that logs every reward source should call `components()` once and `combine()` its
    result, so each reward (possibly a reward model) runs once per batch."""

    def __init__(self, terms):
        terms = list(terms)
        require(terms, "a weighted reward needs at least one (reward, weight) term.")
        for reward, weight in terms:
            require(callable(reward), f"weighted reward: {reward!r} is not a reward (a callable).")
            require(
                is_number(weight),
                f"weighted reward: the weight of {_reward_name(reward)} must be a finite number; got {weight!r}.",
            )
        self.terms = [(reward, float(weight)) for reward, weight in terms]
        # Two terms of one kind (two regexes) need distinct keys in the logged components.
        self.names, seen = [], {}
        for reward, _ in self.terms:
            base = _reward_name(reward)
            seen[base] = seen.get(base, 0) + 1
            self.names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        self.name = " + ".join(f"{w:g}*{n}" for n, (_, w) in zip(self.names, self.terms))

    def components(self, prompts: list, completions: list, **columns) -> dict[str, list[float]]:
        """Each term's raw (unweighted) values, keyed by its name."""
        out = {}
        for name, (reward, _) in zip(self.names, self.terms):
            values = [float(v) for v in reward(prompts, completions, **columns)]
            if len(values) != len(completions):
                raise ConfigError(f"reward {name} returned {len(values)} values for {len(completions)} completions")
            out[name] = values
        return out

    def combine(self, components: dict[str, list[float]]) -> list[float]:
        """The weighted sum of values returned by `components()`."""
        weighted = [[w * v for v in components[name]] for name, (_, w) in zip(self.names, self.terms)]
        return [sum(values) for values in zip(*weighted)]

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        return self.combine(self.components(prompts, completions, **columns))


BUILTINS = {
    "numeric_match": NumericMatch,
    "regex": RegexMatch,
    "length": LengthLimit,
    "keywords": Keywords,
    "reasoning_format": ReasoningFormat,
}
