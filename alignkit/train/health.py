"""The training health monitor: rules over the metrics as they are logged, each naming the step,
the evidence and one line of advice.

A rule is a pure function of the metric history (`History`) and the thresholds (`health.*`,
`alignkit.config.HealthConfig`), registered by name in `RULES` with the metrics it reads. Its
docstring says what it detects, why (the paper, where there is one) and the exact condition.
`HealthMonitor` keeps the history of each split (`train`, `eval`), runs every rule that reads a
metric of the row just logged, and returns the alerts that are new.

De-duplication: a rule alerts when its condition becomes true and then stays silent while the
condition holds. It re-arms once the condition has been false on `health.clear_rows` consecutive
rows it was checked on; a condition that comes back after that alerts again. A row that carries
none of a rule's metrics does not check the rule, so it neither alerts nor counts as clear.

Rules only read metrics the recipes log (the metrics tables of docs/training.md and
docs/online.md); a rule whose metrics are absent from a run never runs. Non-finite values (logged as
null) are not recorded. Windows count logged rows, not optimizer steps (`train.log_every` > 1 makes
them span more steps).

The monitor's state (bounded history and which rules are active) goes into every checkpoint, so a
resumed run neither repeats an alert nor forgets its history. Nothing here imports torch or the
config module: `alignkit.config` reads `RULES` to check `train.stop_on`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from alignkit.config import HealthConfig

LN2 = math.log(2)

# Registered pair losses that equal -log sigmoid(0) = ln 2 when the policy equals the reference
# (every log-ratio 0), so a loss that stays at ln 2 means the policy has not moved (tested against
# the loss registry in tests/test_health.py).
LN2_LOSSES = frozenset({"dpo", "cdpo", "robust_dpo", "dpop", "f_dpo", "rdpo"})

# (train metric that the run optimises, held-out metrics it should improve): the proxy reward of
# online recipes against the held-out reward of greedy replies (or a win rate, where an eval row
# carries one); the implicit reward margin of the DPO family against held-out preference accuracy.
PROXY_PAIRS = (("reward", ("reward", "win_rate")), ("rewards/margins", ("rewards/accuracies",)))


@dataclass
class Alert:
    rule: str
    step: int
    seen_in: str  # the split of the row whose logging triggered the check: "train" or "eval"
    message: str  # what was seen, in one sentence with the numbers
    evidence: dict  # the numbers that triggered it (JSON-safe)
    advice: str  # one line: what to try

    def to_row(self, level: str = "warn") -> dict:
        """The alert as the fields of its `metrics.jsonl` row (the logger adds step and split);
        `level` is `error` for an alert that stops the run (`train.stop_on`)."""
        return {
            "rule": self.rule,
            "seen_in": self.seen_in,
            "level": level,
            "message": self.message,
            "evidence": self.evidence,
            "advice": self.advice,
        }

    def line(self) -> str:
        return f"health alert at step {self.step}: {self.rule}: {self.message} Advice: {self.advice}"


class History:
    """The last values of each watched metric per split, as (step, value), plus the first ones.

    `cap` values are kept per metric (the longest window a rule looks at), and the first `smooth`
    values of every metric are kept for good (the rules that compare with the start of the run)."""

    def __init__(self, cap: int, smooth: int, ln2_keys: tuple = ()):
        self.cap, self.smooth, self.ln2_keys = cap, smooth, tuple(ln2_keys)
        self.series: dict = {"train": {}, "eval": {}}  # split -> key -> [(step, value)]
        self.first: dict = {"train": {}, "eval": {}}  # split -> key -> [value] (at most `smooth`)
        self.step, self.split = 0, "train"  # the row being checked

    def add(self, split: str, key: str, step: int, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        points = self.series.setdefault(split, {}).setdefault(key, [])
        points.append((int(step), float(value)))
        del points[: -self.cap]
        first = self.first.setdefault(split, {}).setdefault(key, [])
        if len(first) < self.smooth:
            first.append(float(value))

    def points(self, split: str, key: str, n: int | None = None) -> list:
        """The last `n` (all kept, if None) (step, value) pairs of `key` in `split`."""
        pts = self.series.get(split, {}).get(key, [])
        return pts[-n:] if n else list(pts)

    def values(self, split: str, key: str, n: int | None = None) -> list:
        return [v for _, v in self.points(split, key, n)]

    def recent_mean(self, split: str, key: str) -> float | None:
        """Mean of the last `smooth` values, or None until there are that many."""
        vals = self.values(split, key, self.smooth)
        return sum(vals) / len(vals) if len(vals) >= self.smooth else None

    def start_mean(self, split: str, key: str) -> float | None:
        """Mean of the first `smooth` values ever recorded, or None until there are that many."""
        vals = self.first.get(split, {}).get(key, [])
        return sum(vals) / len(vals) if len(vals) >= self.smooth else None

    def state_dict(self) -> dict:
        return {
            "series": {s: {k: [list(p) for p in pts] for k, pts in d.items()} for s, d in self.series.items()},
            "first": {s: {k: list(v) for k, v in d.items()} for s, d in self.first.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.series = {
            s: {k: [(int(a), float(b)) for a, b in pts][-self.cap :] for k, pts in d.items()}
            for s, d in state["series"].items()
        }
        self.first = {s: {k: list(v)[: self.smooth] for k, v in d.items()} for s, d in state["first"].items()}


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable  # (History, HealthConfig) -> (message, evidence) or None
    reads: dict  # split -> metric keys; a logged row of that split carrying one of them checks the rule
    advice: str

    def applies(self, split: str, row: dict) -> bool:
        return any(k in row for k in self.reads.get(split, ()))

    def check(self, h: History, cfg) -> Alert | None:
        """The rule's alert for the history as it stands (at `h.step`), or None."""
        found = self.fn(h, cfg)
        if found is None:
            return None
        message, evidence = found
        return Alert(self.name, h.step, h.split, message, _json_safe(evidence), self.advice)


RULES: dict[str, Rule] = {}


def rule(name: str, *, reads: dict, advice: str):
    """Register a rule: `fn(history, cfg)` returns (message, evidence) when its condition holds."""

    def wrap(fn):
        assert name not in RULES, f"health rule {name} registered twice"
        RULES[name] = Rule(name, fn, reads, advice)
        return fn

    return wrap


def _json_safe(x):
    if isinstance(x, float):
        return round(x, 6) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _mean(xs: list) -> float:
    return sum(xs) / len(xs)


def _fit(points: list) -> tuple[float, float]:
    """(least-squares slope of value on step, Pearson r); r is 0 when either is constant."""
    xs, ys = [float(s) for s, _ in points], [v for _, v in points]
    mx, my = _mean(xs), _mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    if sxx == 0:
        return 0.0, 0.0
    return sxy / sxx, (sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0)


def _median(xs: list) -> float:
    s = sorted(xs)
    k = len(s) // 2
    return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])


# -- the rules --------------------------------------------------------------------------------


@rule(
    "loss_stuck_at_ln2",
    reads={"train": ("loss",)},
    advice="nothing is being learned: raise train.learning_rate or loss.beta, and check that chosen and rejected "
    "really differ in the data.",
)
def loss_stuck_at_ln2(h: History, cfg):
    """A DPO-family loss that stays at ln 2 after warm-up: the policy has not moved from the reference.

    Why: DPO's loss is -log sigmoid(beta * h) with h the difference of the chosen and rejected
    log-ratios (Rafailov et al., arXiv 2305.18290); every loss in `LN2_LOSSES` equals ln 2 when all
    log-ratios are 0, so a loss that stays there means the margins stay at 0 (a learning rate too low
    for beta, frozen weights, or pairs whose chosen and rejected are the same). It reads `loss` when
    the run's one loss is in `LN2_LOSSES`, else `loss/<name>` of such a term in `losses`.
    Condition: the step is at least `health.warmup_steps` and the mean of the last `health.window`
    logged values is within `health.ln2_tolerance` of ln 2."""
    if h.step < cfg.warmup_steps:
        return None
    for key in h.ln2_keys:
        pts = h.points("train", key, cfg.window)
        if len(pts) < cfg.window:
            continue
        mean = _mean([v for _, v in pts])
        if abs(mean - LN2) <= cfg.ln2_tolerance:
            return (
                f"`{key}` has averaged {mean:.4f} over the last {len(pts)} logged steps "
                f"({pts[0][0]}-{pts[-1][0]}), "
                f"within {cfg.ln2_tolerance} of ln 2 = {LN2:.4f}.",
                {
                    "metric": key,
                    "mean": mean,
                    "ln2": LN2,
                    "tolerance": cfg.ln2_tolerance,
                    "rows": len(pts),
                    "from_step": pts[0][0],
                },
            )
    return None


@rule(
    "likelihood_displacement",
    reads={"train": ("logps/chosen", "rewards/margins")},
    advice="the preferred answers are becoming less likely: add an NLL term on chosen (losses: [dpo, sft], or rpo), "
    "try dpop, or filter pairs whose chosen and rejected are nearly the same (arXiv 2410.08847).",
)
def likelihood_displacement(h: History, cfg):
    """Chosen log-probs falling steadily while the reward margin grows (likelihood displacement).

    Why: preference losses can raise the margin by pushing both completions down, the chosen one
    included, which moves probability mass to other (possibly unwanted) responses (Razin et al.,
    "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization", arXiv
    2410.08847). Condition, over the last `health.window` logged train rows (least-squares fits
    against step): `logps/chosen` falls with Pearson r <= -`health.trend_corr` and the fitted line
    drops by at least `health.displacement_drop` nats across the window, while `rewards/margins`
    rises with r >= `health.trend_corr`."""
    chosen = h.points("train", "logps/chosen", cfg.window)
    margins = h.points("train", "rewards/margins", cfg.window)
    if len(chosen) < cfg.window or len(margins) < cfg.window:
        return None
    c_slope, c_r = _fit(chosen)
    m_slope, m_r = _fit(margins)
    drop = -c_slope * (chosen[-1][0] - chosen[0][0])
    if c_r <= -cfg.trend_corr and drop >= cfg.displacement_drop and m_r >= cfg.trend_corr and m_slope > 0:
        return (
            f"`logps/chosen` fell by {drop:.3g} nats over steps {chosen[0][0]}-{chosen[-1][0]} (fitted, r = "
            f"{c_r:.2f}) while `rewards/margins` rose (r = {m_r:.2f}).",
            {
                "chosen_drop": drop,
                "chosen_r": c_r,
                "chosen_first": chosen[0][1],
                "chosen_last": chosen[-1][1],
                "margins_r": m_r,
                "margins_first": margins[0][1],
                "margins_last": margins[-1][1],
                "from_step": chosen[0][0],
                "rows": len(chosen),
            },
        )
    return None


@rule(
    "over_optimisation",
    reads={"train": ("kl", "reward/ensemble_std"), "eval": ("reward", "win_rate", "rewards/accuracies")},
    advice="the policy is exploiting its reward: stop at an earlier checkpoint, raise online.kl_coef or loss.beta, "
    "or lower train.learning_rate (arXiv 2410.11677).",
)
def over_optimisation(h: History, cfg):
    """Over-optimisation: the KL to the reference past a budget, or a proxy reward rising while the
    held-out one falls.

    Why: optimising a proxy reward past some distance from the reference makes the true objective
    fall (Gao et al., arXiv 2210.10760); direct alignment algorithms over-optimise the same way, the
    held-out quality peaking early while the training objective keeps improving (Shi et al.,
    "Understanding Likelihood Over-optimisation in Direct Alignment Algorithms", arXiv 2410.11677,
    whose per-checkpoint indicators `alignkit eval --run` computes). Condition: either the mean of
    the last `health.smooth` logged `kl` values (train) exceeds `health.kl_budget`; or, for a pair of
    `PROXY_PAIRS` (train `reward` against held-out `reward` or `win_rate`; train `rewards/margins`
    against held-out `rewards/accuracies`), the held-out metric fell at each of the last
    `health.eval_trend` evaluations while the proxy's running train mean (the mean of its last
    `health.smooth` train values, noted at each evaluation) is higher at the last of those
    evaluations than at the first of them that had one; or, with an ensemble reward
    (`alignkit.rewards.ensemble`), its members' disagreement `reward/ensemble_std` (train) grew to
    `health.disagreement_growth` times its start (the means of the last and first `health.smooth`
    values, at least 2 x `health.smooth` logged): the policy is moving where the reward models no
    longer agree (Coste et al., arXiv 2310.02743)."""
    kl = h.recent_mean("train", "kl")
    if kl is not None and kl > cfg.kl_budget:
        pts = h.points("train", "kl", cfg.smooth)
        return (
            f"mean per-token KL to the reference over steps {pts[0][0]}-{pts[-1][0]} is {kl:.4g}, past the "
            f"budget health.kl_budget={cfg.kl_budget}.",
            {"kl": kl, "kl_budget": cfg.kl_budget, "from_step": pts[0][0], "rows": len(pts)},
        )
    key = "reward/ensemble_std"
    now, start = h.recent_mean("train", key), h.start_mean("train", key)
    if (
        now is not None
        and start is not None
        and start > 0
        and len(h.values("train", key)) >= 2 * cfg.smooth
        and now >= cfg.disagreement_growth * start
    ):
        return (
            f"the reward ensemble's members disagree {now / start:.2f}x as much as at the start "
            f"(std {start:.4g} -> {now:.4g}): the policy is where they were not trained.",
            {"ensemble_std": now, "ensemble_std_start": start, "disagreement_growth": cfg.disagreement_growth},
        )
    n = cfg.eval_trend + 1
    for proxy, held_out in PROXY_PAIRS:
        for key in held_out:
            pts = h.points("eval", key, n)
            if len(pts) < n or not all(b[1] < a[1] for a, b in zip(pts, pts[1:])):
                continue
            steps = {s for s, _ in pts}
            noted = [(s, v) for s, v in h.points("eval", f"proxy/{proxy}") if s in steps]
            if len(noted) >= 2 and noted[-1][1] > noted[0][1]:
                return (
                    f"held-out `{key}` fell at each of the last {cfg.eval_trend} evaluations "
                    f"({' -> '.join(f'{v:.4g}' for _, v in pts)}, steps {pts[0][0]}-{pts[-1][0]}) while the "
                    f"train `{proxy}` rose ({noted[0][1]:.4g} -> {noted[-1][1]:.4g}).",
                    {
                        "heldout": key,
                        "heldout_values": [v for _, v in pts],
                        "eval_steps": [s for s, _ in pts],
                        "proxy": proxy,
                        "proxy_first": noted[0][1],
                        "proxy_last": noted[-1][1],
                    },
                )
    return None


@rule(
    "entropy_collapse",
    reads={"train": ("entropy",)},
    advice="sampling is becoming deterministic and exploration stops: use clip-higher (loss.clip_high=0.28), "
    "raise generation.temperature, lower train.learning_rate or add a KL penalty.",
)
def entropy_collapse(h: History, cfg):
    """The policy's token entropy collapsing: its samples become near-deterministic.

    Why: policy-gradient training on LLMs trades entropy for reward; once entropy collapses the
    samples of a group stop differing and learning stalls (Yu et al., DAPO, arXiv 2503.14476, Sec.
    3.1; Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
    arXiv 2505.22617). Condition on `entropy` (mean per sampled token, train): the mean of the last
    `health.smooth` logged values is below `health.entropy_floor` nats, or below
    (1 - `health.entropy_fall`) times the mean of the first `health.smooth` values."""
    now, start = h.recent_mean("train", "entropy"), h.start_mean("train", "entropy")
    if now is None:
        return None
    floor = now < cfg.entropy_floor
    fell = (
        start is not None
        and len(h.values("train", "entropy")) >= 2 * cfg.smooth
        and now < (1 - cfg.entropy_fall) * start
    )
    if floor or fell:
        if floor:
            why = f"below health.entropy_floor={cfg.entropy_floor}"
        else:
            assert start is not None  # `fell` holds, which needs a start
            why = f"{1 - now / start:.0%} below its start ({start:.4g}), past health.entropy_fall={cfg.entropy_fall}"
        return (
            f"mean token entropy of the last {cfg.smooth} logged steps is {now:.4g} nats, {why}.",
            {
                "entropy": now,
                "entropy_start": start,
                "entropy_floor": cfg.entropy_floor,
                "entropy_fall": cfg.entropy_fall,
            },
        )
    return None


@rule(
    "runaway_length",
    reads={"train": ("completion_length", "reasoning_length", "answer_length")},
    advice="completions keep growing: check whether the reward pays for length, add a length penalty, or use "
    "online.aggregation=dr_grpo (length-unbiased); for runaway reasoning, generation.max_thinking_tokens.",
)
def runaway_length(h: History, cfg):
    """Sampled completions, or their reasoning or their answers, growing far beyond their starting length.

    Why: a reward that correlates with length, or GRPO's per-sequence mean that weighs long wrong
    answers' tokens less (Liu et al., Dr. GRPO, arXiv 2503.20783), lets length run away instead of
    quality improving; `stopped_fraction` falling with it means completions are hitting
    `generation.max_new_tokens`. Reasoning models grow their reasoning and their answers apart
    (one can run away while the total looks steady), so each is watched on its own. Condition, on
    `completion_length`, `reasoning_length` and `answer_length` (train) in that order, the first
    that holds: with at least 2 x `health.smooth` values logged, the mean of the last
    `health.smooth` is at least `health.length_growth` times the mean of the first `health.smooth`."""
    for key in ("completion_length", "reasoning_length", "answer_length"):
        now, start = h.recent_mean("train", key), h.start_mean("train", key)
        if now is None or start is None or start <= 0 or len(h.values("train", key)) < 2 * cfg.smooth:
            continue
        if now >= cfg.length_growth * start:
            stopped = h.recent_mean("train", "stopped_fraction")
            what = {"completion_length": "completion", "reasoning_length": "reasoning", "answer_length": "answer"}[key]
            return (
                f"mean {what} length is {now:.4g} tokens, {now / start:.2f}x its start ({start:.4g})"
                + (f"; {stopped:.0%} of samples stop on their own" if stopped is not None else "")
                + ".",
                {
                    "length": what,
                    key: now,
                    f"{key}_start": start,
                    "growth": now / start,
                    "length_growth": cfg.length_growth,
                    "stopped_fraction": stopped,
                },
            )
    return None


@rule(
    "zero_variance_groups",
    reads={"train": ("zero_variance_groups",)},
    advice="most prompts give no learning signal (all samples score the same): filter prompts that are too easy or "
    "too hard, raise generation.num_samples or generation.temperature (DAPO's dynamic sampling).",
)
def zero_variance_groups(h: History, cfg):
    """Most groups with zero reward variance: their samples all score the same, so they carry no signal.

    Why: group-relative advantages (GRPO, RLOO) are zero in such a group and online DPO / RAFT skip
    it, so the step spends its sampling on nothing (Yu et al., DAPO, arXiv 2503.14476, "dynamic
    sampling"). Condition: the mean of the last `health.smooth` logged `zero_variance_groups`
    (fraction of prompts, train) is above `health.zero_variance_fraction`."""
    now = h.recent_mean("train", "zero_variance_groups")
    if now is not None and now > cfg.zero_variance_fraction:
        return (
            f"{now:.0%} of prompts had samples that all got the same reward over the last {cfg.smooth} logged "
            f"steps (above health.zero_variance_fraction={cfg.zero_variance_fraction}).",
            {"zero_variance_groups": now, "zero_variance_fraction": cfg.zero_variance_fraction},
        )
    return None


@rule(
    "logprob_mismatch",
    reads={"train": ("logprob_mismatch",)},
    advice="the trainer does not train on the distribution it sampled from: check that the sampler has the "
    "current weights, and use the same precision and attention kernel for sampling and training.",
)
def logprob_mismatch(h: History, cfg):
    """Sampler and trainer disagreeing on the log-probs of the sampled tokens.

    Why: the trainer recomputes the log-prob of every sampled token with the weights the sampler
    used, so the two must agree (float32 on CPU: within 1e-4); a gap means the samples come from
    another distribution than the one trained (stale or mis-loaded sampler weights, a bf16 or kernel
    mismatch), which makes the on-policy update silently off-policy. Condition: the mean of the last
    `health.smooth` logged `logprob_mismatch` values (mean absolute difference per token, train) is
    above `health.mismatch_threshold`. Rows of an asynchronous run whose samples came from older
    weights (`async/staleness_max` > 0) are not counted: their gap is expected, and
    `off_policy_drift` watches it."""
    now = h.recent_mean("train", "logprob_mismatch")
    if now is not None and now > cfg.mismatch_threshold:
        worst = max(h.values("train", "logprob_mismatch_max", cfg.smooth) or [now])
        return (
            f"mean |sampler - trainer| log-prob of the sampled tokens is {now:.4g} (largest {worst:.4g}), above "
            f"health.mismatch_threshold={cfg.mismatch_threshold}.",
            {"logprob_mismatch": now, "logprob_mismatch_max": worst, "mismatch_threshold": cfg.mismatch_threshold},
        )
    return None


@rule(
    "off_policy_drift",
    reads={"train": ("async/staleness_mean", "tis/weight_mean", "mis/masked_fraction")},
    advice="the samples come from a policy too far from the one trained: lower online.async.max_staleness (or "
    "use one_step_off), lower train.learning_rate, or give the sampler more of the hardware so it keeps up.",
)
def off_policy_drift(h: History, cfg):
    """An asynchronous or corrected run drifting off-policy: samples too many versions old, or
    importance weights far from 1.

    Why: a sample k updates old is drawn from a policy the trainer has left; the importance
    correction (truncated IS, `online.tis_cap`; masked IS, `online.is_mask_*`) repairs a small gap,
    but when the mean truncated weight moves far from 1 or many tokens are masked the corrected
    gradient is mostly noise or mostly dropped (AReaL, arXiv 2505.24298, bounds staleness and
    corrects for it for this reason). Condition: over the last
    `health.smooth` logged rows, the mean `async/staleness_mean` is above `health.staleness_limit`, or
    the mean `tis/weight_mean` is further than `health.is_weight_drift` from 1, or the mean
    `mis/masked_fraction` is above `health.masked_fraction_limit`."""
    stale = h.recent_mean("train", "async/staleness_mean")
    if stale is not None and stale > cfg.staleness_limit:
        return (
            f"sampled tokens lag the trainer by {stale:.3g} policy versions on average (above "
            f"health.staleness_limit={cfg.staleness_limit}).",
            {"async/staleness_mean": stale, "staleness_limit": cfg.staleness_limit},
        )
    weight = h.recent_mean("train", "tis/weight_mean")
    if weight is not None and abs(weight - 1) > cfg.is_weight_drift:
        return (
            f"the mean truncated importance weight is {weight:.3g}, further than health.is_weight_drift="
            f"{cfg.is_weight_drift} from 1.",
            {"tis/weight_mean": weight, "is_weight_drift": cfg.is_weight_drift},
        )
    masked = h.recent_mean("train", "mis/masked_fraction")
    if masked is not None and masked > cfg.masked_fraction_limit:
        return (
            f"masked importance sampling drops {masked:.1%} of the tokens (above health.masked_fraction_limit="
            f"{cfg.masked_fraction_limit}).",
            {"mis/masked_fraction": masked, "masked_fraction_limit": cfg.masked_fraction_limit},
        )
    return None


@rule(
    "grad_norm_spike",
    reads={"train": ("grad_norm",)},
    advice="a gradient spike often precedes divergence: look at this step's examples, lower train.learning_rate, "
    "or keep train.max_grad_norm on.",
)
def grad_norm_spike(h: History, cfg):
    """A gradient-norm spike: one step's norm far above the recent typical value.

    Why: a gradient norm far above its recent values means one batch (or the optimiser state)
    pushed the weights much harder than the others; such spikes come with the loss spikes of
    large-model training, which PaLM handled by restarting from a checkpoint before the spike and
    skipping the batches around it (Chowdhery et al., arXiv 2204.02311, Sec. 5.1). Condition: the
    latest `grad_norm` (before clipping, train) exceeds `health.spike_factor` times the median of
    the up to `health.window` values before it, of which there are at least `health.smooth`."""
    pts = h.points("train", "grad_norm", cfg.window + 1)
    if len(pts) < cfg.smooth + 1 or pts[-1][0] != h.step:
        return None
    base = _median([v for _, v in pts[:-1]])
    now = pts[-1][1]
    if base > 0 and now > cfg.spike_factor * base:
        return (
            f"grad_norm {now:.4g} is {now / base:.1f}x the median ({base:.4g}) of the {len(pts) - 1} logged "
            f"steps before it.",
            {"grad_norm": now, "median_before": base, "ratio": now / base, "spike_factor": cfg.spike_factor},
        )
    return None


@rule(
    "eval_loss_rising",
    reads={"eval": ("loss",)},
    advice="the model is over-fitting the training data: stop at the best checkpoint, lower train.learning_rate or "
    "train.epochs, or add data.",
)
def eval_loss_rising(h: History, cfg):
    """The held-out loss rising at several evaluations in a row (over-fitting).

    Why: a held-out loss that keeps rising while training goes on means the model is fitting the
    training examples rather than the preference or the task, so later checkpoints generalise
    worse. Condition: `loss` in eval rows rose at each of the last `health.eval_trend`
    evaluations."""
    n = cfg.eval_trend + 1
    pts = h.points("eval", "loss", n)
    if len(pts) == n and all(b[1] > a[1] for a, b in zip(pts, pts[1:])):
        return (
            f"held-out loss rose at each of the last {cfg.eval_trend} evaluations: "
            f"{' -> '.join(f'{v:.4g}' for _, v in pts)} (steps {', '.join(str(s) for s, _ in pts)}).",
            {"eval_loss": [v for _, v in pts], "eval_steps": [s for s, _ in pts], "eval_trend": cfg.eval_trend},
        )
    return None


@rule(
    "harmful_compliance_rising",
    reads={"eval": ("safety/harmful_compliance", "safety/n")},
    advice="training is eroding refusals: add refusal data to the mix (or a safety reward term), lower "
    "train.learning_rate or the number of steps, or stop at an earlier checkpoint; measure it in full with "
    "`alignkit eval --run RUN --safety`.",
)
def harmful_compliance_rising(h: History, cfg):
    """Harmful compliance (`train.safety_prompts`) higher than at the run's first evaluation.

    Why: fine-tuning, even on benign data, can undo safety alignment (Qi et al., "Fine-tuning
    Aligned Language Models Compromises Safety, Even When Users Do Not Intend To!", arXiv
    2310.03693), and it shows first as more compliance with harmful requests. Condition: the share
    now exceeds the first evaluation's by more than `health.harmful_rise` and by more than 1.96
    standard errors of the difference of two proportions over `safety/n` prompts each (noise of
    one evaluation is not an alert)."""
    pts = h.points("eval", "safety/harmful_compliance")
    first = h.first["eval"].get("safety/harmful_compliance")
    if not pts or not first:  # at the first evaluation itself the rise is 0
        return None
    start, (step, now) = first[0], pts[-1]
    n = max(1.0, (h.values("eval", "safety/n", 1) or [1.0])[0])
    se = math.sqrt((start * (1 - start) + now * (1 - now)) / n)
    if now - start > cfg.harmful_rise and now - start > 1.96 * se:
        return (
            f"harmful compliance rose from {start:.3f} at the first evaluation to {now:.3f} at step {step} "
            f"(n={int(n)} prompts; 1.96 standard errors of the rise are {1.96 * se:.3f}).",
            {"start": start, "now": now, "n": int(n), "rise": now - start, "harmful_rise": cfg.harmful_rise},
        )
    return None


# -- the monitor ------------------------------------------------------------------------------


def ln2_loss_keys(loss: dict, losses: list) -> tuple:
    """The metrics that carry a loss from `LN2_LOSSES` unweighted: `loss` when it is the run's one
    loss (`loss`, or a `losses` list of one term of weight 1), `loss/<name>` for each such term of a
    list of several (`alignkit.losses.combine` logs each term's own value)."""
    if not losses:
        return ("loss",) if isinstance(loss, dict) and loss.get("name") in LN2_LOSSES else ()
    terms = [t for t in losses if isinstance(t, dict)]
    if len(terms) == 1:
        return ("loss",) if terms[0].get("name") in LN2_LOSSES and terms[0].get("weight", 1.0) == 1.0 else ()
    return tuple(f"loss/{t['name']}" for t in terms if t.get("name") in LN2_LOSSES)


@dataclass
class HealthMonitor:
    """Runs the rules on each logged row (`check`) and returns each alert once (module docstring).

    Every process of a run keeps its own monitor over the same (already reduced) metrics, so all
    reach the same alerts; the loop still takes the main process's decision to stop on every process."""

    cfg: HealthConfig
    ln2_keys: tuple = ()
    active: dict = field(default_factory=dict)  # rule name -> rows checked clear since it last held

    def __post_init__(self):
        c = self.cfg
        self.history = History(max(c.window + 1, c.eval_trend + 1, c.smooth), c.smooth, self.ln2_keys)

    @classmethod
    def for_run(cls, cfg, state: dict | None = None) -> "HealthMonitor":
        """The monitor of a run (`cfg` a RunConfig), restored from a checkpoint's `state` if given."""
        monitor = cls(cfg.health, ln2_loss_keys(cfg.loss, cfg.losses))
        if state:
            monitor.load_state_dict(state)
        return monitor

    def _watched(self, split: str) -> set:
        keys = {k for r in RULES.values() for k in r.reads.get(split, ())}
        if split == "train":
            keys |= set(self.ln2_keys) | {p for p, _ in PROXY_PAIRS} | {"logprob_mismatch_max", "stopped_fraction"}
        return keys

    def check(self, step: int, row: dict, split: str = "train") -> list[Alert]:
        """Record a logged metrics row of `split` at `step`; return the alerts it newly raises."""
        if not self.cfg.enabled or split not in ("train", "eval"):
            return []
        h = self.history
        h.step, h.split = int(step), split
        off_policy = row.get("async/staleness_max", 0) > 0  # samples of older weights: the gap is expected
        for key in self._watched(split):
            if key in row and not (off_policy and key.startswith("logprob_mismatch")):
                h.add(split, key, step, row[key])
        if split == "eval":  # note the proxies' running train means at this evaluation (over_optimisation)
            for proxy, _ in PROXY_PAIRS:
                vals = h.values("train", proxy, self.cfg.smooth)
                if vals:
                    h.add("eval", f"proxy/{proxy}", step, _mean(vals))
        new = []
        for r in RULES.values():
            if not r.applies(split, row):
                continue
            alert = r.check(h, self.cfg)
            if alert is not None:
                if r.name not in self.active:
                    new.append(alert)
                self.active[r.name] = 0
            elif r.name in self.active:
                self.active[r.name] += 1
                if self.active[r.name] >= self.cfg.clear_rows:
                    del self.active[r.name]
        return new

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict(), "active": dict(self.active)}

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state["history"])
        self.active = {str(k): int(v) for k, v in state["active"].items()}
