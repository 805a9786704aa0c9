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
    selected_distribution,
    selection_win_rate,
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


def test_the_kept_reward_of_n_distinct_samples_by_hand():
    # K = 4 rewards [1, 1, 0, 0]; best of 2 distinct: of the C(4,2) = 6 pairs only {0, 0} has max 0
    values, probs = selected_distribution([1, 0, 1, 0], 2, "max")
    assert values.tolist() == [0.0, 1.0] and probs.tolist() == pytest.approx([1 / 6, 5 / 6], abs=1e-15)
    values, probs = selected_distribution([1, 0, 1, 0], 2, "min")
    assert probs.tolist() == pytest.approx([5 / 6, 1 / 6], abs=1e-15)
    # [1, 2, 3], best of 3 distinct: always 3 (with replacement it would be 3 with prob 19/27 only)
    assert selected_distribution([1, 2, 3], 3, "max")[1].tolist() == pytest.approx([0, 0, 1], abs=1e-15)
    with pytest.raises(ConfigError, match="at least 4 samples"):
        selected_distribution([1, 2, 3], 4)


def test_win_rates_with_ties_by_hand():
    pol, ref = [1.0, 0.0], [1.0, 1.0, 0.0, 0.0]
    # n = 1: the policy's 1 beats a reference 0 (1/2) and ties a reference 1 (1/2 x 1/2): 3/4;
    # its 0 only ties (1/2 x 1/2): 1/4; mean 1/2
    assert selection_win_rate(pol, ref, 1) == pytest.approx(0.5, abs=1e-15)
    # best of 2 of [1, 0] is 1: against one reference sample 3/4; against the reference's best of 2
    # (0 w.p. 1/6, 1 w.p. 5/6): 1/6 + 1/2 x 5/6 = 7/12
    assert best_of_n_win_rate(pol, ref, 2) == pytest.approx(3 / 4, abs=1e-15)
    assert best_of_n_vs_best_of_n_win_rate(pol, ref, 2) == pytest.approx(7 / 12, abs=1e-15)
    # worst of 2 of [1, 0] is 0; the reference's worst of 2 is 0 w.p. 5/6: 1/2 x 5/6 = 5/12
    assert worst_of_n_vs_worst_of_n_win_rate(pol, ref, 2) == pytest.approx(5 / 12, abs=1e-15)
    # strict order without ties: [2, 3] vs [1, 2.5]: P(pol > ref) = (1/2)(1/2) + (1/2)(1) = 3/4
    assert selection_win_rate([2.0, 3.0], [1.0, 2.5], 1) == pytest.approx(0.75, abs=1e-15)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_swapping_the_two_sides_gives_one_minus_the_win_rate(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        a, b = rng.integers(0, 4, 8).tolist(), rng.integers(0, 4, 6).tolist()  # four-valued: many ties
        for which in ("max", "min"):
            assert selection_win_rate(a, b, n, n, which) + selection_win_rate(b, a, n, n, which) == pytest.approx(
                1.0, abs=1e-12
            )


def _reference_against_itself(draw, n: int, n_ref: int, prompts: int = 3000, k: int = 16) -> tuple[float, float]:
    """Mean and standard error over prompts of W(a held-out reference set, the reference set)."""
    rng = np.random.default_rng(7)
    w = [selection_win_rate(draw(rng, k), draw(rng, k), n, n_ref) for _ in range(prompts)]
    return float(np.mean(w)), float(np.std(w) / np.sqrt(prompts))


@pytest.mark.parametrize("reward", ["continuous", "zero_one_q0.2", "zero_one_q0.5", "zero_one_q0.8", "four_valued"])
@pytest.mark.parametrize("n", [4, 8])
def test_the_reference_against_itself_scores_one_half(reward, n):
    """The issue's example: with a 0/1 reward the old E[C_max^n] gave the reference 0.40, 0.29 and
    0.135 against itself at q = 0.2, 0.5, 0.8 (n = 4); measured, it is 1/2 within sampling error
    (four standard errors)."""
    draws = {
        "continuous": lambda rng, k: rng.normal(size=k).tolist(),
        "zero_one_q0.2": lambda rng, k: (rng.random(k) < 0.2).astype(float).tolist(),
        "zero_one_q0.5": lambda rng, k: (rng.random(k) < 0.5).astype(float).tolist(),
        "zero_one_q0.8": lambda rng, k: (rng.random(k) < 0.8).astype(float).tolist(),
        "four_valued": lambda rng, k: rng.choice([0.0, 1.0, 2.0, 3.0], k, p=[0.4, 0.3, 0.2, 0.1]).tolist(),
    }
    mean, se = _reference_against_itself(draws[reward], n, n)
    assert abs(mean - 0.5) < 4 * se + 1e-9, (mean, se)


def test_against_one_sample_a_tied_reward_is_below_n_over_n_plus_one():
    """n/(n+1) holds for continuous rewards only: with a 0/1 reward of success rate 1/2, best-of-4
    against one sample is P(best = 1)(1/2 + 1/2 x 1/2) + P(best = 0)(1/2 x 1/2) = (15/16)(3/4) +
    (1/16)(1/4) = 0.71875 in the limit of many samples per prompt."""
    mean, se = _reference_against_itself(
        lambda rng, k: (rng.random(k) < 0.5).astype(float).tolist(), 4, 1, prompts=2000, k=64
    )
    assert abs(mean - 0.71875) < 4 * se + 0.01  # + O(1/K): 4 distinct of 64 is not 4 independent draws
    cont, se = _reference_against_itself(lambda rng, k: rng.normal(size=k).tolist(), 4, 1, prompts=2000, k=64)
    assert abs(cont - 0.8) < 4 * se + 0.01


def test_continuous_rewards_agree_with_the_calibrated_power_formula():
    """For continuous rewards and many samples the closed form tends to the former formula
    E[C_max^n] (C: the calibrated reward against the reference samples), computed here by itself."""
    rng = np.random.default_rng(3)
    ref, pol = rng.normal(size=4000), rng.normal(loc=0.5, size=4000)
    c = np.sort(np.searchsorted(np.sort(ref), pol) / ref.size)
    i = np.arange(1, c.size + 1)
    for n in (2, 4):
        p_max = (i / c.size) ** n - ((i - 1) / c.size) ** n
        old = float(np.sum(p_max * c**n))
        assert best_of_n_vs_best_of_n_win_rate(pol.tolist(), ref.tolist(), n) == pytest.approx(old, abs=5e-3)


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
    reward = build_reward(
        {
            "name": "calibrated",
            "reward": {"name": "length", "max_words": 5},
            "k": 3,
            "transform": "bon",
            "n": 2,
            "t": 2.0,
            "model": str(tiny_model_dir),
            "max_new_tokens": 4,
            "temperature": 1.0,
        }
    )
    got = reward(["what is one plus two ?", [{"role": "user", "content": "hello"}]], ["three", "a b c d e f g"])
    # 4 new tokens of a word-level tokenizer are at most 4 words, so every reference sample scores
    # 1 on "at most 5 words": "three" (1) ties all three -> C = 1/2 -> exp(2 * 1/2); the 7-word
    # reply (0) is below all -> C = 0 -> exp(0)
    assert got == pytest.approx([math.e, 1.0], abs=1e-12)
    assert all(1.0 <= v <= math.exp(2.0) for v in got)
