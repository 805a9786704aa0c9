"""Calibrated rewards (InfAlign-CTRL, arXiv 2412.19792): mid-rank calibration and the transforms
by hand, best-/worst-of-n win rates by enumeration and for the uniform (reference) case, the t rule,
the reward callable's cache (in memory and on disk) with a fake sampler, and the `calibrated` spec
of build_reward over a tiny saved model."""

import math

import numpy as np
import pytest

from alignkit.errors import ConfigError
from alignkit.rewards import build_reward
from alignkit.rewards.calibration import (
    CalibratedReward,
    _tilted_win_rate,
    best_of_n_vs_best_of_n_win_rate,
    best_of_n_win_rate,
    bon_t,
    calibrate,
    prompt_key,
    reference_best_of_n_win_rate,
    transform,
    won_t,
    worst_of_n_vs_worst_of_n_win_rate,
)


def test_calibrate_counts_ties_as_half():
    got = calibrate([2.0, 1.0, 5.0, 0.0, 2.5], [[1, 2, 2, 3], [1, 1, 1, 1], [1, 2, 3, 4], [0, 1], [3, 1, 2]])
    # 2 in {1,2,2,3}: 1 below, 2 equal -> (1 + 1) / 4; 1 in {1,1,1,1}: (0 + 2) / 4; 5 above all four -> 1;
    # 0 in {0,1}: (0 + 0.5) / 2; 2.5 in {3,1,2} (order does not matter): 2 below -> 2 / 3
    assert got == [0.5, 0.5, 1.0, 0.25, 2 / 3]


def test_calibrate_rejects_bad_input():
    with pytest.raises(ValueError, match="2 rewards but 1"):
        calibrate([1.0, 2.0], [[1.0]])
    with pytest.raises(ValueError, match="no reference rewards"):
        calibrate([1.0], [[]])
    with pytest.raises(ValueError, match="finite"):
        calibrate([float("nan")], [[1.0]])


def test_transforms_by_hand():
    assert transform(0.5, "bon", 2.0) == pytest.approx(math.e, abs=1e-12)  # exp(2 * 0.5)
    assert transform(0.0, "bon", 2.0) == 1.0
    assert transform(0.5, "won", 2.0) == pytest.approx(-1 / math.e, abs=1e-12)  # -exp(-2 * 0.5)
    assert transform(1.0, "won", 3.0) == pytest.approx(-math.exp(-3.0), abs=1e-15)
    assert transform([0.25, 1.0], "identity") == [0.25, 1.0]
    with pytest.raises(ConfigError, match="bon, won, identity"):
        transform(0.5, "boN", 1.0)
    with pytest.raises(ConfigError, match="positive t"):
        transform(0.5, "bon")
    with pytest.raises(ConfigError, match="takes no t"):
        transform(0.5, "identity", 1.0)


def test_win_rates_by_enumeration():
    # two equally likely calibrated values 0.2 and 0.8, n = 2: the four ordered pairs have max
    # 0.2, 0.8, 0.8, 0.8 and min 0.2, 0.2, 0.2, 0.8
    assert best_of_n_win_rate([0.8, 0.2], 2) == pytest.approx((0.2 + 3 * 0.8) / 4, abs=1e-12)  # E[C_max] = 0.65
    assert best_of_n_vs_best_of_n_win_rate([0.2, 0.8], 2) == pytest.approx((0.2**2 + 3 * 0.8**2) / 4, abs=1e-12)
    assert worst_of_n_vs_worst_of_n_win_rate([0.2, 0.8], 2) == pytest.approx(
        (3 * (1 - 0.8**2) + (1 - 0.2**2)) / 4, abs=1e-12)  # E[1 - (1 - C_min)^2] = 0.51
    assert best_of_n_win_rate([0.3, 0.9], 1) == pytest.approx(0.6, abs=1e-12)  # n = 1: the mean
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        best_of_n_win_rate([0.5, 1.5], 2)
    with pytest.raises(ConfigError, match="positive integer"):
        best_of_n_win_rate([0.5], 0)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_reference_policy_wins_n_over_n_plus_one(n):
    assert reference_best_of_n_win_rate(n) == n / (n + 1)
    # C uniform on [0, 1] for the reference policy; 20,000 draws: the standard error of E[C_max]
    # is below 0.003, so 0.01 is over three standard errors
    uniform = np.random.default_rng(0).random(20_000).tolist()
    assert best_of_n_win_rate(uniform, n) == pytest.approx(n / (n + 1), abs=0.01)
    # the paper's inference-time win rate of the reference against itself is 1/2, both ways
    assert best_of_n_vs_best_of_n_win_rate(uniform, n) == pytest.approx(0.5, abs=0.01)
    assert worst_of_n_vs_worst_of_n_win_rate(uniform, n) == pytest.approx(0.5, abs=0.01)


def test_reference_samples_calibrated_against_the_reference_give_n_over_n_plus_one():
    # end to end: 4,000 prompts, each with its own K = 64 reference rewards and one more reference
    # sample calibrated against them; its rank among the 65 is uniform, so C is uniform on
    # {0, 1/64, ..., 1} and best-of-4 wins 4/5 of the time up to O(1/K) and sampling error
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(4000, 64)).tolist()
    policy = rng.normal(size=4000).tolist()
    c = calibrate(policy, refs)
    assert best_of_n_win_rate(c, 4) == pytest.approx(0.8, abs=0.01)


def test_t_rule():
    with pytest.raises(ConfigError, match="identity"):
        bon_t(1)
    # pinned values of the rule (KL 0.5 nats); a brute-force search over t in steps of 0.5 found
    # 4.5, 12.5 and 34.0 for best-of-2/4/8 and 3.5, 9.5 for worst-of-2/4: within one step
    assert bon_t(2) == pytest.approx(4.57, abs=0.5)
    assert bon_t(4) == pytest.approx(12.63, abs=0.5)
    assert bon_t(8) == pytest.approx(34.16, abs=0.5)
    assert won_t(2) == pytest.approx(3.73, abs=0.5)
    assert won_t(4) == pytest.approx(9.68, abs=0.5)
    assert bon_t(4, kl=0.25) < bon_t(4) < bon_t(4, kl=1.0)  # more KL to spend: a sharper transform
    t = bon_t(4)
    best = _tilted_win_rate("bon", t, 4, 0.5)
    assert best > _tilted_win_rate("bon", 0.7 * t, 4, 0.5) and best > _tilted_win_rate("bon", 1.4 * t, 4, 0.5)
    # no KL to spend: the policy is the reference, whose inference-time win rate is 1/2
    assert _tilted_win_rate("bon", t, 4, 1e-9) == pytest.approx(0.5, abs=1e-3)
    assert _tilted_win_rate("won", 5.0, 4, 1e-9) == pytest.approx(0.5, abs=1e-3)


def _words_times_scale(prompts, completions, scale):
    return [len(c.split()) * s for c, s in zip(completions, scale)]


class FakeSampler:
    """Four reference completions per prompt, of 1, 2, 3 and 4 words; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return [["a", "a b", "a b c", "a b c d"] for _ in prompts]


def test_calibrated_reward_samples_each_prompt_once():
    sampler = FakeSampler()
    reward = CalibratedReward(_words_times_scale, sampler, transform="identity")
    prompts = ["p1", "p1", [{"role": "user", "content": "p2"}]]
    completions = ["a b", "a b c d e", "x"]
    scale = [1, 1, 10]  # a per-row column: p2's reference samples are scored with its scale, 10
    # rewards 2, 5, 10 against references {1,2,3,4}, {1,2,3,4}, {10,20,30,40}:
    # (1 + 0.5) / 4, 4 / 4, (0 + 0.5) / 4
    assert reward(prompts, completions, scale=scale) == [0.375, 1.0, 0.125]
    assert sampler.calls == [["p1", [{"role": "user", "content": "p2"}]]]  # each new prompt once
    assert reward(prompts, completions, scale=scale) == [0.375, 1.0, 0.125]
    assert len(sampler.calls) == 1  # the second call is served from the cache
    reward(["p3", "p1"], ["a", "a"], scale=[1, 1])
    assert sampler.calls[1:] == [["p3"]]

    bon = CalibratedReward(_words_times_scale, FakeSampler(), transform="bon", n=4, t=2.0)
    got = bon(prompts, completions, scale=scale)
    assert got == pytest.approx([math.exp(0.75), math.exp(2.0), math.exp(0.25)], abs=1e-12)
    assert CalibratedReward(_words_times_scale, FakeSampler(), n=2).t == bon_t(2)  # the default t


def test_calibrated_reward_from_a_table():
    table = {prompt_key("p1"): ["a", "a b c"]}
    reward = CalibratedReward(lambda p, c: [float(len(x.split())) for x in c], table, transform="won", t=1.0)
    assert reward(["p1"], ["a b"]) == pytest.approx([-math.exp(-0.5)], abs=1e-12)  # 2 in {1, 3}: 1/2
    with pytest.raises(ConfigError, match="missing from the table"):
        reward(["p2"], ["a"])
    assert prompt_key({"role": "user", "content": "x"}) == prompt_key({"content": "x", "role": "user"})


def test_cache_round_trip_and_wrong_key(tmp_path):
    sampler = FakeSampler()
    first = CalibratedReward(_words_times_scale, sampler, transform="identity", cache_key="tiny|k=4|T=1.0")
    first(["p1", "p2"], ["a b", "a"], scale=[1, 1])
    path = first.save_cache(tmp_path / "ref.json")

    again = FakeSampler()
    second = CalibratedReward(_words_times_scale, again, transform="identity", cache_key="tiny|k=4|T=1.0")
    assert second.load_cache(path) == 2
    assert second(["p2", "p1"], ["a", "a b"], scale=[1, 1]) == [0.125, 0.375]
    assert again.calls == []  # nothing sampled: all from the file

    other = CalibratedReward(_words_times_scale, again, transform="identity", cache_key="tiny|k=8|T=1.0")
    with pytest.raises(ConfigError, match="made for key 'tiny|k=4|T=1.0'"):
        other.load_cache(path)
    with pytest.raises(ConfigError, match="cache_key"):
        CalibratedReward(_words_times_scale, again, transform="identity").save_cache(tmp_path / "x.json")


def test_calibrated_reward_rejects_bad_settings():
    with pytest.raises(ConfigError, match="unknown transform"):
        CalibratedReward(_words_times_scale, FakeSampler(), transform="best")
    with pytest.raises(ConfigError, match="positive number"):
        CalibratedReward(_words_times_scale, FakeSampler(), t=-1.0)
    with pytest.raises(ConfigError, match="function prompts"):
        CalibratedReward(_words_times_scale, ["not", "a", "sampler"])


def test_build_calibrated_spec_errors():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) `kk`.*reward, k, transform.*Did you mean `k`"):
        build_reward({"name": "calibrated", "reward": "length", "kk": 4})
    with pytest.raises(ConfigError, match="needs `reward`"):
        build_reward({"name": "calibrated", "k": 4})
    with pytest.raises(ConfigError, match="temperature"):
        build_reward({"name": "calibrated", "reward": {"name": "length", "max_words": 5}, "temperature": 0.0})


def test_build_calibrated_over_a_tiny_model(tiny_model_dir):
    reward = build_reward({"name": "calibrated", "reward": {"name": "length", "max_words": 5}, "k": 3,
                           "transform": "bon", "n": 2, "t": 2.0, "model": str(tiny_model_dir),
                           "max_new_tokens": 4, "temperature": 1.0})
    got = reward(["what is one plus two ?", [{"role": "user", "content": "hello"}]], ["three", "a b c d e f g"])
    # 4 new tokens of a word-level tokenizer are at most 4 words, so every reference sample scores
    # 1 on "at most 5 words": "three" (1) ties all three -> C = 1/2 -> exp(2 * 1/2); the 7-word
    # reply (0) is below all -> C = 0 -> exp(0)
    assert got == pytest.approx([math.e, 1.0], abs=1e-12)
    assert all(1.0 <= v <= math.exp(2.0) for v in got)
