"""Evaluation metrics of what alignment did: ranking accuracy, idealized ranking accuracy, length bias,
win rate, KL to the reference, top-k over-optimisation indicators, likelihood displacement.

Pure functions. Inputs may be lists, numpy arrays or torch tensors; everything is computed in float64
(except `topk_stats`, which works on the logits in float32 chunks), and every result is a dict of plain
Python floats / ints / lists, so it can go straight into JSON.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_BOOT_CHUNK_ELEMS = 1 << 20  # bootstrap index matrix is drawn in blocks of at most this many entries
_MAX_POINTS = 2000  # scatter points returned by length_bias
_TOPK_CHUNK_POSITIONS = 256  # positions per chunk in topk_stats
DEFAULT_PREF_PROB = 0.75  # alpha used by idealized_ranking_accuracy when none is given (see there)


# ----------------------------------------------------------------------------------------------------
# input handling


def _as_1d(x, name: str) -> np.ndarray:
    """A non-empty, finite, 1-D float64 array from a list / numpy array / torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a flat list/array of numbers: {e}") from None
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per item); got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty; need at least one item")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf at index {int(np.flatnonzero(~np.isfinite(a))[0])}")
    return a


def _as_paired(**arrays) -> list[np.ndarray]:
    """Several 1-D arrays that must have one entry per item (same length)."""
    out = [_as_1d(v, k) for k, v in arrays.items()]
    lengths = {k: len(a) for k, a in zip(arrays, out)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length (one entry per item); got {lengths}")
    return out


def _pairwise_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a > b, 0.5 where a == b, 0 where a < b."""
    return (a > b) + 0.5 * (a == b)


# ----------------------------------------------------------------------------------------------------
# intervals


def bootstrap_mean_ci(values, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `values` and its percentile-bootstrap interval over items.

    Items are resampled with replacement `n_boot` times; lo/hi are the (1-level)/2 and (1+level)/2
    quantiles of the resampled means (Efron & Tibshirani, 1993, ch. 13). The resample indices are
    drawn in blocks so memory stays bounded for large n; the result is reproducible for a given seed."""
    v = _as_1d(values, "values")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_CHUNK_ELEMS // len(v))
    means = np.concatenate(
        [v[rng.integers(0, len(v), size=(min(rows, n_boot - i), len(v)))].mean(axis=1) for i in range(0, n_boot, rows)]
    )
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(v.mean()), float(lo), float(hi)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion p = successes / n (Wilson, 1927).

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at p = 0 or 1.
    `successes` may be fractional (ties counted as 0.5)."""
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}]; got {successes}")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)  # clip float rounding at the ends


def _accuracy_dict(scores: np.ndarray) -> dict:
    n = len(scores)
    lo, hi = wilson_interval(float(scores.sum()), n)
    return {"value": float(scores.mean()), "ci95": [lo, hi], "n": n}


# ----------------------------------------------------------------------------------------------------
# ranking accuracy


def ranking_accuracy(chosen_logps, rejected_logps) -> dict:
    """Fraction of pairs whose chosen response scores above the rejected one.

        acc = (1/N) sum_i [ 1(s_c > s_r) + 0.5 * 1(s_c == s_r) ]

    With s = log pi(y|x) this is the policy's ranking accuracy (Chen et al., arXiv 2405.19534,
    Def. 2.3, uses >= so a tie counts as correct; here an exact tie counts 0.5, what a coin flip
    between two equal scores would give, so a model with constant scores reads 0.5, not 1). With
    s = a reward model's score or the implicit DPO reward beta * log(pi/pi_ref) it is the reward
    accuracy. The interval is Wilson's with ties as half
    successes.

    Returns {"value", "ci95": [lo, hi], "n", "ties"}."""
    c, r = _as_paired(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    scores = _pairwise_scores(c, r)
    return {**_accuracy_dict(scores), "ties": int((c == r).sum())}


def idealized_ranking_accuracy(ref_chosen_logps, ref_rejected_logps, beta: float, pref_prob=None) -> dict:
    """Ranking accuracy the optimal RLHF / DPO policy would reach from this reference model.

    Chen et al., "Preference Learning Algorithms Do Not Learn Preference Rankings", arXiv 2405.19534
    (NeurIPS 2024), Sec. 3, "idealized ranking accuracy". The optimum of the KL-regularised objective
    is pi*(y|x) ∝ pi_ref(y|x) exp(r*(x,y)/beta), and a Bradley-Terry r* with alpha = P(y_w > y_l) gives
    r*(y_w) - r*(y_l) = log(alpha / (1 - alpha)). Hence

        log pi*(y_w)/pi*(y_l) = z = log pi_ref(y_w)/pi_ref(y_l) + (1/beta) log(alpha / (1 - alpha))

    and pi* ranks the pair like the annotators' majority iff sign(z) == sign(alpha - 1/2), i.e. z > 0
    in the usual case alpha > 1/2. The metric is the mean of that indicator over pairs (z == 0 counts
    0.5, as in `ranking_accuracy`). Pairs with alpha == 1/2 have no majority and are left out (the
    authors' code does the same for AlpacaFarm, `include_ties=False`); alpha = 1 gives z = +inf.

    pref_prob: per-pair alpha (array), a single float for all pairs, or None. alpha is the fraction
    of annotators who preferred the *chosen* response. None uses DEFAULT_PREF_PROB = 0.75 for every
    pair: most datasets carry one annotation per pair, so alpha is unknown, and the authors' released
    code (angie-chen55/pref-learning-ranking-acc, rlhf_minimizer_client.py, `simulate_proportion=0.75`)
    substitutes 0.75 for exactly that case; their Table 1 instead uses AlpacaFarm's validation split,
    which has several human annotations per pair. With the default, the result is the fraction of
    pairs whose reference log-ratio exceeds -(1/beta) log 3 (log 3 = log(0.75/0.25)).

    Log-probs are whatever the caller passes: summed log-probs give the paper's R*, mean per-token
    log-probs its length-normalised variant.

    Returns {"value", "ci95" (Wilson), "n" (pairs scored), "n_ties_excluded", "beta",
    "pref_prob" (the single alpha used, or None when per-pair), "pref_prob_is_default",
    "reference_value" (ranking accuracy of pi_ref itself on the same pairs, for the gap)}."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    c, r = _as_paired(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    alpha, single = _pref_probs(pref_prob, len(c))
    keep = alpha != 0.5
    if not keep.any():
        raise ValueError("every pair has pref_prob == 0.5 (no majority), so no pair can be scored")
    c, r, alpha = c[keep], r[keep], alpha[keep]
    with np.errstate(divide="ignore"):  # alpha in {0, 1} gives -inf / +inf on purpose
        z = (c - r) + (np.log(alpha) - np.log1p(-alpha)) / beta
    majority = np.where(alpha > 0.5, 1.0, -1.0)
    scores = _pairwise_scores(z * majority, np.zeros_like(z))
    ref_scores = _pairwise_scores((c - r) * majority, np.zeros_like(z))
    return {
        **_accuracy_dict(scores),
        "n_ties_excluded": int((~keep).sum()),
        "beta": float(beta),
        "pref_prob": single,
        "pref_prob_is_default": pref_prob is None,
        "reference_value": float(ref_scores.mean()),
    }


def _pref_probs(pref_prob, n: int) -> tuple[np.ndarray, float | None]:
    """(per-pair alpha array, the single alpha if one value applies to all pairs else None)."""
    if pref_prob is None or np.ndim(pref_prob) == 0:
        a = DEFAULT_PREF_PROB if pref_prob is None else float(pref_prob)
        alpha, single = np.full(n, a), a
    else:
        alpha, single = _as_1d(pref_prob, "pref_prob"), None
        if len(alpha) != n:
            raise ValueError(f"pref_prob has {len(alpha)} entries but there are {n} pairs")
    if not np.all((alpha >= 0) & (alpha <= 1)):
        bad = alpha[~((alpha >= 0) & (alpha <= 1))][0]
        raise ValueError(f"pref_prob must be in [0, 1] (fraction of annotators preferring chosen); got {bad}")
    return alpha, single


# ----------------------------------------------------------------------------------------------------
# length bias


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation, or None where it is undefined (n < 2 or a constant input)."""
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    dx, dy = x - x.mean(), y - y.mean()
    r = float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return max(-1.0, min(1.0, r))


def _as_lengths(x, name: str) -> np.ndarray:
    a = _as_1d(x, name)
    if np.any(a < 0) or np.any(a != np.round(a)):
        raise ValueError(f"{name} must hold non-negative whole numbers (token or character counts)")
    return a


def length_bias(rewards_chosen, rewards_rejected, len_chosen, len_rejected) -> dict:
    """How much a reward (model score, implicit reward, log-prob) tracks response length.

    - "corr_reward_length": Pearson r between reward and length over all 2N responses pooled.
    - "corr_margin_length_diff": Pearson r between the margin r_c - r_r and len_c - len_r.
      Both are None (not NaN) when undefined: fewer than 2 points or a constant input.
    - "accuracy_chosen_longer" / "accuracy_chosen_shorter" / "accuracy_equal_length":
      {"value", "ci95", "n"} accuracy (margin > 0, tie 0.5, Wilson interval) on the pairs where the
      chosen response is longer / shorter / the same length; value and ci95 are None when n == 0.
      A reward that mostly rewards length is right far more often on the first subset than the second.
    - "points": [{"length_diff", "margin"}] for a scatter plot; at most 2000, taken at evenly spaced
      indices (np.linspace over the pairs, first and last included) so the plot is deterministic.
    - "n": number of pairs."""
    rc, rr, lc, lr = _as_paired(
        rewards_chosen=rewards_chosen,
        rewards_rejected=rewards_rejected,
        len_chosen=len_chosen,
        len_rejected=len_rejected,
    )
    lc, lr = _as_lengths(lc, "len_chosen"), _as_lengths(lr, "len_rejected")
    margin, diff = rc - rr, lc - lr
    scores = _pairwise_scores(rc, rr)
    return {
        "corr_reward_length": _pearson(np.concatenate([rc, rr]), np.concatenate([lc, lr])),
        "corr_margin_length_diff": _pearson(margin, diff),
        "accuracy_chosen_longer": _subset_accuracy(scores, diff > 0),
        "accuracy_chosen_shorter": _subset_accuracy(scores, diff < 0),
        "accuracy_equal_length": _subset_accuracy(scores, diff == 0),
        "points": _scatter_points(diff, margin),
        "n": len(rc),
    }


def _subset_accuracy(scores: np.ndarray, where: np.ndarray) -> dict:
    if not where.any():
        return {"value": None, "ci95": None, "n": 0}
    return _accuracy_dict(scores[where])


def _scatter_points(diff: np.ndarray, margin: np.ndarray) -> list[dict]:
    idx = np.arange(len(diff))
    if len(idx) > _MAX_POINTS:
        # step (n-1)/1999 > 1, so the rounded indices are distinct
        idx = np.round(np.linspace(0, len(diff) - 1, _MAX_POINTS)).astype(np.int64)
    return [{"length_diff": int(diff[i]), "margin": float(margin[i])} for i in idx]


# ----------------------------------------------------------------------------------------------------
# win rate, KL


def win_rate(policy_scores, reference_scores, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Win rate of the policy against a reference on the same prompts.

    Per prompt: 1 if policy score > reference score, 0.5 on a tie, else 0; the value is the mean.
    The interval is a percentile bootstrap over prompts (`bootstrap_mean_ci`).

    Returns {"value", "ci95": [lo, hi], "n", "wins", "ties", "losses"}."""
    p, r = _as_paired(policy_scores=policy_scores, reference_scores=reference_scores)
    value, lo, hi = bootstrap_mean_ci(_pairwise_scores(p, r), n_boot=n_boot, seed=seed)
    return {
        "value": value,
        "ci95": [lo, hi],
        "n": len(p),
        "wins": int((p > r).sum()),
        "ties": int((p == r).sum()),
        "losses": int((p < r).sum()),
    }


def _logistic_intercept(x: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(a, b) of the logistic regression P(y) = sigmoid(a + b x) fitted to soft labels y in [0, 1]
    by Newton's method (the maximum-likelihood fit; a tiny ridge keeps a separable set finite)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    ridge = 1e-6 * np.eye(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (y - p) - ridge @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(
    policy_scores, reference_scores, policy_lengths, reference_lengths, n_boot: int = 2000, seed: int = 0
) -> dict:
    """The win rate with the length advantage taken out, as AlpacaEval's length-controlled win rate
    does (Dubois et al., Length-Controlled AlpacaEval, arXiv 2404.04475): a logistic regression of
    each prompt's judgement (1 win, 0.5 tie, 0 loss) on the length difference, read at a difference
    of zero,

        P(win) = sigmoid(a + b tanh((len_policy - len_reference) / sd)),   lc = sigmoid(a),

    sd the standard deviation of the length differences (tanh bounds a few extreme lengths' pull,
    as AlpacaEval's GLM does). Departure: no per-instruction difficulty term (one policy and one
    reference, not a leaderboard of models). The interval is a percentile bootstrap over prompts.

    Returns {"value", "ci95": [lo, hi], "raw", "length_coef", "n"}: `raw` the plain win rate, and
    `length_coef` b, how much a longer reply moved the judgement."""
    p, r = _as_paired(policy_scores=policy_scores, reference_scores=reference_scores)
    lp, lr = _as_paired(policy_lengths=policy_lengths, reference_lengths=reference_lengths)
    if len(lp) != len(p):
        raise ValueError(f"{len(p)} scores but {len(lp)} lengths")
    y = _pairwise_scores(p, r)
    diff = lp - lr
    sd = float(diff.std()) or 1.0
    x = np.tanh(diff / sd)

    def fit(idx: np.ndarray) -> float:
        a, _ = _logistic_intercept(x[idx], y[idx])
        return 1.0 / (1.0 + math.exp(-a))

    everything = np.arange(len(y))
    a, b = _logistic_intercept(x, y)
    rng = np.random.default_rng(seed)
    boots = [fit(rng.integers(0, len(y), len(y))) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {
        "value": fit(everything),
        "ci95": [float(lo), float(hi)],
        "raw": float(y.mean()),
        "length_coef": b,
        "n": len(y),
    }


def kl_estimate(policy_logps, ref_logps) -> dict:
    """KL(pi || pi_ref) estimated from sequences sampled from the policy pi.

    Each input holds, per sampled sequence y ~ pi(.|x), the log-prob of the whole completion summed
    over its tokens, under pi and under pi_ref. The per-sequence estimator is

        k1(y) = log pi(y|x) - log pi_ref(y|x),

    and E_{y~pi}[k1] = sum_y pi(y|x) log(pi(y|x)/pi_ref(y|x)) = KL(pi || pi_ref) exactly, so the
    sample mean is unbiased (Schulman, "Approximating KL Divergence", 2020). It is only unbiased for
    samples from pi: on offline data (e.g. dataset responses) it measures something else. Single k1
    terms can be negative and are noisy; the mean is not. Summed (not per-token mean) log-probs make
    this the sequence-level KL, the quantity the RLHF objective penalises; divide by the mean length
    for a per-token figure. The interval is a percentile bootstrap over sequences.

    Returns {"value", "ci95": [lo, hi], "n"}."""
    lp, lr = _as_paired(policy_logps=policy_logps, ref_logps=ref_logps)
    value, lo, hi = bootstrap_mean_ci(lp - lr)
    return {"value": value, "ci95": [lo, hi], "n": len(lp)}


# ----------------------------------------------------------------------------------------------------
# top-k over-optimisation indicators


def topk_stats(logits, mask, k: int = 10) -> dict:
    """Top-k probability mass and top-k entropy of the next-token distributions, averaged over the
    scored positions.

    Shi et al., "Understanding Likelihood Over-optimisation in Direct Alignment Algorithms", arXiv
    2410.11677, name "Diminishing Top-k Probability Mass" and "Decreasing Entropy over Top-k Tokens" as
    signs that over-optimised output diversity starts to hurt. At each position with mask true, with
    p = softmax(logits) over the vocabulary and T_k its k most likely tokens:

        topk_mass    = sum_{v in T_k} p_v
        topk_entropy = -sum_{v in T_k} q_v log q_v,  q_v = p_v / topk_mass   (nats; in [0, log k])

    Memory: logits [B, T, V] is read in slices of at most 256 positions of one row (views, no copy);
    each slice is copied once into a float32 [chunk, V] buffer that is then exponentiated in place, so
    no more than one extra [chunk, V] float32 tensor exists at a time (plus [chunk, k] results and
    torch.topk's per-row scratch). Positions between a row's first and last scored position are
    computed and dropped by the mask; completion spans are contiguous, so that waste is small.

    mask [B, T] bool. Returns {"topk_mass", "topk_entropy", "k", "n_positions"}."""
    return _topk_stats_chunked(logits, mask, k, _TOPK_CHUNK_POSITIONS)


def _topk_stats_chunked(logits, mask, k: int, chunk: int) -> dict:
    _check_topk_inputs(logits, mask, k)
    mass_sum = ent_sum = 0.0
    n = 0
    for b in range(logits.shape[0]):
        pos = mask[b].nonzero()
        if len(pos) == 0:
            continue
        for t0 in range(int(pos[0]), int(pos[-1]) + 1, chunk):
            t1 = min(t0 + chunk, int(pos[-1]) + 1)
            keep = mask[b, t0:t1].to(logits.device)
            mass, ent = _topk_chunk(logits[b, t0:t1], k)
            # summed on the host in float64: mps has no float64, and a chunk is at most `chunk` values
            mass_sum += float(mass[keep].cpu().double().sum())
            ent_sum += float(ent[keep].cpu().double().sum())
            n += int(keep.sum())
    return {"topk_mass": mass_sum / n, "topk_entropy": ent_sum / n, "k": int(k), "n_positions": n}


def _topk_chunk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [c, V] -> (top-k mass [c], renormalised top-k entropy [c]), float32."""
    buf = x.to(torch.float32, copy=True)  # the one [c, V] float32 buffer
    top = buf.topk(k, dim=-1).values  # [c, k]
    m = top[:, :1]  # row max, for a stable softmax
    z = buf.sub_(m).exp_().sum(dim=-1)  # in place: sum_v exp(l_v - max)   [c]
    top_shift = top - m
    mass = top_shift.exp().sum(dim=-1) / z
    log_q = top_shift - torch.logsumexp(top_shift, dim=-1, keepdim=True)  # log of renormalised top-k
    ent = -torch.special.xlogy(log_q.exp(), log_q.exp()).sum(dim=-1)  # xlogy: 0 log 0 = 0 for -inf logits
    return mass, ent


def _check_topk_inputs(logits, mask, k: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point torch tensor of shape [B, T, V]")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(logits.shape[:2]):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape [B, T] = {tuple(logits.shape[:2])}; got {got}")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, V={logits.shape[-1]}]; got {k}")
    if not mask.any():
        raise ValueError("mask selects no positions; nothing to score")


# ----------------------------------------------------------------------------------------------------
# likelihood displacement


def likelihood_displacement(
    initial_chosen_logps, current_chosen_logps, initial_rejected_logps=None, current_rejected_logps=None
) -> dict:
    """How the log-probs of the preference data moved from the initial model to the current one.

    Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference
    Optimization", arXiv 2410.08847, Sec. 2.2: likelihood displacement is the preferred response's
    log-probability going down while the preference loss goes down. Per pair,
    delta_i = log pi_current(y_i|x_i) - log pi_initial(y_i|x_i), and

        chosen_logp_change        = mean_i delta_i(chosen)
        chosen_logp_down_fraction = (1/N) #{i : delta_i(chosen) < 0}

    and the same for the rejected responses when both rejected arrays are given (None otherwise;
    in DPO the rejected log-prob is expected to fall, so only the chosen side signals displacement).

    Returns {"chosen_logp_change", "chosen_logp_down_fraction", "rejected_logp_change",
    "rejected_logp_down_fraction", "n"}."""
    if (initial_rejected_logps is None) != (current_rejected_logps is None):
        raise ValueError("give both initial_rejected_logps and current_rejected_logps, or neither")
    c0, c1 = _as_paired(initial_chosen_logps=initial_chosen_logps, current_chosen_logps=current_chosen_logps)
    dc = c1 - c0
    out = {
        "chosen_logp_change": float(dc.mean()),
        "chosen_logp_down_fraction": float((dc < 0).mean()),
        "rejected_logp_change": None,
        "rejected_logp_down_fraction": None,
        "n": len(dc),
    }
    if initial_rejected_logps is not None:
        r0, r1 = _as_paired(
            initial_chosen_logps=c0,
            initial_rejected_logps=initial_rejected_logps,
            current_rejected_logps=current_rejected_logps,
        )[1:]
        dr = r1 - r0
        out.update(rejected_logp_change=float(dr.mean()), rejected_logp_down_fraction=float((dr < 0).mean()))
    return out
