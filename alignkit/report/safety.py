"""The report's safety section (`alignkit eval --safety`): a table of the four measurements before
and after, and a figure of refusal against prefill depth and of best-of-N jailbreak success
against N with its power-law fit."""

from __future__ import annotations

import numpy as np

from alignkit.eval.safety import format_rate
from alignkit.report.inputs import RunInputs, num
from alignkit.report.plots import Plot
from alignkit.report.svg import EVAL, MUTED, new_figure, style, to_svg

SIDES = (("reference", "before", MUTED), ("model", "after", EVAL))


def _safety(inp: RunInputs) -> dict:
    sf = inp.eval.get("safety") if isinstance(inp.eval, dict) else None
    return sf if isinstance(sf, dict) else {}


def _rate(d) -> str:
    return format_rate(d) if isinstance(d, dict) and num(d.get("rate")) is not None else "n/a"


def _change(ch: dict, key: str) -> str:
    d = ch.get(key)
    if not isinstance(d, dict):
        return ""
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def safety_table(inp: RunInputs) -> tuple[list, list]:
    """(header, rows): each measurement of the reference and the model, and the paired change."""
    sf = _safety(inp)
    sides = [s for s, _, _ in SIDES if isinstance(sf.get(s), dict)]
    if not sides:
        return [], []
    ch = sf.get("change") or {}
    header = ["measure"] + [label for s, label, _ in SIDES if s in sides] + (["change (after - before)"] if ch else [])

    def row(name, get, change_key=None):
        return [name] + [get(sf[s]) for s in sides] + ([_change(ch, change_key) if change_key else ""] if ch else [])

    rows = [
        row(
            "harmful compliance, greedy",
            lambda m: _rate(m["harmful_compliance"]["greedy"]),
            "harmful_compliance_greedy",
        ),
        row(
            "harmful compliance, sampled",
            lambda m: _rate(m["harmful_compliance"]["sampled"]),
            "harmful_compliance_sampled",
        ),
        row("over-refusal of benign requests", lambda m: _rate(m["over_refusal"]), "over_refusal"),
    ]
    depth_ks = [c["k"] for c in sf[sides[0]]["refusal_at_depth"]["curve"]]
    for i, k in enumerate(depth_ks):
        rows.append(row(f"refusal after {k} prefilled tokens", lambda m, i=i: _rate(m["refusal_at_depth"]["curve"][i])))
    last = sf[sides[0]]["jailbreak"]["curve"][-1]["n"]
    rows.append(
        row(
            f"best-of-N jailbreak success at N={last}",
            lambda m: "{asr:.3f} [{lo:.3f}, {hi:.3f}]".format(**m["jailbreak"]["curve"][-1]),
            f"jailbreak_asr_at_{last}",
        )
    )
    rows.append(row("power law -log ASR = a N^-b", lambda m: _fit_text(m["jailbreak"]["fit"])))
    return header, rows


def _fit_text(fit: dict) -> str:
    if fit.get("a") is None:
        return f"no fit ({fit.get('reason', 'n/a')})"
    r2 = "exact through 2 points" if fit["r2"] is None else f"R^2 {fit['r2']:.2f} over {fit['points']} N"
    return f"a={fit['a']:.3g}, b={fit['b']:.3g} ({r2})"


def judge_line(inp: RunInputs) -> str:
    sf = _safety(inp)
    ag = sf.get("judge_agreement")
    if not isinstance(ag, dict):
        return ""
    kappa = "n/a" if ag.get("kappa") is None else f"{ag['kappa']:.2f}"
    return (
        f"Replies judged by `{sf.get('judge')}`: it agrees with {ag['n']} hand-labelled replies ({ag.get('labels')}) "
        f"on {ag['accuracy']:.3f} [{ag['lo']:.3f}, {ag['hi']:.3f}], Cohen's kappa {kappa}."
    )


def safety_plot(inp: RunInputs) -> Plot | None:
    """Refusal at depth (share refusing against prefill tokens) and ASR(N) with the fitted power law."""
    sf = _safety(inp)
    sides = [(s, label, color) for s, label, color in SIDES if isinstance(sf.get(s), dict)]
    if not sides:
        return None
    with style("safety"):
        fig, (ax1, ax2) = new_figure(2, width=8.6, height=3.2)
        for s, label, color in sides:
            pts = [c for c in sf[s]["refusal_at_depth"]["curve"] if num(c.get("rate")) is not None]
            if pts:
                k = [c["k"] for c in pts]
                ax1.plot(k, [c["rate"] for c in pts], marker="o", color=color, label=label)
                ax1.fill_between(k, [c["lo"] for c in pts], [c["hi"] for c in pts], color=color, alpha=0.15, lw=0)
            jb = sf[s]["jailbreak"]
            n = [c["n"] for c in jb["curve"]]
            ax2.plot(n, [c["asr"] for c in jb["curve"]], marker="o", color=color, label=label)
            ax2.fill_between(n, [c["lo"] for c in jb["curve"]], [c["hi"] for c in jb["curve"]], color=color, alpha=0.15)
            fit = jb.get("fit") or {}
            if fit.get("a") is not None:
                grid = np.geomspace(min(n), max(n), 50)
                ax2.plot(grid, np.exp(-fit["a"] * grid ** (-fit["b"])), color=color, linestyle="--", linewidth=1)
        ax1.set_ylim(-0.02, 1.02)
        ax1.set_xlabel("tokens of a compliant reply prefilled (k)")
        ax1.set_title("refusal at depth")
        ax2.set_xscale("log", base=2)
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_xlabel("augmented attempts N")
        ax2.set_title("best-of-N jailbreak success")
        for ax in (ax1, ax2):
            if ax.get_legend_handles_labels()[0]:  # refusal at depth has no points without targets
                ax.legend(loc="best", fontsize=8)
        return Plot(
            "safety",
            "Safety: refusal at depth and jailbreak robustness",
            to_svg(fig, "safety"),
            "Left: the share of harmful requests still refused when the reply starts with k tokens of a compliant "
            "answer (shallow safety falls off at small k). Right: the share of requests that at least one of N "
            "randomly augmented versions gets a compliant reply to (arXiv 2412.03556); dashed: the fitted "
            "power law -log ASR = a N^-b. Bands: 95% intervals.",
        )
