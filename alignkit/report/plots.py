"""The report's plots (`ALL`). Each takes `RunInputs` and returns a `Plot`, or None when its
data is absent.

Values are filtered through `num`: NaN, inf, None and strings never reach matplotlib. Non-finite
values of a logged metric are not silently dropped from the training curves: their steps are marked
with red crosses along the bottom of the panel. A series with one point is drawn as a marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator

from alignkit.report.inputs import RunInputs, num
from alignkit.report.svg import BAD, EVAL, GOOD, MUTED, PALETTE, TRAIN, new_figure, style, to_svg

MAX_SCATTER_POINTS = 3000  # beyond this an SVG scatter gets heavy and no more readable
SMOOTH_FROM = 50  # train curves with more points than this also get an EMA line
MAX_LINE_POINTS = 1500  # a longer series is thinned: SVG size grows with every vertex


@dataclass
class Plot:
    name: str  # the figure's data-plot attribute
    title: str
    svg: str
    caption: str  # one sentence: how to read it


@dataclass
class Line:
    label: str
    x: list
    y: list
    bad_x: list  # steps where the metric was logged but not finite
    color: str
    dashed: bool = False


def series(rows: list, key: str, label: str, color: str, dashed: bool = False) -> Line | None:
    x, y, bad = [], [], []
    for r in rows:
        if key not in r:
            continue
        v = num(r[key])
        (bad if v is None else x).append(r["step"])
        if v is not None:
            y.append(v)
    return Line(label, x, y, bad, color, dashed) if x or bad else None


def draw_lines(ax, lines: list, title: str, ylabel: str = "", xlabel: str = "step") -> None:
    for ln in lines:
        style_ = "--" if ln.dashed else "-"
        if len(ln.x) > SMOOTH_FROM and not ln.dashed:
            if len(ln.x) > MAX_LINE_POINTS:  # min-max band per bucket: thinning keeps the spikes
                mid, lo, hi = _envelope(ln.x, ln.y)
                ax.fill_between(mid, lo, hi, color=ln.color, alpha=0.2, linewidth=0)
                for edge in (lo, hi):  # a one-bucket spike is a sliver of fill but a visible line
                    ax.plot(mid, edge, "-", color=ln.color, alpha=0.35, linewidth=0.6)
            else:
                ax.plot(ln.x, ln.y, style_, color=ln.color, alpha=0.3, linewidth=0.9)
            ax.plot(*_thin(ln.x, _ema(ln.y)), style_, color=ln.color, label=f"{ln.label} (EMA)" if ln.label else None)
        else:
            ax.plot(
                *_thin(ln.x, ln.y),
                style_,
                color=ln.color,
                marker="o" if len(ln.x) <= 30 else None,
                label=ln.label or None,
            )
    bad = sorted({s for ln in lines for s in ln.bad_x})
    if bad:  # x in data units, y in axes units: a rug along the bottom whatever the y range
        ax.plot(
            bad,
            [0.02] * len(bad),
            "x",
            color=BAD,
            transform=ax.get_xaxis_transform(),
            markersize=6,
            clip_on=False,
            label="NaN/inf",
        )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
    if ylabel:
        ax.set_ylabel(ylabel)
    if len(lines) > 1 or bad:
        ax.legend(loc="best")


def _step_label(x: float, _pos=None) -> str:
    return f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}"


def _ema(y: list) -> list:
    """Exponential moving average over ~2% of the run (at least 10 points), started at the first value."""
    alpha = 1 - 1 / max(10, len(y) / 50)
    out, m = [], y[0]
    for v in y:
        m = alpha * m + (1 - alpha) * v
        out.append(m)
    return out


def _thin(x: list, y: list) -> tuple:
    if len(x) <= MAX_LINE_POINTS:
        return x, y
    idx = np.linspace(0, len(x) - 1, MAX_LINE_POINTS).round().astype(int)
    return np.asarray(x)[idx], np.asarray(y)[idx]


def _envelope(x: list, y: list) -> tuple:
    xb = np.array_split(np.asarray(x, dtype=np.float64), MAX_LINE_POINTS // 2)
    yb = np.array_split(np.asarray(y, dtype=np.float64), MAX_LINE_POINTS // 2)
    return [b.mean() for b in xb], [b.min() for b in yb], [b.max() for b in yb]


def _has_points(lines: list) -> bool:
    return any(ln is not None and (ln.x or ln.bad_x) for ln in lines)


def _panels(name: str, title: str, caption: str, panels: list) -> Plot | None:
    """panels: [(title, ylabel, [Line|None, ...], extra(ax)|None)]; empty ones are left out."""
    panels = [
        (t, yl, [ln for ln in lines if ln is not None], extra) for t, yl, lines, extra in panels if _has_points(lines)
    ]
    if not panels:
        return None
    with style(name):
        fig, axes = new_figure(
            len(panels), width=max(4.6, min(10.0, 3.4 * len(panels))), height=3.0 if len(panels) <= 3 else 2.7
        )
        for ax, (t, yl, lines, extra) in zip(axes, panels):
            draw_lines(ax, lines, t, yl)
            if extra is not None:
                extra(ax)
        return Plot(name, title, to_svg(fig, name), caption)


def training_plot(inp: RunInputs) -> Plot | None:
    tr, ev = inp.train_rows, inp.eval_rows
    terms = sorted({k for r in tr for k in r if k.startswith("loss/")})
    grad = series(tr, "grad_norm", "train", TRAIN)
    panels = [
        ("loss", "", [series(tr, "loss", "train", TRAIN), series(ev, "loss", "eval", EVAL, dashed=True)], None),
        ("learning rate", "", [series(tr, "lr", "train", TRAIN)], None),
        ("gradient norm", "before clipping", [grad], _log_if_wide(grad)),
        ("loss terms (train)", "", [series(tr, k, k[5:], c) for k, c in zip(terms, _colors())], None),
    ]
    return _panels(
        "training",
        "Training curves",
        (
            "Loss (lower is better; train solid, eval dashed), learning-rate schedule and gradient norm against "
            "optimizer step; red crosses along the bottom of a panel mark steps whose value was NaN or infinite."
        ),
        panels,
    )


def preference_plot(inp: RunInputs) -> Plot | None:
    tr, ev = inp.train_rows, inp.eval_rows

    def acc(rows, label, color, dashed=False):
        key = "rewards/accuracies" if any("rewards/accuracies" in r for r in rows) else "accuracy"
        return series(rows, key, label, color, dashed)

    def chance(ax):
        ax.axhline(0.5, color=MUTED, linestyle=":", linewidth=1)
        ax.set_ylim(-0.02, 1.02)

    def zero(ax):
        ax.axhline(0.0, color=MUTED, linestyle=":", linewidth=1)

    panels = [
        (
            "reward margin",
            "chosen - rejected",
            [series(tr, "rewards/margins", "train", TRAIN), series(ev, "rewards/margins", "eval", EVAL, True)],
            zero,
        ),
        ("preference accuracy", "", [acc(tr, "train", TRAIN), acc(ev, "eval", EVAL, True)], chance),
        (
            "chosen and rejected reward",
            "",
            [
                series(tr, "rewards/chosen", "chosen", GOOD),
                series(tr, "rewards/rejected", "rejected", BAD),
                series(ev, "rewards/chosen", "", GOOD, True),
                series(ev, "rewards/rejected", "", BAD, True),
            ],
            zero,
        ),
    ]
    return _panels(
        "preference",
        "Reward margin and preference accuracy",
        (
            "Margin (chosen minus rejected reward; train solid, eval dashed) and accuracy (share of pairs whose "
            "chosen answer scores higher; "
            "dotted line is chance) should rise with step, and a chosen reward that falls below zero while the margin "
            "grows means the preferred answers are becoming less likely too (likelihood displacement, arXiv "
            "2410.08847)."
        ),
        panels,
    )


def _log_if_wide(line: Line | None):
    """Log scale when spikes dwarf the typical value, so both stay readable."""
    if line is None or len(line.y) < 2 or min(line.y) <= 0:
        return None
    median = float(np.median(line.y))
    if max(line.y) / median < 20:
        return None

    def log(ax):
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(min(line.y), median / 100) / 1.5)

    return log


def _colors():
    while True:
        yield from PALETTE


def health_plot(inp: RunInputs) -> Plot | None:
    """The health monitor's alerts on a timeline: one lane per rule, a marker at each alert's step."""
    alerts = [a for a in inp.alerts if num(a.get("step")) is not None]
    if not alerts:
        return None
    rules = list(dict.fromkeys(a["rule"] for a in sorted(alerts, key=lambda a: a["step"])))  # by first alert
    steps = [r["step"] for r in inp.train_rows + inp.eval_rows if num(r.get("step")) is not None]
    last = max(steps + [a["step"] for a in alerts])
    stopped = inp.summary.get("status") == "stopped_by_health"
    stopper = (inp.summary.get("alert") or {}).get("rule") if stopped else None  # its markers are red
    with style("health"):
        fig, (ax,) = new_figure(1, width=10.0, height=max(1.5, 0.9 + 0.38 * len(rules)))
        for lane, name in enumerate(rules):
            xs = [a["step"] for a in alerts if a["rule"] == name]
            ax.plot(xs, [lane] * len(xs), "v", color=BAD if name == stopper else EVAL, markersize=9, clip_on=False)
            for x in xs:
                ax.annotate(
                    f"{x:g}",
                    (x, lane),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=7,
                    color="#374151",
                )
        if stopped and num(inp.summary.get("steps")) is not None:
            ax.axvline(
                inp.summary["steps"], color=BAD, linestyle="--", linewidth=1, label="run stopped (train.stop_on)"
            )
            ax.legend(loc="lower right")
        ax.set_yticks(range(len(rules)), rules)
        ax.set_ylim(-0.6, len(rules) - 0.4)
        ax.set_xlim(0, max(1, last) * 1.02)
        ax.grid(axis="y", visible=False)
        ax.set_title("health alerts")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
        return Plot(
            "health",
            "Health alerts",
            to_svg(fig, "health"),
            (
                "Each marker is an alert of the training health monitor at the step it was raised (labelled), one row "
                "per rule; a rule alerts once and again only after it has cleared. The table below gives each alert's "
                "evidence and advice."
            ),
        )


def checkpoints(inp: RunInputs) -> list:
    cks = [c for c in inp.eval.get("checkpoints") or [] if isinstance(c, dict) and num(c.get("step")) is not None]
    return sorted(cks, key=lambda c: c["step"])


def reward_kl_plot(inp: RunInputs) -> Plot | None:
    pts = [(c["step"], num(c.get("kl")), num(c.get("reward"))) for c in checkpoints(inp)]
    pts = [(s, k, r) for s, k, r in pts if k is not None and r is not None]
    if not pts:
        return None
    gen = inp.eval.get("generation") if isinstance(inp.eval.get("generation"), dict) else {}
    ref_reward = num(gen.get("reference_reward_mean"))
    with style("reward_kl"):
        fig, (ax,) = new_figure(1, width=5.2, height=3.4)
        steps, kls, rewards = zip(*pts)
        ax.plot(kls, rewards, "-", color=TRAIN, alpha=0.5, linewidth=1)
        ax.plot(kls, rewards, "o", color=TRAIN, markersize=6, label="checkpoint")
        for s, k, r in pts:
            ax.annotate(f"step {s:g}", (k, r), textcoords="offset points", xytext=(5, 5), fontsize=8, color="#374151")
        if ref_reward is not None:
            ax.plot([0.0], [ref_reward], "*", color=EVAL, markersize=11, label="reference (KL 0)")
        ax.set_xlabel("KL(policy || reference)")
        ax.set_ylabel("mean reward")
        ax.set_title("reward vs KL")
        ax.margins(x=0.12, y=0.15)
        ax.legend(loc="best")
        return Plot(
            "reward_kl",
            "Reward vs KL per checkpoint",
            to_svg(fig, "reward_kl"),
            (
                "Each point is a checkpoint (labelled by step) at its KL from the reference and its mean reward on "
                "generated completions; a curve that flattens or turns down as KL grows signals reward "
                "over-optimisation (Gao et al., arXiv 2210.10760)."
            ),
        )


def length_bias_plot(inp: RunInputs) -> Plot | None:
    lb = inp.eval.get("length_bias")
    if not isinstance(lb, dict):
        return None
    pts = [(num(p.get("length_diff")), num(p.get("margin"))) for p in lb.get("points") or [] if isinstance(p, dict)]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    buckets = [
        (label, acc_triple(lb.get(key)))
        for label, key in (
            ("chosen longer", "accuracy_chosen_longer"),
            ("chosen shorter", "accuracy_chosen_shorter"),
            ("equal length", "accuracy_equal_length"),
        )
    ]
    buckets = [(label, a) for label, a in buckets if a is not None]
    if not pts and not buckets:
        return None
    with style("length_bias"):
        fig, axes = new_figure(int(bool(pts)) + int(bool(buckets)), width=10.0 if pts and buckets else 6.0, height=3.4)
        if pts:
            _length_scatter(axes[0], pts, num(lb.get("corr_margin_length_diff")))
        if buckets:
            bars(axes[-1], [label for label, _ in buckets], [a for _, a in buckets], "accuracy by length")
        what = "implicit reward margin" if lb.get("reward", "implicit") == "implicit" else "reward-model margin"
        return Plot(
            "length_bias",
            "Length bias",
            to_svg(fig, "length_bias"),
            (
                f"Each point is an eval pair at its length difference (chosen minus rejected, tokens) and {what}; "
                "a clear slope (Pearson r in the title) or much higher accuracy when the chosen answer is longer means "
                "the score rewards length rather than quality."
            ),
        )


def _length_scatter(ax, pts: list, corr: float | None) -> None:
    shown = pts
    if len(pts) > MAX_SCATTER_POINTS:  # deterministic thinning keeps the page small
        idx = np.linspace(0, len(pts) - 1, MAX_SCATTER_POINTS).round().astype(int)
        shown = [pts[i] for i in idx]
    x, y = np.array(shown, dtype=np.float64).T
    ax.scatter(x, y, s=10, alpha=0.45, color=TRAIN, edgecolors="none")
    ax.axhline(0, color=MUTED, linestyle=":", linewidth=1)
    ax.axvline(0, color=MUTED, linestyle=":", linewidth=1)
    if len(x) >= 3 and np.ptp(x) > 0:
        slope, icpt = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, slope * xs + icpt, "-", color=EVAL, linewidth=1.2, label="least-squares fit")
        ax.legend(loc="best")
        if corr is None and np.ptp(y) > 0:
            corr = float(np.corrcoef(x, y)[0, 1])
    r = "n/a" if corr is None else f"{corr:+.2f}"
    extra = f", {len(shown)} of {len(pts)} shown" if len(shown) < len(pts) else ""
    ax.set_title(f"margin vs length difference (r = {r}{extra})")
    ax.set_xlabel("length(chosen) - length(rejected), tokens")
    ax.set_ylabel("margin")


def acc_triple(a) -> tuple | None:
    """(value, lo, hi) from {"value", "ci95"}; lo/hi None when the interval is missing or malformed."""
    if not isinstance(a, dict) or num(a.get("value")) is None:
        return None
    ci = a.get("ci95")
    lo, hi = (num(ci[0]), num(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
    return num(a["value"]), lo, hi


def bars(ax, labels: list, vals: list, title: str, colors: list | None = None) -> None:
    """Bars in [0, 1] with 95% interval whiskers where known, the value above each, and a 0.5 line."""
    xs = np.arange(len(labels))
    heights = [v for v, _, _ in vals]
    ax.bar(xs, heights, color=colors or TRAIN, width=0.6, alpha=0.85)
    for x, (v, lo, hi) in zip(xs, vals):
        if lo is not None and hi is not None:
            ax.errorbar([x], [v], yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], color="#111827", capsize=4, linewidth=1)
        ax.annotate(
            f"{v:.1%}",
            (x, hi if hi is not None else v),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax.axhline(0.5, color=MUTED, linestyle="--", linewidth=1)
    ax.set_xticks(xs, labels, rotation=0 if len(labels) <= 6 else 30, ha="center" if len(labels) <= 6 else "right")
    ax.set_ylim(0, 1.08)
    if len(labels) < 3:  # keep one or two bars from spanning the whole axis
        ax.set_xlim(-1.2, len(labels) + 0.2)
    ax.grid(axis="x", visible=False)
    ax.set_title(title)


def win_rate_plot(inp: RunInputs) -> Plot | None:
    labels, vals, colors = [], [], []
    for c in checkpoints(inp):
        a = acc_triple(c.get("win_rate"))
        if a is not None:
            labels.append(f"step {c['step']:g}")
            vals.append(a)
            colors.append(TRAIN)
    gen = inp.eval.get("generation")
    final = acc_triple(gen.get("win_rate")) if isinstance(gen, dict) else None
    if final is not None:
        labels.append("final")
        vals.append(final)
        colors.append(EVAL)
    if not vals:
        return None
    with style("win_rate"):
        fig, (ax,) = new_figure(1, width=max(4.6, min(10.0, 1.4 + 0.75 * len(vals))), height=3.4)
        bars(ax, labels, vals, "win rate vs reference", colors)
        ax.set_ylabel("win rate")
        return Plot(
            "win_rate",
            "Win rate",
            to_svg(fig, "win_rate"),
            (
                "Share of prompts on which the policy's completion beats the reference's, with 95% intervals: a bar "
                "whose interval lies above the dashed 0.5 line is a clear win, one that crosses it is not."
            ),
        )


def overoptimisation_plot(inp: RunInputs) -> Plot | None:
    cks = [dict(c, split="checkpoint") for c in checkpoints(inp)]

    def zero(ax):
        ax.axhline(0.0, color=MUTED, linestyle=":", linewidth=1)

    panels = [
        ("top-k entropy", "nats", [series(cks, "topk_entropy", "", TRAIN)], None),
        ("top-k probability mass", "", [series(cks, "topk_mass", "", TRAIN)], None),
        ("chosen log-prob change", "vs reference", [series(cks, "chosen_logp_change", "", TRAIN)], zero),
        ("chosen log-prob went down", "fraction of pairs", [series(cks, "chosen_logp_down_fraction", "", TRAIN)], None),
    ]
    return _panels(
        "overoptimisation",
        "Over-optimisation indicators",
        (
            "Per checkpoint: falling top-k entropy and falling top-k probability mass signal likelihood "
            "over-optimisation that hurts output diversity (Shi et al., arXiv 2410.11677), and a negative chosen "
            "log-prob change means the preferred answers became less likely (likelihood displacement, "
            "arXiv 2410.08847)."
        ),
        panels,
    )


def strategy_plot(inp: RunInputs) -> Plot | None:
    """An evaluated inference-time strategy next to plain sampling: reward and cost."""
    st = inp.eval.get("strategy") if isinstance(inp.eval.get("strategy"), dict) else {}
    mine, base = acc_triple(st.get("reward")), acc_triple(st.get("sampling_reward"))
    cost = st.get("cost") if isinstance(st.get("cost"), dict) else {}
    if mine is None or base is None:
        return None
    name = str(st.get("strategy"))
    with style("strategy"):
        fig, (ax1, ax2) = new_figure(2, width=8.0, height=3.2)
        xs = np.arange(2)
        for x, (v, lo, hi), color in zip(xs, (base, mine), (MUTED, EVAL)):
            ax1.bar([x], [v], color=color, width=0.6, alpha=0.85)
            if lo is not None and hi is not None:
                ax1.errorbar(
                    [x], [v], yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], color="#111827", capsize=4, linewidth=1
                )
        ax1.set_xticks(xs, ["sample", name])
        ax1.set_title("mean reward (95% interval)")
        ax1.grid(axis="x", visible=False)
        ratios = [num(cost.get("seconds_vs_sampling")), num(cost.get("new_tokens_vs_sampling"))]
        labels = [lab for lab, r in zip(("time", "new tokens"), ratios) if r is not None]
        ratios = [r for r in ratios if r is not None]
        ax2.bar(np.arange(len(ratios)), ratios, color=EVAL, width=0.6, alpha=0.85)
        ax2.axhline(1.0, color=MUTED, linestyle="--", linewidth=1)
        ax2.set_xticks(np.arange(len(ratios)), labels)
        ax2.set_title("cost relative to sampling (x)")
        ax2.grid(axis="x", visible=False)
        return Plot(
            "strategy",
            f"Inference-time strategy: {name}",
            to_svg(fig, "strategy"),
            (
                "Left: the strategy's mean reward next to plain sampling from the same model on the same prompts. "
                "Right: what it cost, as a multiple of sampling's time and generated tokens (the dashed line is 1x)."
            ),
        )


def _curve(f: dict, grid: np.ndarray) -> np.ndarray:
    """A fitted curve of `eval.steering.fits` on `grid`."""
    if "coef" in f:
        return np.polyval(f["coef"], grid)
    if "s0" in f:
        return f["A"] * np.tanh(f["k"] * (grid - f["s0"])) + f["B"]
    return f["h0"] / (1.0 + f["k"] * grid**2)


STEERING_PANELS = (  # (row key, fits key, paper's form, title)
    ("behaviour", "behaviour", "tanh", "behaviour: refusal - compliance rate"),
    ("accuracy", "accuracy", "inverse_quadratic", "helpfulness: accuracy on known answers"),
    ("margin", "margin", None, "diagnostic: log p(chosen) - log p(rejected)"),
    ("helpfulness_loss", "helpfulness_loss", None, "diagnostic: NLL - NLL at 0"),
)


def steering_plot(inp: RunInputs) -> Plot | None:
    """`alignkit eval --steer-sweep`: each measured quantity against strength, with the paper's
    form (tanh, h0/(1+ks^2)) and a line and a quadratic."""
    sw = inp.eval.get("steering")
    if not isinstance(sw, dict) or not sw.get("rows"):
        return None
    rows = sw["rows"]
    panels = [p for p in STEERING_PANELS if all(p[0] in r for r in rows)]
    if not panels:
        return None
    s = np.array([r["strength"] for r in rows], dtype=float)
    grid = np.linspace(s.min(), s.max(), 200)
    fits = sw.get("fits", {})
    with style("steering"):
        fig, axes = new_figure(len(panels), width=5.0 * min(len(panels), 2) if len(panels) != 3 else 15.0, height=3.4)
        for ax, (key, fkey, paper, title) in zip(axes, panels):
            ax.plot(s, [r[key] for r in rows], "o", color=EVAL)
            for name, fit in fits.get(fkey, {}).items():
                ls = "-" if name == paper else (":" if name == "line" else "--")
                ax.plot(
                    grid,
                    _curve(fit, grid),
                    ls,
                    color=EVAL if name == paper else MUTED,
                    linewidth=1.2,
                    label=f"{name}, R\u00b2 " + ("n/a" if fit.get("r2") is None else f"{fit['r2']:.3f}"),
                )
            ax.legend(loc="best", fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(f"steering strength ({sw.get('norm', 'relative')})")
        return Plot(
            "steering",
            "Steering: alignment against helpfulness",
            to_svg(fig, "steering"),
            (
                "For each steering strength, the quantities Wolf et al. (arXiv 2401.16332) measure: the behaviour rate "
                f"(refusals minus compliances of sampled replies to harmful prompts, judged by `{sw.get('judge')}`), "
                "predicted tanh-shaped, and accuracy on questions with known answers, predicted to fall like "
                "1/(1 + k s\u00b2); each with the paper's form (solid), a line (dotted) and a quadratic (dashed) and "
                "their R\u00b2. Teacher-forced margins and NLL, where measured, are diagnostics only."
            ),
        )


def representation_plot(inp: RunInputs) -> Plot | None:
    """`alignkit eval --representation-layers`: held-out probe accuracy by layer."""
    rep = inp.eval.get("representation")
    if not isinstance(rep, dict) or not rep.get("layers"):
        return None
    with style("representation"):
        fig, (ax,) = new_figure(1, width=6.0, height=3.2)
        ax.plot(rep["layers"], rep["probe_accuracy"], "o-", color=EVAL)
        ax.axhline(0.5, color=MUTED, linestyle="--", linewidth=1)
        ax.set_xlabel("layer")
        ax.set_ylabel("held-out probe accuracy")
        return Plot(
            "representation",
            "Chosen vs rejected in the hidden states",
            to_svg(fig, "representation"),
            (
                f"Per layer, a logistic probe fitted on {rep.get('n_train')} pairs: the share of "
                f"{rep.get('n_heldout')} "
                "held-out pairs whose chosen reply it scores above the rejected one (the dashed line is chance)."
            ),
        )


ALL = (
    training_plot,
    preference_plot,
    reward_kl_plot,
    length_bias_plot,
    win_rate_plot,
    overoptimisation_plot,
    strategy_plot,
    health_plot,
    steering_plot,
    representation_plot,
)
