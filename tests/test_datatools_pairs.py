"""Pairs from scored samples (alignkit.datatools.pairs): chosen/rejected/margins worked out by hand,
the skip counts, and the written file read back by alignkit's paired loader."""

import math

import pytest

from alignkit.data.formats import load_preference_examples
from alignkit.datatools.pairs import build_pairs, sample_and_score, write_pairs
from alignkit.generation.decode import SamplingParams

STORY = [{"role": "user", "content": "tell me a story"}]
PROMPTS = ["what is 2 plus 2 ?", STORY, "p3", "p4", "p5", "p6"]
SAMPLES = [
    ["four", "4", "five", "4"],  # best 2.0 twice: the first (index 1) is chosen; worst -1.0
    ["a", "b", "c"],  # margin 1.2 - 0.9 = 0.3 < 0.5
    ["same", "same"],  # one distinct text
    ["  ", "ok"],  # the blank one cannot be written: one usable text left
    ["x", "y", "z"],  # worst 0.0 twice: the first (index 1) is rejected
    ["dup", "other", "dup"],  # "dup" is best (2.0) and worst (0.0): rejected is the worst other text
]
SCORES = [[0.5, 2.0, -1.0, 2.0], [1.0, 1.2, 0.9], [1.0, 0.0], [5.0, 0.0], [3.0, 0.0, 0.0], [2.0, 1.0, 0.0]]


def test_build_pairs_picks_best_and_worst_and_counts_the_skips():
    records, counts = build_pairs(PROMPTS, SAMPLES, SCORES, min_margin=0.5)
    assert records == [
        {"prompt": "what is 2 plus 2 ?", "chosen": "4", "rejected": "five", "margin": 3.0},  # 2.0 - (-1.0)
        {"prompt": "p5", "chosen": "x", "rejected": "y", "margin": 3.0},  # 3.0 - 0.0
        {"prompt": "p6", "chosen": "dup", "rejected": "other", "margin": 1.0},  # 2.0 - 1.0
    ]
    assert counts == {"prompts": 6, "pairs": 3, "below_margin": 1, "too_few_distinct": 2, "blank_samples": 1}


def test_min_margin_is_inclusive_and_zero_keeps_every_distinct_pair():
    records, counts = build_pairs([STORY], [["a", "b"]], [[1.0, 0.5]], min_margin=0.5)
    assert [r["margin"] for r in records] == [0.5] and counts["pairs"] == 1
    records, counts = build_pairs(PROMPTS, SAMPLES, SCORES, min_margin=0.0)
    assert counts["pairs"] == 4 and counts["below_margin"] == 0
    assert records[1] == {"prompt": STORY, "chosen": "b", "rejected": "c", "margin": pytest.approx(0.3, abs=1e-12)}


def test_written_pairs_load_with_the_paired_loader(tmp_path):
    records, _ = build_pairs(PROMPTS, SAMPLES, SCORES, min_margin=0.0)
    path = write_pairs(tmp_path / "out" / "pairs.jsonl", records)
    examples = load_preference_examples(str(path)).examples
    assert len(examples) == 4
    first, story = examples[0], examples[1]
    assert first.prompt == ({"role": "user", "content": "what is 2 plus 2 ?"},) and first.plain_text
    assert first.chosen == ({"role": "assistant", "content": "4"},)
    assert first.rejected == ({"role": "assistant", "content": "five"},)
    assert story.prompt == tuple(STORY) and not story.plain_text  # a message-list prompt stays one
    assert story.chosen == ({"role": "assistant", "content": "b"},)


def test_build_pairs_names_bad_input():
    with pytest.raises(ValueError, match="score 1 of prompt 0 is nan"):
        build_pairs(["p"], [["a", "b"]], [[1.0, math.nan]], min_margin=0.0)
    with pytest.raises(ValueError, match="prompt 0 has 2 samples but 1 scores"):
        build_pairs(["p"], [["a", "b"]], [[1.0]], min_margin=0.0)
    with pytest.raises(ValueError, match="1 prompts, 2 sample lists"):
        build_pairs(["p"], [["a"], ["b"]], [[1.0], [2.0]], min_margin=0.0)
    with pytest.raises(ValueError, match="min_margin"):
        build_pairs(["p"], [["a", "b"]], [[1.0, 0.0]], min_margin=-1)


class EchoModel:
    """A fake TextModel: reply j to a conversation is "<last user text> #j"."""

    name = "echo"

    def __init__(self):
        self.calls = []

    def chat(self, conversations, params, seed=0, on_result=None, progress=False):
        self.calls.append((conversations, params, seed))
        return [[f"{c[-1]['content']} #{j}" for j in range(params.n)] for c in conversations]


def test_sample_and_score_samples_k_per_prompt_and_scores_them_all_at_once():
    lm, seen = EchoModel(), []

    def reward(prompts, completions, **columns):
        seen.append((prompts, completions, columns))
        return [len(c) + b for c, b in zip(completions, columns["bonus"])]

    samples, scores = sample_and_score(
        lm, ["hi", STORY], 2, SamplingParams(temperature=0.7), reward, seed=3, columns={"bonus": [10, 100]}
    )
    conversations, params, seed = lm.calls[0]
    assert conversations == [[{"role": "user", "content": "hi"}], STORY]  # a string becomes a user turn
    assert params == SamplingParams(temperature=0.7, n=2) and seed == 3
    assert samples == [["hi #0", "hi #1"], ["tell me a story #0", "tell me a story #1"]]
    assert scores == [[5 + 10, 5 + 10], [18 + 100, 18 + 100]]  # len("hi #0") = 5, len("tell me a story #0") = 18
    prompts, completions, columns = seen[0]
    assert prompts == ["hi", "hi", STORY, STORY]  # as given, once per reply
    assert completions == ["hi #0", "hi #1", "tell me a story #0", "tell me a story #1"]
    assert columns == {"bonus": [10, 10, 100, 100]}
    with pytest.raises(ValueError, match="k must be"):
        sample_and_score(lm, ["hi"], 0, SamplingParams(), reward)
