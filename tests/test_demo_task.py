"""The demo task's judge, pair construction and train/held-out split (pure Python, fast)."""

import pytest

from alignkit import demo_task as T
from alignkit.demo_task import DemoPrompt


def _item(constraint, phrase=None):
    instr = {"lowercase": "Use only lowercase letters in your reply.",
             "uppercase": "Use only capital letters in your reply.",
             "quotes": "Put your whole reply inside double quotes.",
             "end_phrase": f'End your reply with the exact phrase "{phrase}"'}[constraint]
    return DemoPrompt("cats", "Write one sentence about cats.", constraint, instr, phrase)


LOW, UP, QUO = _item("lowercase"), _item("uppercase"), _item("quotes")
END = _item("end_phrase", "Good luck!")


@pytest.mark.parametrize("item,response,expected", [
    # lowercase
    (LOW, "cats are curious animals that love to nap.", True),
    (LOW, "  cats purr when they're happy, and they nap a lot!  ", True),
    (LOW, "Cats are curious animals that love to nap.", False),  # one capital letter
    (LOW, "cats are curious animals named Tom.", False),
    (LOW, "cats nap.", False),  # fewer than 3 words: degenerate
    (LOW, "123 456 789", False),  # no letters at all
    (LOW, "", False),
    # uppercase
    (UP, "CATS ARE CURIOUS ANIMALS.", True),
    (UP, "CATS ARE CURIOUS, 100% OF THE TIME!", True),
    (UP, "CATS ARE CURIOUs ANIMALS.", False),
    (UP, "Cats are curious animals.", False),
    (UP, "CATS NAP.", False),
    # quotes
    (QUO, '"Cats are curious animals."', True),
    (QUO, "\u201cCats are curious animals.\u201d", True),
    (QUO, '  "Cats are curious animals."\n', True),
    (QUO, '"Cats" are curious animals.', False),  # quotes around one word only
    (QUO, 'Cats are curious animals.', False),
    (QUO, '"Cats are curious animals.', False),  # not closed
    (QUO, '"Cats nap."', False),  # too short inside
    (QUO, '""', False),
    # end_phrase
    (END, "Cats are curious animals. Good luck!", True),
    (END, "Cats are curious animals. Good luck!  \n", True),
    (END, "Cats are curious animals. Good luck", False),  # punctuation is part of the phrase
    (END, "Cats are curious animals. good luck!", False),  # case matters
    (END, "Good luck! Cats are curious animals.", False),  # at the start, not the end
    (END, "Good luck!", False),  # the bare phrase is degenerate
    (END, "Cats nap. Good luck!", False),  # fewer than 3 words of its own
])
def test_judge(item, response, expected):
    assert T.judge(item, response) is expected


def test_judge_unknown_constraint():
    with pytest.raises(ValueError, match="unknown constraint"):
        T.judge(DemoPrompt("cats", "x", "haiku", "y"), "a b c")


@pytest.mark.parametrize("item,response,chosen", [
    (LOW, "Cats are Curious animals.", "cats are curious animals."),
    (UP, "Cats are curious animals.", "CATS ARE CURIOUS ANIMALS."),
    (QUO, "Cats are curious animals.", '"Cats are curious animals."'),
    (QUO, '"Cats are curious animals.', '"Cats are curious animals."'),  # no doubled quote
    (END, "Cats are curious animals.", "Cats are curious animals. Good luck!"),
])
def test_preference_pair(item, response, chosen):
    pair = T.preference_pair(item, response)
    assert pair == (chosen, response.strip())
    assert T.judge(item, pair[0]) and not T.judge(item, pair[1])


@pytest.mark.parametrize("item,response", [
    (LOW, "cats are curious animals."),  # already follows: nothing to prefer
    (LOW, "Cats are curious animals that love to"),  # cut off mid-sentence
    (UP, "Cats nap."),  # too short
])
def test_preference_pair_skips(item, response):
    assert T.preference_pair(item, response) is None


def test_split_is_disjoint_and_seed_independent():
    assert not set(T.TRAIN_TOPICS) & set(T.HELDOUT_TOPICS)
    assert not set(T.TRAIN_PHRASES) & set(T.HELDOUT_PHRASES)
    held = T.heldout_prompts(200)
    for seed in (0, 1, 7):
        train = T.train_prompts(400, seed=seed)
        assert not {p.topic for p in train} & {p.topic for p in held}
        assert not {p.text for p in train} & {p.text for p in held}
        assert not {p.phrase for p in train if p.phrase} & {p.phrase for p in held if p.phrase}
        for p in held:  # no training topic or phrase appears anywhere in a held-out prompt
            assert p.topic in T.HELDOUT_TOPICS
            assert p.phrase is None or p.phrase in T.HELDOUT_PHRASES


def test_prompts_deterministic_distinct_balanced():
    a, b = T.heldout_prompts(200, seed=0), T.heldout_prompts(200, seed=0)
    assert a == b
    assert T.train_prompts(100, seed=1) != T.train_prompts(100, seed=2)
    assert len({p.text for p in a}) == 200
    assert {c: sum(p.constraint == c for p in a) for c in T.CONSTRAINTS} == {c: 50 for c in T.CONSTRAINTS}
    end = [p for p in a if p.constraint == "end_phrase"]
    assert all(f'"{p.phrase}"' in p.text for p in end)
    assert a[0].messages() == [{"role": "user", "content": a[0].text}]
    assert a[0].text.startswith(a[0].request)


def test_side_checks():
    assert T.mentions_topic(DemoPrompt("libraries", "r", "quotes", "i"), "A Library is quiet.")
    assert T.mentions_topic(DemoPrompt("wolves", "r", "quotes", "i"), "The wolf howls.")
    assert not T.mentions_topic(DemoPrompt("cats", "r", "quotes", "i"), "Dogs bark.")
    assert T.breaks_format_unasked("cats are nice.")
    assert T.breaks_format_unasked("CATS ARE NICE.")
    assert T.breaks_format_unasked('"Cats are nice."')
    assert not T.breaks_format_unasked("Cats are nice.")
