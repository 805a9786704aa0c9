"""Confidence intervals for before/after comparisons on the same prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PairedDiff:
    before: float  # mean score before
    after: float  # mean score after
    diff: float  # after - before
    lo: float  # 95% interval of diff (percentile bootstrap)
    hi: float
    n: int
    improved: int  # prompts whose score went up
    worsened: int  # prompts whose score went down


def paired_bootstrap(before, after, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> PairedDiff:
    """Percentile bootstrap over prompts of mean(after - before).

    Resampling prompts (not scores) keeps each prompt's before/after pair together, which is what
    makes the interval narrow when most prompts do not change (Efron & Tibshirani, 1993, ch. 13)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"before and after must be equal-length 1-D score lists; got {b.shape} and {a.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return PairedDiff(
        float(b.mean()),
        float(a.mean()),
        float(d.mean()),
        float(lo),
        float(hi),
        len(d),
        int((d > 0).sum()),
        int((d < 0).sum()),
    )
