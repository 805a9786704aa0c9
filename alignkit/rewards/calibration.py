"""Calibrated and transformed rewards for inference-aware alignment (InfAlign-CTRL).

Balashankar et al., "InfAlign: Inference-aware language model alignment", arXiv 2412.19792
(ICML 2025). Its claim: for any inference-time procedure T (best-of-N, worst-of-N, ...)
the policy that maximises the *inference-time win rate* of T(pi) against T(pi_ref), under a KL
penalty to pi_ref, solves ordinary KL-regularised RLHF with a *transformed* reward. CTRL does it in
two steps: calibrate the reward against the reference policy, then apply a transform chosen for T.

What could be read, and what is ours (the one place that says so). The paper's text of sections
3-5 could not be read here: the search tool holds only the first part of each stored page, and
what it returned of arXiv 2412.19792 (v1, v2 and v5), of the ICML 2025 proceedings page and of
reviews is the abstract and the title block; no code of the authors was found. From the abstract
(all versions): alignment should raise the *inference-time win rate* of the aligned policy against
the base (reference) model, the win rate of the output of an inference-time procedure T applied to
pi against T applied to pi_ref (v1/v2: "best-of-N sampling and best-of-N jailbreaking, where N
responses are sampled from the model and the one with the highest or lowest reward is selected");
for any T the optimal policy solves KL-regularised RLHF with a transformed reward; CTRL calibrates
the reward and then maximises a transformation of the calibrated reward under a KL penalty;
transformations are proposed for best-of-N and best-of-N jailbreaking; the calibrated reward alone
is a strong baseline for the standard win rate. Everything below that is more specific is derived
here, not read:

- Calibrated reward: C(x, y) = E_{z ~ pi_ref(.|x)} [ 1{r(x,z) < r(x,y)} + 1/2 1{r(x,z) = r(x,y)} ],
  the win probability of y against one reference sample under r, ties half (the usual rule for a
  tied comparison, so that a reference sample's C averages 1/2 even for a 0/1 reward). Estimated
  from K reference samples z_1..z_K of the same prompt as the mid-rank
  C = (#{r(z_k) < r} + 0.5 #{r(z_k) = r}) / K, in [0, 1].
- Transforms: best-of-N ("bon") Phi(c) = exp(t c); worst-of-N / best-of-N jailbreaking ("won")
  Phi(c) = -exp(-t c); "identity" Phi(c) = c (the calibrated-reward baseline, N = 1). With a
  continuous reward C is uniform under pi_ref and the best of n reference samples loses to y with
  probability C(y)^n, so the inference-time win rate of pi is E_{y ~ T_n(pi)}[C(y)^n]; exp(t c)
  is a smooth, monotone stand-in for that power that a KL-regularised RL step can optimise.
- Win rates are measured, not modelled (`selection_win_rate`): from K samples of each model per
  prompt, the reward that best-of-n (worst-of-n) keeps is the max (min) of n *distinct* samples
  (K >= n required), and W = P(T_n(pi) beats T_n(pi_ref)) + 1/2 P(tie), in closed form from the two
  empirical distributions. With ties (a 0/1 or a few-valued reward) the calibrated-power formula
  E[C_max^n] is wrong (for a 0/1 reward the reference against itself gives 0.40, 0.29 and 0.135
  at success rates 0.2, 0.5 and 0.8 with n = 4, not 1/2); the closed form gives exactly 1/2 in
  expectation for a model against itself, and agrees with E[C_max^n] for continuous rewards as K
  grows. The reference's own rows of an evaluation are measured the same way from a second,
  held-out set of reference samples (`alignkit eval --bon-n`), never printed as constants.
- The parameter t. The paper picks t per N from win-rate-vs-KL curves of the exponential
  transforms; we could not read its values, so `bon_t(n)` / `won_t(n)` compute t by this rule of
  ours instead: in the uniform-reference model above, the KL-optimal policy for Phi_t is
  pi_t(y) ∝ pi_ref(y) exp(lambda Phi_t(C(y))); set lambda so that KL(pi_t || pi_ref) = `kl`
  (default 0.5 nats) and take the t with the highest inference-time win rate (best-of-n vs
  best-of-n, resp. worst-of-n vs worst-of-n). The best t grows with n and with the KL budget (for
  n = 4: about 10.6, 12.6 and 17.3 at 0.25, 0.5 and 1 nat), so pass `t` yourself when you know the
  KL your run will spend. This rule assumes a continuous reward (C uniform under pi_ref). The scale of exp(t c) (up to
  e^t) also sets how strong the RL step's KL
  coefficient must be. For n = 1 the identity is optimal (the win rate is then linear in the
  policy), so `bon_t(1)` is an error that says so.
"""

from __future__ import annotations

import bisect
import json
import math
import numbers
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from alignkit.errors import ConfigError
from alignkit.jsonfile import write_atomic

TRANSFORMS = ("bon", "won", "identity")


def calibrate(rewards: list[float], reference_rewards: list[list[float]]) -> list[float]:
    """C_i = (#{k: ref_ik < r_i} + 0.5 #{k: ref_ik = r_i}) / K_i: each reward's mid-rank quantile
    among the rewards of its prompt's K_i reference samples, in [0, 1]."""
    if len(rewards) != len(reference_rewards):
        raise ValueError(
            f"calibrate: {len(rewards)} rewards but {len(reference_rewards)} reference reward lists; "
            "give one list (the prompt's reference samples' rewards) per reward"
        )
    out = []
    for i, (r, refs) in enumerate(zip(rewards, reference_rewards)):
        if not refs:
            raise ValueError(
                f"calibrate: item {i} has no reference rewards; sample at least one reference completion per prompt"
            )
        ordered = sorted(_finite(v, f"reference reward {k} of item {i}") for k, v in enumerate(refs))
        r = _finite(r, f"reward {i}")
        less, upto = bisect.bisect_left(ordered, r), bisect.bisect_right(ordered, r)
        out.append((less + 0.5 * (upto - less)) / len(ordered))
    return out


def transform(c, kind: str, t: float | None = None):
    """Phi(c) for a calibrated reward c (a number or a list of them): "bon" exp(t c), "won"
    -exp(-t c), "identity" c. `t` is required for "bon" and "won" (see `bon_t`, `won_t`)."""
    if kind not in TRANSFORMS:
        raise ConfigError(f"unknown calibrated-reward transform {kind!r}; choose one of {', '.join(TRANSFORMS)}")
    if kind == "identity":
        if t is not None:
            raise ConfigError(f"transform identity takes no t; got t={t!r}")
        fn = float
    else:
        if t is None or not _is_positive(t):
            raise ConfigError(f"transform {kind} needs a positive t; got {t!r} (bon_t(n) / won_t(n) give a default)")
        fn = (lambda v: math.exp(t * v)) if kind == "bon" else (lambda v: -math.exp(-t * v))
    if isinstance(c, (list, tuple)):
        return [fn(_finite(v, "calibrated reward")) for v in c]
    return fn(_finite(c, "calibrated reward"))


def selected_distribution(rewards: list[float], n: int, which: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """The reward that best-of-n (`which="max"`) or worst-of-n (`"min"`) keeps when it draws n
    *distinct* samples of the K in `rewards` uniformly (without replacement, as decoding draws n
    fresh samples): (the distinct values in increasing order, their probabilities).

    For the max: P(M <= v) = C(#{rewards <= v}, n) / C(K, n), so P(M = v) is the step of that at v.
    The min mirrors it. K >= n is required (fewer samples cannot hold n distinct ones)."""
    _check_n(n)
    if which not in ("max", "min"):
        raise ValueError(f"which must be max or min; got {which!r}")
    v = np.sort(np.asarray([_finite(x, "reward") for x in rewards], dtype=np.float64))
    k = v.size
    if k < n:
        raise ConfigError(
            f"best-/worst-of-{n} needs at least {n} samples per prompt to draw {n} distinct ones; got "
            f"{k}. Sample more (e.g. --calibration-k {max(n, 2 * n)}) or lower n."
        )
    values, counts = np.unique(v, return_counts=True)
    total = math.comb(k, n)
    if which == "max":
        upto = np.cumsum(counts)  # #{rewards <= value}
        cdf = np.array([math.comb(int(u), n) / total for u in upto])
        return values, np.diff(np.concatenate([[0.0], cdf]))
    from_top = np.cumsum(counts[::-1])[::-1]  # #{rewards >= value}
    sf = np.array([math.comb(int(u), n) / total for u in from_top])  # P(min >= value)
    return values, sf - np.concatenate([sf[1:], [0.0]])


def selection_win_rate(
    policy_rewards: list[float], reference_rewards: list[float], n: int, n_ref: int | None = None, which: str = "max"
) -> float:
    """The win rate of the policy's best-of-n (worst-of-n with `which="min"`) against the
    reference's best-of-`n_ref` (default n), for one prompt, in closed form from the empirical
    reward distributions of K policy and K' reference samples: a higher reward wins, a tie counts
    half,

        W = sum_y P(T_n(policy) = y) [ P(T_nref(reference) < y) + 1/2 P(T_nref(reference) = y) ],

    with T the max (min) of n distinct samples (`selected_distribution`). W(a, b) + W(b, a) = 1 when
    n = n_ref, so a model against an independent sample set of itself scores 1/2 in expectation,
    whatever the reward's ties. `n_ref=1` is the win rate against one reference sample."""
    n_ref = n if n_ref is None else n_ref
    pv, pp = selected_distribution(policy_rewards, n, which)
    rv, rp = selected_distribution(reference_rewards, n_ref, which)
    below = np.concatenate([[0.0], np.cumsum(rp)])  # below[j] = P(reference < rv[j])
    j = np.searchsorted(rv, pv, side="left")  # first reference value >= y
    lower = below[j]
    equal = np.where((j < rv.size) & (rv[np.minimum(j, rv.size - 1)] == pv), rp[np.minimum(j, rv.size - 1)], 0.0)
    return float(np.sum(pp * (lower + 0.5 * equal)))


def best_of_n_win_rate(policy_rewards: list[float], reference_rewards: list[float], n: int) -> float:
    """Best-of-n from the policy against one reference sample (Beirami et al., arXiv 2401.01879,
    count the same comparison), ties half; see `selection_win_rate`."""
    return selection_win_rate(policy_rewards, reference_rewards, n, 1, "max")


def best_of_n_vs_best_of_n_win_rate(policy_rewards: list[float], reference_rewards: list[float], n: int) -> float:
    """The inference-time win rate of best-of-n: the policy's best of n against the reference's best
    of n, ties half (1/2 for the reference against itself, in expectation)."""
    return selection_win_rate(policy_rewards, reference_rewards, n, n, "max")


def worst_of_n_vs_worst_of_n_win_rate(policy_rewards: list[float], reference_rewards: list[float], n: int) -> float:
    """Worst-of-n (best-of-n jailbreaking keeps the lowest-reward reply) from the policy against the
    reference's worst of n: the policy wins when its worst reply scores higher; ties half."""
    return selection_win_rate(policy_rewards, reference_rewards, n, n, "min")


def bon_t(n: int, kl: float = 0.5) -> float:
    """t for the best-of-n transform exp(t c), by the rule in the module docstring (our rule, not
    a value read from the paper): the t maximising best-of-n vs best-of-n win rate at KL `kl`."""
    return _best_t("bon", n, kl)


def won_t(n: int, kl: float = 0.5) -> float:
    """t for the worst-of-n transform -exp(-t c), by the same rule with worst-of-n win rates."""
    return _best_t("won", n, kl)


class CalibratedReward:
    """A reward callable `(prompts, completions, **columns) -> list[float]`: Phi(C(x, y)).

    `reward`: the base reward r. `reference`: either a function `sample_reference(prompts) ->
    list[list[str]]` (K reference completions per prompt; the caller wraps the reference model's
    sampler) or a mapping {prompt JSON text: [completions]}. Each prompt's reference rewards are
    computed once and kept in memory under the prompt's JSON text; the columns of the prompt's
    first row are passed to r with them (r may need e.g. the reference answer). `save_cache` /
    `load_cache` keep them on disk, under `cache_key`: a string that names everything the cached
    rewards depend on (reference model fingerprint, K, sampling settings, the base reward)."""

    name = "calibrated"

    def __init__(
        self,
        reward: Callable,
        reference,
        transform: str = "bon",
        n: int = 4,
        t: float | None = None,
        cache_key: str | None = None,
    ):
        if transform not in TRANSFORMS:
            raise ConfigError(
                f"reward calibrated: unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}"
            )
        _check_n(n)
        if transform == "identity" and t is not None:
            raise ConfigError(f"reward calibrated: transform identity takes no t; got t={t!r}")
        if t is None and transform != "identity":
            t = bon_t(n) if transform == "bon" else won_t(n)
        if t is not None and not _is_positive(t):
            raise ConfigError(f"reward calibrated: `t` must be a positive number; got {t!r}")
        if not (callable(reference) or isinstance(reference, dict)):
            raise ConfigError(
                "reward calibrated: `reference` must be a function prompts -> list of K reference "
                f"completions per prompt, or a dict {{prompt JSON: completions}}; got {type(reference)}"
            )
        self.reward, self.reference, self.kind, self.n, self.t = reward, reference, transform, n, t
        self.cache_key = cache_key
        self.cache: dict[str, list[float]] = {}  # prompt JSON -> rewards of its reference samples

    def __repr__(self) -> str:
        return f"CalibratedReward({self.kind}, n={self.n}, t={self.t}, {len(self.cache)} prompts cached)"

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"reward calibrated: {len(prompts)} prompts but {len(completions)} completions")
        keys = [prompt_key(p) for p in prompts]
        missing = {}  # key -> first row index, in order
        for i, key in enumerate(keys):
            if key not in self.cache and key not in missing:
                missing[key] = i
        if missing:
            self._fill([prompts[i] for i in missing.values()], list(missing), list(missing.values()), columns)
        calibrated = calibrate(self.reward(prompts, completions, **columns), [self.cache[k] for k in keys])
        return transform(calibrated, self.kind, self.t)

    def _fill(self, prompts: list, keys: list, rows: list, columns: dict) -> None:
        """Sample (or look up) the reference completions of new prompts and score them in one call."""
        if callable(self.reference):
            samples = self.reference(prompts)
            if len(samples) != len(prompts):
                raise ValueError(
                    f"reward calibrated: the reference sampler returned {len(samples)} lists for "
                    f"{len(prompts)} prompts; return K completions per prompt"
                )
        else:
            absent = [k for k in keys if k not in self.reference]
            if absent:
                raise ConfigError(
                    f"reward calibrated: no reference completions for prompt {absent[0]} "
                    f"({len(absent)} prompt(s) missing from the table)"
                )
            samples = [self.reference[k] for k in keys]
        flat_prompts, flat_completions, flat_columns = [], [], {name: [] for name in columns}
        for prompt, row, group in zip(prompts, rows, samples):
            if not group:
                raise ValueError(f"reward calibrated: no reference completions for prompt {prompt_key(prompt)}")
            flat_prompts += [prompt] * len(group)
            flat_completions += list(group)
            for name, values in columns.items():
                flat_columns[name] += [values[row]] * len(group)
        scores = list(self.reward(flat_prompts, flat_completions, **flat_columns))
        start = 0
        for key, group in zip(keys, samples):
            self.cache[key] = [float(s) for s in scores[start : start + len(group)]]
            start += len(group)

    def save_cache(self, path) -> Path:
        """Write the cached reference rewards as JSON, stamped with `cache_key`."""
        key = self._require_key("save_cache")
        return write_atomic(path, {"cache_key": key, "reference_rewards": self.cache})

    def load_cache(self, path) -> int:
        """Read reference rewards saved by `save_cache` (made under the same `cache_key`); returns
        how many prompts were loaded. Entries already in memory are replaced."""
        key = self._require_key("load_cache")
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"reward calibrated: cannot read cache {path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("reference_rewards"), dict):
            raise ConfigError(f"reward calibrated: {path} is not a calibration cache (no `reference_rewards`)")
        if data.get("cache_key") != key:
            raise ConfigError(
                f"reward calibrated: cache {path} was made for key {data.get('cache_key')!r}, not "
                f"{key!r} (another reference model, K or sampling setting); sample again or load the "
                "cache made for this key"
            )
        loaded = {}
        for prompt, values in data["reference_rewards"].items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"reward calibrated: cache {path}: the entry for {prompt} is not a list of rewards")
            loaded[prompt] = [_finite(v, f"cache {path}: a reward of {prompt}") for v in values]
        self.cache.update(loaded)
        return len(loaded)

    def _require_key(self, what: str) -> str:
        if not isinstance(self.cache_key, str) or not self.cache_key:
            raise ConfigError(
                f"reward calibrated: {what} needs `cache_key`, a string naming the reference model, "
                "K, the sampling settings and the base reward, so a cache is never reused for "
                "another setting"
            )
        return self.cache_key


def prompt_key(prompt) -> str:
    """A prompt's cache key: its JSON text (sorted keys, so equal message dicts give equal keys)."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


# --- t by the closed-form model: C uniform under pi_ref, pi_t ∝ pi_ref exp(lambda Phi_t(C)) ----------------------

_GRID = 2000  # cells of [0, 1]; t up to _T_MAX keeps exp(t c)'s top within many cells
_T_MIN, _T_MAX = 0.25, 200.0
_U = (np.arange(_GRID) + 0.5) / _GRID


def _tilted_win_rate(kind: str, t: float, n: int, kl: float) -> float:
    """Inference-time win rate of the KL-optimal policy for Phi_t at KL `kl`, on the grid."""
    phi = np.exp(t * (_U - 1.0)) if kind == "bon" else -np.exp(-t * _U)  # exp(tc) / e^t: same policy family

    def masses(log_lam):
        a = math.exp(log_lam) * (phi - phi.max())
        w = np.exp(a)
        return w / w.sum()

    def divergence(m):  # KL of the tilted distribution to the uniform one, in nats
        return float(np.sum(m * np.log(np.maximum(m * _GRID, 1e-300))))

    lo, hi = -20.0, 20.0  # log lambda; KL rises monotonically with lambda
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if divergence(masses(mid)) < kl else (lo, mid)
    m = masses(0.5 * (lo + hi))
    below = np.cumsum(m) - m  # P(C < cell)
    if kind == "bon":
        return float(np.sum(((below + m) ** n - below**n) * _U**n))
    above = 1.0 - below  # P(C >= cell)
    return float(np.sum((above**n - (above - m) ** n) * (1.0 - (1.0 - _U) ** n)))


@cache
def _best_t(kind: str, n: int, kl: float) -> float:
    _check_n(n)
    if n == 1:
        raise ConfigError(
            f"transform {kind} with n=1: the win rate is linear in the policy, so the calibrated "
            "reward itself (transform identity) is optimal; use transform: identity"
        )
    if not (_is_positive(kl) and kl <= 3.0):
        raise ConfigError(f"{kind}_t: `kl` must be in (0, 3] nats; got {kl!r}")
    grid = np.geomspace(_T_MIN, _T_MAX, 41)
    wins = [_tilted_win_rate(kind, t, n, kl) for t in grid]
    i = int(np.argmax(wins))
    if i in (0, len(grid) - 1):
        raise ConfigError(
            f"{kind}_t(n={n}, kl={kl}): the best t lies at or beyond the searched range "
            f"[{_T_MIN}, {_T_MAX}]; pass t explicitly"
        )
    lo, hi = math.log(grid[i - 1]), math.log(grid[i + 1])  # golden-section search on log t
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = (_tilted_win_rate(kind, math.exp(x), n, kl) for x in (a, b))
    for _ in range(30):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _tilted_win_rate(kind, math.exp(a), n, kl)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _tilted_win_rate(kind, math.exp(b), n, kl)
    return round(math.exp(0.5 * (lo + hi)), 2)


# --- helpers ----------------------------------------------------------------------------------------------------


def _check_n(n) -> None:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ConfigError(f"n (samples of best-/worst-of-n) must be a positive integer; got {n!r}")


def _is_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _finite(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number; got {x!r}")
    return float(x)
