"""alignkit.eval.metrics against numbers worked out by hand (written next to each check)."""

import math

import numpy as np
import pytest
import torch

from alignkit.eval.metrics import (
    _topk_stats_chunked,
    bootstrap_mean_ci,
    idealized_ranking_accuracy,
    kl_estimate,
    length_bias,
    likelihood_displacement,
    ranking_accuracy,
    topk_stats,
    wilson_interval,
    win_rate,
)

EXACT = 1e-12  # float64 arithmetic on a handful of numbers


# ---------------------------------------------------------------------------------------------- wilson


def test_wilson_8_of_10_matches_published_value_and_quadratic_roots():
    """8/10, z = 1.96: p = 0.8, z^2/n = 0.38416, denom = 1.38416,
    centre = (0.8 + 0.19208) / 1.38416 = 0.716738, half = 1.96/1.38416 * sqrt(0.016 + 0.009604) = 0.226580
    -> (0.4902, 0.9433), the textbook value (e.g. Newcombe 1998, Table I style 2-decimal tables).
    Independently, the Wilson bounds are the roots in p of (0.8 - p)^2 = z^2 p (1 - p) / n."""
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    z2n = 1.96**2 / 10  # (1 + z2n) p^2 - (1.6 + z2n) p + 0.64 = 0
    a, b, c = 1 + z2n, -(1.6 + z2n), 0.64
    roots = sorted([(-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)])
    assert (lo, hi) == pytest.approx(roots, abs=EXACT)


def test_wilson_zero_successes_and_errors():
    """0/10: lower bound 0, upper = z^2 / (n + z^2) = 3.8416 / 13.8416 = 0.277540."""
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 13.8416, abs=EXACT)
    with pytest.raises(ValueError, match="n must be"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


# ------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_two_points_quantiles():
    """values [0, 1]: a resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4.
    level 0.95 -> the 2.5% and 97.5% quantiles fall inside the 0 and 1 masses (each ~25% of draws): (0, 1).
    level 0.4 -> the 30% and 70% quantiles both fall inside the 0.5 mass (25%..75%): (0.5, 0.5)."""
    assert bootstrap_mean_ci([0, 1]) == (0.5, 0.0, 1.0)
    assert bootstrap_mean_ci([0, 1], level=0.4) == (0.5, 0.5, 0.5)


def test_bootstrap_constant_reproducible_and_errors():
    assert bootstrap_mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    x = np.random.default_rng(1).normal(size=50)
    assert bootstrap_mean_ci(x, n_boot=500, seed=3) == bootstrap_mean_ci(x, n_boot=500, seed=3)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([1.0], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean_ci([1.0], n_boot=0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci([1.0, float("nan")])


# ------------------------------------------------------------------------------------ ranking accuracy


def test_ranking_accuracy_counts_tie_as_half():
    """chosen [1, 2, 3, 4] vs rejected [0, 2, 5, 1]: win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4 = 0.625;
    the interval is Wilson with 2.5 successes out of 4."""
    r = ranking_accuracy([1, 2, 3, 4], [0, 2, 5, 1])
    assert r["value"] == pytest.approx(0.625, abs=EXACT)
    assert r["ci95"] == pytest.approx(list(wilson_interval(2.5, 4)), abs=EXACT)
    assert (r["n"], r["ties"]) == (4, 1)


def test_ranking_accuracy_accepts_lists_numpy_torch_and_validates():
    a, b = [-3.0, -1.0, -2.0], [-2.0, -4.0, -2.5]  # loss, win, win -> 2/3
    for conv in (list, np.array, torch.tensor):
        assert ranking_accuracy(conv(a), conv(b))["value"] == pytest.approx(2 / 3, abs=EXACT)
    assert ranking_accuracy(torch.tensor(a, dtype=torch.bfloat16), torch.tensor(b))["value"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same length"):
        ranking_accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        ranking_accuracy([], [])
    with pytest.raises(ValueError, match="1-D"):
        ranking_accuracy([[1.0]], [[0.0]])


# ------------------------------------------------------------------------- idealized ranking accuracy


def test_idealized_default_alpha():
    """beta = 0.1, default alpha = 0.75: z = d + 10 * ln 3 = d + 10.986123 where d = ref log-ratio.
    d = [-5, -12, 3, -11.5, -10.5] -> z = [5.99, -1.01, 13.99, -0.51, 0.49] -> right, wrong, right, wrong,
    right = 3/5. The reference alone (d > 0) is right on 1/5."""
    d = np.array([-5.0, -12.0, 3.0, -11.5, -10.5])
    r = idealized_ranking_accuracy(d, np.zeros(5), beta=0.1)
    assert r["value"] == pytest.approx(0.6, abs=EXACT) and r["reference_value"] == pytest.approx(0.2, abs=EXACT)
    assert r["ci95"] == pytest.approx(list(wilson_interval(3, 5)), abs=EXACT)
    assert (r["n"], r["n_ties_excluded"], r["beta"]) == (5, 0, 0.1)
    assert (r["pref_prob"], r["pref_prob_is_default"]) == (0.75, True)


def test_idealized_per_pair_alpha():
    """beta = 1, alpha = [0.5, 1.0, 0.25, 0.9, 0.25], d = [-1, -100, 2, -20, 0.5]:
    pair 0: alpha = 1/2, no majority -> excluded.
    pair 1: alpha = 1 -> z = +inf, majority chosen -> right.
    pair 2: z = 2 + ln(1/3) = 0.901 > 0 but the majority (alpha < 1/2) prefers rejected -> wrong.
    pair 3: z = -20 + ln 9 = -17.80 < 0, majority chosen -> wrong.
    pair 4: z = 0.5 + ln(1/3) = -0.599 < 0, majority prefers rejected -> right.
    -> 2/4 = 0.5 on n = 4 pairs. Reference alone: pairs 1, 3 wrong (d < 0), 2 wrong (d > 0 vs majority
    rejected), 4 wrong -> 0/4."""
    r = idealized_ranking_accuracy(
        [-1.0, -100.0, 2.0, -20.0, 0.5], [0.0] * 5, beta=1.0, pref_prob=[0.5, 1.0, 0.25, 0.9, 0.25]
    )
    assert r["value"] == pytest.approx(0.5, abs=EXACT) and r["reference_value"] == 0.0
    assert (r["n"], r["n_ties_excluded"], r["pref_prob"], r["pref_prob_is_default"]) == (4, 1, None, False)


def test_idealized_large_beta_tends_to_reference_and_scalar_alpha():
    """beta -> large: (1/beta) log(alpha/(1-alpha)) -> 0 so pi* ranks like pi_ref (here 1/3 right);
    beta small with alpha = 0.9 fixes every pair (1.0). Exact z == 0 counts 0.5:
    d = -ln 9 with alpha = 0.9, beta = 1 gives z = 0."""
    d = [-2.0, 1.0, -0.5]
    assert idealized_ranking_accuracy(d, [0.0] * 3, beta=1e9, pref_prob=0.9)["value"] == pytest.approx(1 / 3)
    assert idealized_ranking_accuracy(d, [0.0] * 3, beta=0.01, pref_prob=0.9)["value"] == 1.0
    assert idealized_ranking_accuracy([-math.log(9)], [0.0], beta=1.0, pref_prob=0.9)["value"] == pytest.approx(0.5)


def test_idealized_errors():
    with pytest.raises(ValueError, match="beta"):
        idealized_ranking_accuracy([0.0], [0.0], beta=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        idealized_ranking_accuracy([0.0], [0.0], beta=0.1, pref_prob=[1.5])
    with pytest.raises(ValueError, match="entries"):
        idealized_ranking_accuracy([0.0, 1.0], [0.0, 0.0], beta=0.1, pref_prob=[0.7])
    with pytest.raises(ValueError, match="no majority"):
        idealized_ranking_accuracy([0.0], [0.0], beta=0.1, pref_prob=0.5)


# -------------------------------------------------------------------------------------------- length bias


def test_length_bias_hand_numbers():
    """r_c = [2, 1, 3], r_r = [1, 2, 0], len_c = [10, 5, 8], len_r = [5, 10, 8].
    Pooled: r = [2,1,3,1,2,0] (mean 1.5), L = [10,5,8,5,10,8] (mean 23/3); sum dr dL = 5, sum dr^2 = 5.5,
    sum dL^2 = 76/3 -> corr = 5 / sqrt(5.5 * 76/3) = 5 * sqrt(3/418) = 0.423587.
    Margins [1, -1, 3] (centred [0, -2, 2]) vs length diffs [5, -5, 0]: 10 / sqrt(8 * 50) = 0.5.
    Chosen longer: pair 0 (margin 1) -> 1.0; shorter: pair 1 (margin -1) -> 0.0; equal: pair 2 -> 1.0."""
    r = length_bias([2, 1, 3], [1, 2, 0], [10, 5, 8], [5, 10, 8])
    assert r["corr_reward_length"] == pytest.approx(5 * math.sqrt(3 / 418), abs=EXACT)
    assert r["corr_margin_length_diff"] == pytest.approx(0.5, abs=EXACT)
    assert r["accuracy_chosen_longer"] == {"value": 1.0, "ci95": list(wilson_interval(1, 1)), "n": 1}
    assert r["accuracy_chosen_shorter"] == {"value": 0.0, "ci95": list(wilson_interval(0, 1)), "n": 1}
    assert r["accuracy_equal_length"]["value"] == 1.0 and r["n"] == 3
    assert r["points"] == [
        {"length_diff": 5, "margin": 1.0},
        {"length_diff": -5, "margin": -1.0},
        {"length_diff": 0, "margin": 3.0},
    ]


def test_length_bias_undefined_correlations_are_none():
    """Constant rewards -> both correlations undefined. One pair: the pooled correlation has 2 points
    (r = [1, 0] vs L = [3, 2]: perfectly correlated, 1.0) but the margin correlation has 1 -> None.
    No pair of equal length -> that subset is empty."""
    r = length_bias([1.0, 1.0], [1.0, 1.0], [3, 4], [2, 2])
    assert r["corr_reward_length"] is None and r["corr_margin_length_diff"] is None
    assert r["accuracy_chosen_longer"]["value"] == 0.5  # two ties
    assert r["accuracy_equal_length"] == {"value": None, "ci95": None, "n": 0}
    one = length_bias([1.0], [0.0], [3], [2])
    assert one["corr_reward_length"] == pytest.approx(1.0) and one["corr_margin_length_diff"] is None


def test_length_bias_points_capped_and_validation():
    n = 5000
    r = length_bias(np.arange(n, dtype=float), np.zeros(n), np.arange(n) % 7, np.full(n, 3))
    pts = r["points"]
    assert len(pts) == 2000 and pts[0]["margin"] == 0.0 and pts[-1]["margin"] == n - 1
    assert len({p["margin"] for p in pts}) == 2000  # distinct pairs, evenly spread
    with pytest.raises(ValueError, match="whole numbers"):
        length_bias([1.0], [0.0], [2.5], [1])
    with pytest.raises(ValueError, match="same length"):
        length_bias([1.0, 2.0], [0.0, 1.0], [1, 2], [1])


# ---------------------------------------------------------------------------------------------- win rate


def test_win_rate_hand_numbers():
    """policy [3, 1, 2, 2] vs reference [1, 1, 3, 0]: win, tie, loss, win -> 2.5 / 4 = 0.625;
    the interval is the bootstrap of the per-prompt scores [1, 0.5, 0, 1]."""
    r = win_rate([3, 1, 2, 2], [1, 1, 3, 0], n_boot=2000, seed=5)
    assert r["value"] == pytest.approx(0.625, abs=EXACT)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    _, lo, hi = bootstrap_mean_ci([1, 0.5, 0, 1], n_boot=2000, seed=5)
    assert r["ci95"] == [lo, hi] and 0 <= lo < 0.625 < hi <= 1


# -------------------------------------------------------------------------------------------------- KL


def test_kl_estimate_k1_mean():
    """log pi = [-10, -12, -8], log pi_ref = [-11, -11, -11] -> k1 = [1, -1, 3], mean 1.0."""
    r = kl_estimate(torch.tensor([-10.0, -12.0, -8.0]), [-11.0, -11.0, -11.0])
    assert r["value"] == pytest.approx(1.0, abs=EXACT) and r["n"] == 3
    assert r["ci95"] == list(bootstrap_mean_ci([1.0, -1.0, 3.0])[1:])
    same = kl_estimate([-5.0, -6.0], [-5.0, -6.0])
    assert same == {"value": 0.0, "ci95": [0.0, 0.0], "n": 2}


def test_kl_estimate_is_unbiased_on_a_categorical():
    """pi = [0.5, 0.25, 0.25], pi_ref = [0.25, 0.25, 0.5]:
    KL = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2 = 0.173287. k1 takes ln 2, 0, -ln 2 with probability
    1/2, 1/4, 1/4, so sd(k1) = ln 2 * sqrt(0.75 - 0.0625) = 0.575 and with 2000 samples from pi the
    standard error is 0.0129: the 0.05 tolerance is ~4 s.e. (a wrong-direction estimator, the mean of
    log pi_ref - log pi, would read -0.17 and fail)."""
    pi, ref = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.25, 0.5])
    y = np.random.default_rng(0).choice(3, size=2000, p=pi)
    r = kl_estimate(np.log(pi[y]), np.log(ref[y]))
    assert r["value"] == pytest.approx(0.25 * math.log(2), abs=0.05)
    assert r["ci95"][0] < 0.25 * math.log(2) < r["ci95"][1]


# ------------------------------------------------------------------------------------------------ top-k


def _hand_logits():
    """Row 0, t0: logits ln[4, 2, 1, 1] -> p = [0.5, 0.25, 0.125, 0.125]; t1 masked (garbage).
    Row 1, t0 masked (garbage); t1: zeros -> uniform p = 0.25."""
    logits = torch.tensor(
        [[[math.log(4), math.log(2), 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]], [[0.0, 50.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]
    )
    mask = torch.tensor([[True, False], [False, True]])
    return logits, mask


def test_topk_stats_hand_numbers():
    """k = 2. Position A: top-2 = {0.5, 0.25}, mass 0.75, renormalised (2/3, 1/3),
    entropy = -(2/3 ln 2/3 + 1/3 ln 1/3) = ln 3 - (2/3) ln 2 = 0.636514.
    Position B (uniform): mass 0.5, renormalised (1/2, 1/2), entropy ln 2 = 0.693147.
    Averages: mass 0.625, entropy (ln 3 - (2/3) ln 2 + ln 2) / 2 = 0.664830.
    Tolerance 1e-6: the probabilities are computed in float32."""
    logits, mask = _hand_logits()
    r = topk_stats(logits, mask, k=2)
    assert r["topk_mass"] == pytest.approx(0.625, abs=1e-6)
    assert r["topk_entropy"] == pytest.approx((math.log(3) - 2 / 3 * math.log(2) + math.log(2)) / 2, abs=1e-6)
    assert (r["k"], r["n_positions"]) == (2, 2)
    k1 = topk_stats(logits, mask, k=1)  # one token: mass = max prob, entropy 0
    assert k1["topk_mass"] == pytest.approx((0.5 + 0.25) / 2, abs=1e-6) and k1["topk_entropy"] == pytest.approx(0.0)


def test_topk_stats_chunking_and_dtype_match_a_float64_reference():
    """Random logits with prompt/padding gaps: chunk sizes 1, 3 and the default give the same numbers as
    a plain float64 full-softmax computation over the masked positions (k = V gives mass 1 and the full
    entropy). Tolerance 1e-5: float32 chunks against a float64 reference over 13 positions."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 7, 11, generator=g)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 0:3] = True
    mask[1, 5] = True  # a gap inside one row
    mask[2, 1:6] = True
    p = torch.softmax(logits.double()[mask], dim=-1)  # [13, 11]
    for k in (4, 11):
        top = p.topk(k, dim=-1).values
        q = top / top.sum(-1, keepdim=True)
        want_mass, want_ent = top.sum(-1).mean().item(), (-(q * q.log()).sum(-1)).mean().item()
        for chunk in (1, 3, 256):
            r = _topk_stats_chunked(logits, mask, k, chunk)
            assert r["n_positions"] == 13
            assert r["topk_mass"] == pytest.approx(want_mass, abs=1e-5)
            assert r["topk_entropy"] == pytest.approx(want_ent, abs=1e-5)
    bf16 = logits.to(torch.bfloat16)  # upcast per chunk: same as float32 logits holding the bf16 values
    assert topk_stats(bf16, mask, k=4) == pytest.approx(topk_stats(bf16.float(), mask, k=4), abs=1e-6)


def test_topk_stats_handles_minus_inf_logits_and_validates():
    """Logits [0, 0, -inf, -inf], k = 3: p = [0.5, 0.5, 0, 0]; mass 1, renormalised (0.5, 0.5, 0),
    entropy ln 2 (0 log 0 = 0, no NaN)."""
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    r = topk_stats(logits, torch.tensor([[True]]), k=3)
    assert r["topk_mass"] == pytest.approx(1.0) and r["topk_entropy"] == pytest.approx(math.log(2), abs=1e-6)
    logits, mask = _hand_logits()
    with pytest.raises(ValueError, match="k must be"):
        topk_stats(logits, mask, k=5)
    with pytest.raises(ValueError, match="mask must be"):
        topk_stats(logits, mask[:1], k=2)
    with pytest.raises(ValueError, match="no positions"):
        topk_stats(logits, torch.zeros_like(mask), k=2)
    with pytest.raises(ValueError, match="logits must be"):
        topk_stats(logits[0], mask, k=2)


# ------------------------------------------------------------------------------ likelihood displacement


def test_likelihood_displacement_hand_numbers():
    """chosen: initial [-10, -20, -5] -> current [-12, -18, -5]: changes [-2, 2, 0], mean 0, down 1/3
    (an unchanged pair is not 'down'). rejected: [-10, -10, -10] -> [-15, -9, -20]: changes [-5, 1, -10],
    mean -14/3, down 2/3."""
    r = likelihood_displacement([-10, -20, -5], [-12, -18, -5], [-10, -10, -10], [-15, -9, -20])
    assert r["chosen_logp_change"] == pytest.approx(0.0, abs=EXACT)
    assert r["chosen_logp_down_fraction"] == pytest.approx(1 / 3, abs=EXACT)
    assert r["rejected_logp_change"] == pytest.approx(-14 / 3, abs=EXACT)
    assert r["rejected_logp_down_fraction"] == pytest.approx(2 / 3, abs=EXACT) and r["n"] == 3
    only = likelihood_displacement(np.array([-1.0]), torch.tensor([-3.0]))
    assert only == {
        "chosen_logp_change": -2.0,
        "chosen_logp_down_fraction": 1.0,
        "rejected_logp_change": None,
        "rejected_logp_down_fraction": None,
        "n": 1,
    }


def test_likelihood_displacement_errors():
    with pytest.raises(ValueError, match="both"):
        likelihood_displacement([-1.0], [-2.0], initial_rejected_logps=[-1.0])
    with pytest.raises(ValueError, match="same length"):
        likelihood_displacement([-1.0, -2.0], [-2.0])
    with pytest.raises(ValueError, match="same length"):
        likelihood_displacement([-1.0], [-2.0], [-1.0, -3.0], [-2.0, -4.0])
    with pytest.raises(ValueError, match="empty"):
        likelihood_displacement([], [])


def test_length_controlled_win_rate_takes_the_length_advantage_out():
    import numpy as np
    import torch

    from alignkit.eval import metrics as M

    rng = np.random.default_rng(0)
    n = 400
    lp = rng.normal(120, 30, n)  # the policy's replies are longer on average
    lr = rng.normal(90, 30, n)
    x = np.tanh((lp - lr) / (lp - lr).std())
    # a judge that pays for length only: the policy wins where it is longer
    wins = rng.random(n) < 1 / (1 + np.exp(-4 * x))
    out = M.length_controlled_win_rate(wins.astype(float), np.zeros(n) + 0.5, lp, lr, n_boot=200)
    assert out["raw"] > 0.65 and out["length_coef"] > 2
    assert out["ci95"][0] < 0.5 < out["ci95"][1] and abs(out["value"] - 0.5) < 0.08  # nothing left at equal length
    # a better policy whatever the length: the controlled and raw rates agree
    better = rng.random(n) < 0.75
    out = M.length_controlled_win_rate(better.astype(float), np.zeros(n) + 0.5, lp, lr, n_boot=200)
    assert abs(out["value"] - out["raw"]) < 0.05 and out["ci95"][0] > 0.65
    # the intercept is the maximum-likelihood fit: gradient ascent in float64 finds the same
    y = wins.astype(float)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    xs, ys = torch.tensor(x), torch.tensor(y)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def nll():
        opt.zero_grad()
        z = w[0] + w[1] * xs
        loss = -(ys * torch.nn.functional.logsigmoid(z) + (1 - ys) * torch.nn.functional.logsigmoid(-z)).sum()
        loss.backward()
        return loss

    opt.step(nll)
    a, b = M._logistic_intercept(x, y)
    fitted = w.detach()
    assert a == pytest.approx(float(fitted[0]), abs=1e-5) and b == pytest.approx(float(fitted[1]), abs=1e-5)
