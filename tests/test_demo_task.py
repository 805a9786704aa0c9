"""The demo task's judge, pair construction and train/held-out split (pure Python, fast)."""

import pytest

from alignkit import demo_task as T
from alignkit.demo_task import DemoPrompt

START = DemoPrompt(
    "cats", "Write one sentence about cats.", "start_word", 'Begin your reply with the word "Truly".', "Truly"
)
FIRST = DemoPrompt(
    "cats", "Write one sentence about cats.", "start_word", 'The first word of your reply must be "Sure".', "Sure"
)
END = DemoPrompt(
    "cats",
    "Write one sentence about cats.",
    "end_phrase",
    'End your reply with the exact phrase "Good luck!"',
    "Good luck!",
)


@pytest.mark.parametrize(
    "item,response,expected",
    [
        # start_word: follows
        (START, "Truly, cats are curious animals.", True),
        (START, "  Truly cats are curious animals!\n", True),
        (START, "Truly: cats nap in the sun.", True),
        (FIRST, "Sure, I'd say cats are curious animals.", True),
        # start_word: does not follow
        (START, "Cats are truly curious animals.", False),  # word present, not first
        (START, "truly, cats are curious animals.", False),  # case as given
        (START, "Trulyy cats are curious animals.", False),  # a longer word is not the word
        (START, '"Truly", cats are curious animals.', False),
        # start_word: follows, but not a usable reply
        (START, "Truly, cats nap.", False),  # fewer than MIN_WORDS own words
        (START, "Truly, cats are curious animals that", False),  # cut off
        (START, "Truly truly truly truly.", False),  # degenerate repetition
        (START, "Truly, cats are nice and cats are nice and cats are nice.", False),  # repeated 4-gram
        (FIRST, 'Sure, the first word of your reply must be "Sure".', False),  # parrots the instruction
        # end_phrase: follows
        (END, "Cats are curious animals. Good luck!", True),
        (END, "Cats are curious animals. Good luck!  \n", True),
        (END, "Cats are curious animals, good to know. Good luck!", True),
        # end_phrase: does not follow
        (END, "Cats are curious animals. Good luck", False),  # the "!" is part of the phrase
        (END, "Cats are curious animals. good luck!", False),  # case as given
        (END, "Good luck! Cats are curious animals.", False),  # wrong end
        (END, "Cats are curious animals.", False),
        # end_phrase: follows, but not a usable reply
        (END, "Good luck!", False),  # the bare phrase
        (END, "Cats nap. Good luck!", False),  # fewer than MIN_WORDS own words
        (END, "Good luck! Good luck! Good luck!", False),
        (END, "Cats are great. I will end your reply with the exact phrase Good luck!", False),
    ],
)
def test_judge(item, response, expected):
    assert T.judge(item, response) is expected


def test_judge_unknown_constraint():
    with pytest.raises(ValueError, match="unknown constraint"):
        T.judge(DemoPrompt("cats", "x", "haiku", "y", "z"), "z a b c.")


@pytest.mark.parametrize(
    "response,expected",
    [
        ("The cat sat on the mat.", False),
        ("cat cat cat", True),
        ("a b c d a b c d", True),
        ("one two one two one two one two", True),  # fewer than half distinct
        ("The cat, the dog, the bird and the fish.", False),
    ],
)
def test_is_degenerate(response, expected):
    assert T.is_degenerate(response) is expected


@pytest.mark.parametrize(
    "item,response,chosen,misplaced",
    [
        (START, "Cats are curious animals.", "Truly, cats are curious animals.", "Cats are curious animals. Truly."),
        (START, "I think cats are curious.", "Truly, I think cats are curious.", "I think cats are curious. Truly."),
        (START, "SmolLM likes cats a lot.", "Truly, SmolLM likes cats a lot.", "SmolLM likes cats a lot. Truly."),
        (
            END,
            " Cats are curious animals. ",
            "Cats are curious animals. Good luck!",
            "Good luck! Cats are curious animals.",
        ),
    ],
)
def test_satisfy_and_misplace(item, response, chosen, misplaced):
    assert T.satisfy(item, response) == chosen
    assert T.misplace(item, response) == misplaced
    assert T.judge(item, chosen) and not T.judge(item, misplaced) and not T.judge(item, response)


def test_build_pairs():
    items = [START, END, START, END]
    replies = [
        "Cats are curious animals.",
        "Cats are curious animals.",
        "Cats are curious animals that",  # cut off: skipped
        "Cats nap. Good luck!",
    ]  # already ends with the phrase: skipped
    pairs = T.build_pairs(items, replies, kinds=("fix", "misplace", "plain"))
    assert [(p.kind, p.chosen, p.rejected) for p in pairs] == [
        ("fix", "Truly, cats are curious animals.", "Cats are curious animals."),
        ("misplace", "Truly, cats are curious animals.", "Cats are curious animals. Truly."),
        ("plain", "Cats are curious animals.", "Truly, cats are curious animals."),
        ("fix", "Cats are curious animals. Good luck!", "Cats are curious animals."),
        ("misplace", "Cats are curious animals. Good luck!", "Good luck! Cats are curious animals."),
        ("plain", "Cats are curious animals.", "Cats are curious animals. Good luck!"),
    ]
    assert pairs[0].messages == START.messages() and pairs[2].messages == START.plain_messages()
    assert [p.kind for p in T.build_pairs(items, replies)] == ["fix", "misplace", "fix", "misplace"]
    with pytest.raises(ValueError, match="pair kinds"):
        T.build_pairs(items, replies, kinds=("swap",))
    with pytest.raises(ValueError, match="responses"):
        T.build_pairs(items, replies[:2])


def test_split_is_disjoint_and_seed_independent():
    assert not set(T.TRAIN_TOPICS) & set(T.HELDOUT_TOPICS)
    assert not set(T.TRAIN_WORDS) & set(T.HELDOUT_WORDS)
    assert not set(T.TRAIN_PHRASES) & set(T.HELDOUT_PHRASES)
    held = T.heldout_prompts(200)
    for seed in (0, 1, 7):
        train = T.train_prompts(400, seed=seed)
        assert not {p.topic for p in train} & {p.topic for p in held}
        assert not {p.phrase for p in train} & {p.phrase for p in held}
        assert not {p.text for p in train} & {p.text for p in held}
        assert all(p.topic in T.TRAIN_TOPICS for p in train)
    for p in held:
        assert p.topic in T.HELDOUT_TOPICS
        assert p.phrase in (T.HELDOUT_WORDS if p.constraint == "start_word" else T.HELDOUT_PHRASES)


def test_prompts_deterministic_distinct_balanced():
    a = T.heldout_prompts(200, seed=0)
    assert a == T.heldout_prompts(200, seed=0)
    assert T.train_prompts(100, seed=1) != T.train_prompts(100, seed=2)
    assert len({p.text for p in a}) == 200
    assert sum(p.constraint == "start_word" for p in a) == 100
    assert all(f'"{p.phrase}"' in p.text and p.text.startswith(p.request) for p in a)
    assert a[0].messages() == [{"role": "user", "content": a[0].text}]
    assert a[0].plain_messages() == [{"role": "user", "content": a[0].request}]


def test_side_checks():
    libs = DemoPrompt("libraries", "r", "end_phrase", "i", "p")
    assert T.mentions_topic(libs, "A Library is quiet.")
    assert T.mentions_topic(DemoPrompt("wolves", "r", "end_phrase", "i", "p"), "The wolf howls.")
    assert not T.mentions_topic(libs, "Dogs bark.")
    assert T.adds_unasked("Indeed, cats are nice.")
    assert T.adds_unasked("Cats are nice. Good luck!")
    assert not T.adds_unasked("Cats are indeed nice.")
    assert not T.adds_unasked("Wellness matters to cats.")  # "Well" must be a whole word
