"""Prompted data tools with fake models: instruction rewriting (alignkit.inference.rewrite) and
Inverse Constitutional AI (alignkit.datatools.principles), outcomes worked out by hand."""

import pytest

from alignkit.datatools.principles import (
    PROPOSE_TEMPLATE,
    agreement,
    dedupe,
    extract,
    parse_principles,
    propose,
    vote_agreement,
)
from alignkit.errors import AlignkitError, ConfigError
from alignkit.generation.decode import SamplingParams
from alignkit.inference.rewrite import REWRITE_TEMPLATE, rewrite, rewrite_messages
from alignkit.prompt_templates import fill_template

PARAMS = SamplingParams(max_new_tokens=16)


class ScriptedLM:
    """chat() answers the i-th conversation of each call with replies[i]; records the conversations."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.seen = replies, []

    def chat(self, conversations, params, seed=0, on_result=None, progress=False):
        self.seen.append(conversations)
        return [[self.replies[i]] for i in range(len(conversations))]


# ---- rewriting ----


def test_rewrite_parses_replies_and_keeps_the_original_when_empty():
    lm = ScriptedLM(
        [
            "  Rewritten instruction: Write a short poem about a dog.  ",
            "   ",
            '"Explain why the sky is blue, in two sentences."',
        ]
    )
    out = rewrite(lm, ["poem dog", "hi", "sky blue why"], PARAMS)
    assert list(out) == ["Write a short poem about a dog.", "hi", "Explain why the sky is blue, in two sentences."]
    assert out.fallbacks == [1]
    sent = lm.seen[0][0]
    assert sent == [{"role": "user", "content": REWRITE_TEMPLATE.replace("{instruction}", "poem dog")}]


def test_rewrite_messages_rewrites_only_the_last_user_turn():
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    lm = ScriptedLM(["Second, clearly stated.", ""])
    out = rewrite_messages(lm, [conv, [{"role": "user", "content": "only"}]], PARAMS, template="Fix: {instruction}")
    assert out[0] == conv[:3] + [{"role": "user", "content": "Second, clearly stated."}]
    assert out[1] == [{"role": "user", "content": "only"}] and out.fallbacks == [1]
    assert conv[3]["content"] == "second"  # the input is not modified
    assert lm.seen[0][0][0]["content"] == "Fix: second"
    with pytest.raises(AlignkitError, match="conversation 0 has no user message"):
        rewrite_messages(lm, [[{"role": "system", "content": "x"}]], PARAMS)


def test_rewrite_settings_are_checked():
    lm = ScriptedLM(["x"])
    with pytest.raises(ConfigError, match="n=1"):
        rewrite(lm, ["a"], PARAMS.but(n=2))
    with pytest.raises(ConfigError, match=r"lacks \{instruction\}"):
        rewrite(lm, ["a"], PARAMS, template="Rewrite this.")


def test_fill_template_is_one_pass_and_leaves_other_braces():
    tpl = 'Return {"text": ...} for {instruction}'
    assert fill_template(tpl, "t", instruction="say {instruction}") == 'Return {"text": ...} for say {instruction}'


# ---- principles ----


def test_parse_principles():
    reply = (
        "Here are the principles:\n1. Select the response that is concise.\n\n"
        '- "Select the response that is polite."\n3) Third'
    )
    assert parse_principles(reply, 2) == ["Select the response that is concise.", "Select the response that is polite."]
    assert parse_principles(reply, 5)[-1] == "Third"
    assert parse_principles("", 3) == []


def test_dedupe_by_content_word_overlap():
    a = "Select the response that is concise."
    b = "Select the response that is more concise."  # content words {concise}: same as a
    c = "Select the response that answers the question directly."  # {answers, question, directly}
    d = "Select the response that directly answers the user's question."  # 3 shared of 4 with c: 0.75
    e = "Select the response that is polite."  # {polite}
    g = "Select the response that avoids jargon and answers the question."  # with c: 2 shared of 5 = 0.4
    assert dedupe([a, b, c, d, e, "  ", g], threshold=0.6) == [a, c, e, g]
    assert dedupe([a, b, c, d, e, g], threshold=0.4) == [a, c, e]  # 0.4 >= 0.4: g goes
    assert dedupe([a, a, e], threshold=1.0) == [a, e]  # identical always counts
    with pytest.raises(ConfigError, match="threshold"):
        dedupe([a], threshold=0)


class RuleJudge:
    """A judge for one principle: 'polite' prefers the reply with "please", 'short' the shorter one,
    'long' the longer one (margins as plain numbers)."""

    def __init__(self, principle):
        self.rule = next(k for k in ("polite", "short", "long") if k in principle)
        self.calls = 0

    def compare(self, prompts, a, b):
        self.calls += 1
        assert len(prompts) == len(a) == len(b)
        if self.rule == "polite":
            return [("please" in x) - ("please" in y) for x, y in zip(a, b)]
        sign = -1 if self.rule == "short" else 1
        return [sign * (len(x) - len(y)) for x, y in zip(a, b)]


def pair(chosen, rejected, prompt="q"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# Train pairs, with each rule's margin (+ agrees):   polite  short  long
TRAIN = [
    pair("please yes", "no"),  # +1      -8     +8
    pair("ok", "no way"),  #  0      +4     -4
    pair("please", "nope nope"),  # +1      +3     -3
    pair("please do it", "go"),  # +1     -10    +10
    pair("please sure", "no"),
]  # +1      -9     +9
# agreement: polite 4/5 = 0.8 (t1 is a tie), short 2/5 = 0.4, long 3/5 = 0.6

# Held-out pairs:                            polite  long   votes  sum  majority agrees
HELDOUT = [
    pair("please a", "b"),  # +1     +7     +2         yes
    pair("x", "please yy"),  # -1     -8     -2         no
    pair("please", "abcdefg"),  # +1     -1      0     0   no (still tied)
    pair("abcdefgh", "please"),  # -1     +2      0    +1   yes (tie broken by the sum)
    pair("please ok", "n"),  # +1     +8     +2         yes
    pair("please zz", "abcdefghijkl"),
]  # +1  -3      0    -2   no
# held-out: polite 4/6, long 3/6 (h0, h3, h4), majority vote 3/6


def test_agreement_is_the_share_of_pairs_the_judge_gets_right():
    assert agreement(RuleJudge, "Select the response that is polite.", TRAIN) == pytest.approx(0.8)
    assert agreement(RuleJudge, "Select the response that is short.", TRAIN) == pytest.approx(0.4)
    assert agreement(RuleJudge, "Select the response that is long.", TRAIN) == pytest.approx(0.6)
    with pytest.raises(AlignkitError, match="pair 1 has no rejected"):
        agreement(RuleJudge, "polite", [pair("a", "b"), {"prompt": "q", "chosen": "a"}])


def test_vote_agreement_breaks_ties_by_the_summed_margin():
    polite = [1, -1, 1, -1, 1, 1]
    long = [7, -8, -1, 2, 8, -3]
    assert vote_agreement([polite, long]) == pytest.approx(3 / 6)
    assert vote_agreement([polite]) == pytest.approx(4 / 6)
    # three principles: a plain majority, whatever the sizes
    assert vote_agreement([[1.0, -1.0], [1.0, -1.0], [-9.0, 9.0]]) == pytest.approx(1 / 2)


def test_propose_fills_the_template_and_parses_lines():
    lm = ScriptedLM(["1. Select the response that is polite.\n2. Select the response that is short.\n3. Extra"])
    got = propose(lm, [pair("please yes", "no", prompt=[{"role": "user", "content": "hello?"}])], PARAMS, per_pair=2)
    assert got == ["Select the response that is polite.", "Select the response that is short."]
    content = lm.seen[0][0][0]["content"]
    assert content == (
        PROPOSE_TEMPLATE.replace("{prompt}", "hello?")
        .replace("{chosen}", "please yes")
        .replace("{rejected}", "no")
        .replace("{count}", "2")
    )


def test_extract_keeps_the_best_principles_and_checks_them_on_heldout_pairs():
    lm = ScriptedLM(
        [
            "1. Select the response that is polite.",
            "Select the response that is short.",
            "Select the response that is more polite.",  # a duplicate of the first: merged
            "Select the response that is long.",
            "",
        ]
    )  # the last pair gives nothing
    judges = []

    def factory(principle):
        judges.append(RuleJudge(principle))
        return judges[-1]

    found = extract(lm, factory, TRAIN, HELDOUT, max_principles=2)
    assert list(found) == [
        {"principle": "Select the response that is polite.", "train_agreement": 0.8, "heldout_agreement": 4 / 6},
        {"principle": "Select the response that is long.", "train_agreement": 0.6, "heldout_agreement": 3 / 6},
    ]
    assert (found.proposed, found.unique) == (4, 3)
    assert found.vote_agreement == pytest.approx(3 / 6)
    # one judge per unique principle; the kept ones were asked twice (train, held-out), "short" once
    assert [(j.rule, j.calls) for j in judges] == [("polite", 2), ("short", 1), ("long", 2)]


def test_extract_refuses_what_it_cannot_do():
    with pytest.raises(AlignkitError, match="heldout_pairs: no preference pairs"):
        extract(ScriptedLM(["x"]), RuleJudge, TRAIN, [], max_principles=2)
    with pytest.raises(AlignkitError, match="proposed no principles"):
        extract(ScriptedLM(["Principles:", ""] * 3), RuleJudge, TRAIN, HELDOUT)
