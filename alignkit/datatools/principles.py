"""Find the written principles that explain a set of preferences (a "constitution" read from data).

Inverse Constitutional AI (Findeis et al., "Inverse Constitutional AI: Compressing Preferences into
Principles", arXiv 2406.06560) turns pairwise preferences into a short list of principles that a
judge model, given the list, can use to reproduce them: (1) an LLM proposes, for each pair, principles
that would explain why the chosen reply won; (2) near-duplicates are merged; (3) each principle is
tested: a judge given only that principle picks between the two replies of every training pair, and
a principle's agreement is the share of pairs where the judge picks the chosen one; (4) the principles
that agree most are kept, and the kept list is checked on held-out pairs.

    judge_factory = lambda p: PrincipleJudge(lm, [p])        # alignkit.rewards.judge
    found = extract(lm, judge_factory, train_pairs, heldout_pairs, max_principles=5)
    found[0]             # {"principle": ..., "train_agreement": 0.81, "heldout_agreement": 0.77}
    found.vote_agreement  # held-out pairs where the kept principles' majority vote picks the chosen reply

Agreement 0.5 is chance: a judge that guesses, or a principle that says nothing about the pairs,
picks the chosen reply half the time; below 0.5 a principle explains the opposite preference.
Departures from the paper: near-duplicates are merged by word overlap (`dedupe`) instead of
embedding clusters summarised by an LLM, which is deterministic and needs no second model; and the
held-out check votes with the kept principles one by one rather than giving the judge the whole list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Protocol

from alignkit.errors import AlignkitError, ConfigError
from alignkit.prompt_templates import fill_template
from alignkit.rewards.judge import render_prompt

PROPOSE_TEMPLATE = """A person compared two replies to the same conversation and preferred reply A to reply B.

Conversation:
{prompt}

Reply A (preferred):
{chosen}

Reply B (not preferred):
{rejected}

Write {count} principle(s) that explain why reply A was preferred. Each principle is one line, a general
rule that a judge could apply to other conversations (do not mention this conversation's topic),
written as "Select the response that ...". Write the principles only, one per line."""

_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.)]|#+)\s*")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Words every principle shares ("Select the response that is ...") or that carry no content; left out
# of the word overlap, else any two principles of the template's form look alike.
_COMMON = frozenset(
    """select choose prefer pick the a an response responses reply replies answer that which
is are be more most less least and or of to in on for with it its as by than""".split()
)


class Comparer(Protocol):
    def compare(self, prompts: list, a: list, b: list) -> list[float]:
        """For each prompt, > 0 when reply a is preferred to reply b (e.g. `PrincipleJudge.compare`)."""


class ExtractedPrinciples(list):
    """The kept principles' records (a list of dicts, best training agreement first), with counts:
    `proposed` (principles parsed from the model's replies), `unique` (left after `dedupe`) and
    `vote_agreement` (share of held-out pairs where the kept principles' majority vote agrees)."""

    def __init__(self, records, *, proposed: int, unique: int, vote_agreement: float):
        super().__init__(records)
        self.proposed, self.unique, self.vote_agreement = proposed, unique, vote_agreement


def _as_text(x) -> str:
    """A prompt or reply as text, rendered as the principle judge renders prompts (`render_prompt`),
    so the proposer and the judge read the same conversation."""
    return render_prompt(x)


def _check_pairs(pairs, where: str, hint: str = "") -> list[dict]:
    pairs = list(pairs)
    if not pairs:
        raise AlignkitError(
            f"{where}: no preference pairs; give at least one {{prompt, chosen, rejected}} record{hint}."
        )
    for i, p in enumerate(pairs):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(p, dict) or k not in p]
        if missing:
            raise AlignkitError(
                f"{where}: pair {i} has no {', '.join(missing)}; each pair needs prompt, chosen and rejected."
            )
    return pairs


def propose_requests(pairs: list, per_pair: int = 1, template: str | None = None) -> list[list[dict]]:
    """The conversations sent to the proposing model: one user message per pair."""
    tpl = PROPOSE_TEMPLATE if template is None else template
    return [
        [
            {
                "role": "user",
                "content": fill_template(
                    tpl,
                    "propose: `template`",
                    prompt=_as_text(p["prompt"]),
                    chosen=_as_text(p["chosen"]),
                    rejected=_as_text(p["rejected"]),
                    count=per_pair,
                ),
            }
        ]
        for p in _check_pairs(pairs, "propose")
    ]


def parse_principles(reply: str, limit: int) -> list[str]:
    """Up to `limit` principles from a reply, one per line: list markers ("1.", "-", "*") and
    wrapping quotes removed; blank lines and headers (a line ending in ":") skipped."""
    out = []
    for line in (reply or "").splitlines():
        text = _BULLET.sub("", line, count=1).strip().strip('"\u201c\u201d').strip()
        if not text or text.endswith(":"):
            continue
        out.append(text)
        if len(out) == limit:
            break
    return out


def propose(
    lm, pairs: list, params, seed: int = 0, per_pair: int = 1, *, template: str | None = None, progress: bool = False
) -> list[str]:
    """Candidate principles: `lm` asked (`PROPOSE_TEMPLATE`: `{prompt}`, `{chosen}`, `{rejected}`,
    `{count}`) why each pair's chosen reply was preferred; up to `per_pair` lines from each of its
    `params.n` replies, in pair order. Duplicates are kept (see `dedupe`)."""
    if per_pair < 1:
        raise ConfigError(f"propose: per_pair must be at least 1; got {per_pair}.")
    requests = propose_requests(pairs, per_pair, template)
    replies = lm.chat(requests, params, seed=seed, progress=progress)
    if len(replies) != len(requests):
        raise AlignkitError(f"propose: the model returned {len(replies)} replies for {len(requests)} pairs.")
    return [p for group in replies for reply in group for p in parse_principles(reply, per_pair)]


def _words(principle: str) -> frozenset:
    words = _WORD.findall(principle.lower())
    content = frozenset(w for w in words if w not in _COMMON)
    return content or frozenset(words)


def dedupe(principles: list[str], threshold: float = 0.6) -> list[str]:
    """The principles without near-duplicates: in input order, one is dropped when the Jaccard
    overlap |A & B| / |A | B| of its content words (lower case, with the words every principle
    shares, "select the response that is ...", left out) with an earlier kept one is >= `threshold`.
    Empty principles are dropped; identical ones always count as duplicates."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"dedupe: threshold is a word-overlap share in (0, 1]; got {threshold}.")
    kept, kept_words = [], []
    for p in principles:
        if not p.strip():
            continue
        words = _words(p)
        if any(w == words or len(w & words) / len(w | words) >= threshold for w in kept_words):
            continue
        kept.append(p.strip())
        kept_words.append(words)
    return kept


def _margins(judge: Comparer, pairs: list, principle: str) -> list[float]:
    margins = [
        float(x)
        for x in judge.compare(
            [p["prompt"] for p in pairs],
            [_as_text(p["chosen"]) for p in pairs],
            [_as_text(p["rejected"]) for p in pairs],
        )
    ]
    if len(margins) != len(pairs):
        raise AlignkitError(f"the judge for {principle!r} returned {len(margins)} comparisons for {len(pairs)} pairs.")
    if any(math.isnan(m) for m in margins):
        raise AlignkitError(f"the judge for {principle!r} returned NaN comparisons.")
    return margins


def agreement(judge_factory: Callable[[str], Comparer], principle: str, pairs: list) -> float:
    """Share of `pairs` where a judge given only `principle` prefers the chosen reply
    (`judge_factory(principle).compare(prompt, chosen, rejected) > 0`). 0.5 is chance; an exact tie
    counts as not agreeing."""
    pairs = _check_pairs(pairs, "agreement")
    margins = _margins(judge_factory(principle), pairs, principle)
    return sum(m > 0 for m in margins) / len(margins)


def vote_agreement(margins: list[list[float]]) -> float:
    """Share of pairs where the principles' majority vote prefers the chosen reply.

    `margins[k][j]`: principle k's comparison on pair j. Each principle votes for the reply it
    prefers (none on a tie); a tied vote goes to the sign of the summed margins (the weight of the
    evidence), and a pair that stays tied counts as not agreeing. Without the tie-break an even number
    of principles would tie often and sit below chance."""
    if not margins:
        raise ValueError("vote_agreement: no principles to vote.")
    agree = 0
    for column in zip(*margins):
        votes = sum((m > 0) - (m < 0) for m in column)
        agree += votes > 0 or (votes == 0 and sum(column) > 0)
    return agree / len(margins[0])


def extract(
    lm,
    judge_factory: Callable[[str], Comparer],
    train_pairs: list,
    heldout_pairs: list,
    *,
    max_principles: int = 5,
    params=None,
    seed: int = 0,
    per_pair: int = 1,
    dedupe_threshold: float = 0.6,
    template: str | None = None,
    progress: bool = False,
) -> ExtractedPrinciples:
    """Inverse Constitutional AI, end to end (see the module docstring): propose principles from
    `train_pairs`, `dedupe` them, measure each one's agreement on `train_pairs`, keep the
    `max_principles` best (ties: the earlier proposed), and measure each kept one, and their majority
    vote (`vote_agreement`), on `heldout_pairs`, which the principles were not drawn from.

    Returns the records {"principle", "train_agreement", "heldout_agreement"}, best first, as a
    `ExtractedPrinciples` list that also carries the counts. 0.5 is chance. `params`: sampling settings for
    proposing (None: greedy, 128 new tokens)."""
    from alignkit.generation.decode import SamplingParams

    if max_principles < 1:
        raise ConfigError(f"extract: max_principles must be at least 1; got {max_principles}.")
    train_pairs = _check_pairs(train_pairs, "extract: train_pairs")
    heldout_pairs = _check_pairs(
        heldout_pairs,
        "extract: heldout_pairs",
        " (hold out some of your pairs, e.g. a fifth, to check the principles on pairs they were not drawn from)",
    )
    params = SamplingParams(max_new_tokens=128) if params is None else params
    proposed = propose(lm, train_pairs, params, seed=seed, per_pair=per_pair, template=template, progress=progress)
    unique = dedupe(proposed, dedupe_threshold)
    if not unique:
        raise AlignkitError(
            f"extract: the model proposed no principles for {len(train_pairs)} pairs (every reply was "
            "empty or a header); use a model that follows instructions, more max_new_tokens, or your "
            "own template."
        )
    from tqdm.auto import tqdm

    scored = []
    for order, principle in enumerate(tqdm(unique, desc="testing principles", disable=not progress)):
        judge = judge_factory(principle)
        margins = _margins(judge, train_pairs, principle)
        scored.append((sum(m > 0 for m in margins) / len(margins), order, principle, judge))
    scored.sort(key=lambda s: (-s[0], s[1]))
    records, heldout_margins = [], []
    for train_agreement, _, principle, judge in tqdm(
        scored[:max_principles], desc="held-out check", disable=not progress
    ):
        margins = _margins(judge, heldout_pairs, principle)
        heldout_margins.append(margins)
        records.append(
            {
                "principle": principle,
                "train_agreement": train_agreement,
                "heldout_agreement": sum(m > 0 for m in margins) / len(margins),
            }
        )
    return ExtractedPrinciples(
        records, proposed=len(proposed), unique=len(unique), vote_agreement=vote_agreement(heldout_margins)
    )
