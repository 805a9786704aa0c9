"""One self-contained HTML page: inline CSS, inline SVG plots, one small inline script, no network.

The script only measures: it writes each plot's rendered size into data attributes
(`data-rendered-width`, ...) so a headless browser's `--dump-dom` can prove the plots drew, and
the page reads the same with scripts disabled.
"""

from __future__ import annotations

import datetime
import re
from html import escape

import yaml

from alignkit.report import plots as P
from alignkit.report import safety as SF
from alignkit.report import tables as T
from alignkit.report.inputs import RunInputs, num
from alignkit.version import __version__

TRAIN_PLOTS = ("training", "preference")
# Rows of the eval section; plots in one row sit side by side when the page is wide enough.
EVAL_ROWS = (("win_rate", "reward_kl"), ("length_bias",), ("overoptimisation",))

MISSING = {
    "training": "No training curves: run `alignkit train` (it writes metrics.jsonl) to add loss, learning-rate "
    "and gradient-norm curves.",
    "preference": "No reward margins or preference accuracies: preference and reward-model recipes log "
    "`rewards/margins`, `rewards/accuracies` or `accuracy` to metrics.jsonl.",
    "win_rate": "No win rates: run `alignkit eval` with generation to add generation win rates.",
    "reward_kl": "No reward-vs-KL curve: run `alignkit eval` over the run's checkpoints to add KL and reward "
    "per checkpoint.",
    "length_bias": "No length-bias analysis: run `alignkit eval` on preference pairs to add it.",
    "overoptimisation": "No over-optimisation indicators: run `alignkit eval` over the run's checkpoints to add "
    "top-k entropy, top-k mass and chosen log-prob change.",
}

CSS = """
img.thumb { display: block; max-width: 96px; max-height: 96px; margin-bottom: 4px; border: 1px solid #ccc; }
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --soft: #f9fafb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f6; color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 36px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 1.55rem; margin: 0 0 2px; }
h2 { font-size: 1.15rem; margin: 34px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 0.95rem; margin: 14px 0 6px; color: #374151; }
.sub { color: var(--muted); font-size: 13.5px; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(330px, 1fr)); gap: 8px 40px; }
.cols h2 { margin-top: 24px; }
table { border-collapse: collapse; font-size: 14px; width: 100%; }
th, td { padding: 5px 10px 5px 0; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-weight: 600; color: #374151; }
td.k { color: #374151; white-space: nowrap; width: 1%; padding-right: 18px; }
td.v { font-variant-numeric: tabular-nums; font-weight: 600; }
td.v .d { display: block; font-weight: 400; color: var(--muted); font-size: 12.5px; }
table.grid td, table.grid th { text-align: right; font-variant-numeric: tabular-nums; padding-right: 14px; }
table.grid td:first-child, table.grid th:first-child { text-align: left; }
.row { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 0 18px; }
.row > figure.plot { flex: 1 1 420px; }
figure.plot { margin: 14px 0 26px; padding: 14px 14px 10px; border: 1px solid var(--line); border-radius: 8px; }
figure.plot svg { display: block; width: 100%; height: auto; margin: 0 auto; }
figcaption { color: #4b5563; font-size: 13.5px; margin-top: 8px; }
figcaption strong { color: var(--fg); }
p.missing { color: var(--muted); font-size: 14px; margin: 8px 0; padding: 2px 10px; border-left: 3px solid #d1d5db; }
p.warn { font-size: 14px; margin: 8px 0; padding: 6px 10px; background: #fffbeb; border-left: 3px solid #f59e0b; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em;
  background: #f3f4f6; padding: 1px 4px; border-radius: 4px; }
details { margin: 14px 0; }
summary { cursor: pointer; color: #374151; font-weight: 600; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
  font-size: 12.5px; overflow-x: auto; }
pre.episode { white-space: pre-wrap; }
.scored { background: #fde68a; }
.context { color: var(--muted); }
table.alerts .ev { display: block; color: var(--muted); font-size: 12.5px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; }
@media print { body { background: #fff; } main { max-width: none; padding: 0; } figure { break-inside: avoid; } }
"""

# Records what the browser actually laid out and drew, for tests and for anyone debugging a blank plot.
SCRIPT = """
(function () {
  var figs = document.querySelectorAll("figure.plot"), ok = 0;
  for (var i = 0; i < figs.length; i++) {
    var f = figs[i], svg = f.querySelector("svg");
    if (!svg) { f.setAttribute("data-rendered", "no-svg"); continue; }
    var box = svg.getBoundingClientRect(), content = svg.getBBox();
    var drawn = svg.querySelectorAll("path, use, line, rect, circle, polyline, polygon, text").length;
    f.setAttribute("data-rendered-width", Math.round(box.width));
    f.setAttribute("data-rendered-height", Math.round(box.height));
    f.setAttribute("data-rendered-top", Math.round(box.top + window.scrollY));
    f.setAttribute("data-rendered-left", Math.round(box.left + window.scrollX));
    f.setAttribute("data-content-width", Math.round(content.width));
    f.setAttribute("data-content-height", Math.round(content.height));
    f.setAttribute("data-drawn-elements", drawn);
    var good = box.width > 0 && box.height > 0 && content.width > 0 && content.height > 0 && drawn > 0;
    f.setAttribute("data-rendered", good ? "ok" : "empty");
    if (good) ok++;
  }
  document.body.setAttribute("data-plots-rendered", ok + "/" + figs.length);
})();
"""

_PT = re.compile(r'<svg\b[^>]*?\bwidth="([\d.]+)pt"')


def text(s) -> str:
    """Escape, then show `backticked` spans as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(str(s)))


def kv_table(rows: list) -> str:
    body = "".join(
        f'<tr><td class="k">{text(k)}</td><td class="v">{text(v)}'
        + (f'<span class="d">{text(d)}</span>' if d else "")
        + "</td></tr>"
        for k, v, d in rows
    )
    return f'<table class="kv">{body}</table>'


def grid_table(header: list, rows: list) -> str:
    head = "".join(f"<th>{text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{text(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(p: P.Plot) -> str:
    # Narrow figures are not stretched to the page width: capped near their natural size, their
    # text stays the size it has in the full-width ones.
    m = _PT.search(p.svg)
    cap = f"max-width: {float(m.group(1)) * 96 / 72 * 1.1 + 30:.0f}px" if m else ""
    return (
        f'<figure class="plot" data-plot="{p.name}" id="plot-{p.name}" style="{cap}">{p.svg}'
        f"<figcaption><strong>{text(p.title)}.</strong> {text(p.caption)}</figcaption></figure>"
    )


def missing(name: str) -> str:
    return f'<p class="missing" data-missing="{name}">{text(MISSING[name])}</p>'


def render_page(inp: RunInputs) -> str:
    made = {p.name: p for p in (f(inp) for f in P.ALL) if p is not None}
    parts = [_header(inp)]
    parts += [f'<p class="warn">{text(n)}</p>' for n in inp.notes]
    parts.append(_summary(inp))
    parts.append('<section id="training"><h2>Training</h2>')
    parts += [figure(made[n]) if n in made else missing(n) for n in TRAIN_PLOTS]
    parts.append(_health(inp, made))
    parts.append("</section>")
    parts.append(_evaluation(inp, made))
    if inp.episode:
        parts.append(_episode(inp.episode))
    if inp.config:
        dump = yaml.safe_dump(inp.config, sort_keys=False, default_flow_style=False)
        parts.append(f"<details><summary>Full config.yaml</summary><pre>{escape(dump)}</pre></details>")
    parts.append(f"<footer>Written by alignkit {escape(__version__)} from {escape(', '.join(inp.sources))}.</footer>")
    title = f"alignkit report: {inp.run_dir.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(parts)
        + f"\n</main><script>{SCRIPT}</script></body></html>\n"
    )


def _episode(ep: dict) -> str:
    """The last sampled multi-turn episode, the tokens the loss scores highlighted."""
    body = "".join(
        f'<span class="{"scored" if m else "context"}">{escape(str(t))}</span>'
        for t, m in ep.get("spans", [])
        if isinstance(t, str)
    )
    facts = (
        f"{ep.get('turns')} turns, ended by {ep.get('end')}, turn rewards {ep.get('turn_rewards')}, "
        f"reward {ep.get('reward')}, counts {ep.get('counts')}"
    )
    return (
        '<section id="episode"><h2>One training episode</h2>'
        f'<p>{text(facts)}. <mark class="scored">Highlighted</mark>: the model\'s own tokens, the only ones the '
        "loss scores; the rest (tool results, turn markers) is context. The last episode in `episodes.jsonl`."
        f'</p><pre class="episode"><span class="context">{escape(str(ep.get("prompt", "")))}</span>{body}</pre>'
        "</section>"
    )


_PNG_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/]+={0,2}")


def _samples(ev: dict) -> str:
    """A few held-out prompts with the policy's and the reference's samples (`alignkit eval`'s
    generation section), each prompt's images beside it. Only PNG data URIs are shown: the file the
    report reads may come from someone else, and nothing in it may fetch or run anything."""
    examples = (ev.get("generation") or {}).get("examples") or []
    if not examples:
        return ""
    rows = []
    for ex in examples:
        images = "".join(
            f'<img class="thumb" alt="prompt image" src="{uri}">'
            for uri in ex.get("images", [])
            if isinstance(uri, str) and _PNG_URI.fullmatch(uri)
        )
        cells = [images + text(ex.get("prompt", "")), text(ex.get("policy", "")), text(ex.get("reference", ""))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        f"<details open><summary>Samples ({len(examples)} held-out prompts)</summary><table><tr><th>prompt</th>"
        "<th>policy</th><th>reference</th></tr>" + "".join(rows) + "</table></details>"
    )


def _header(inp: RunInputs) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    ev = inp.eval
    what = f" · model {ev['model']}" if ev.get("model") and not inp.config else ""
    return (
        f"<header><h1>alignkit report: {escape(inp.run_dir.resolve().name)}</h1>"
        f'<div class="sub">{escape(str(inp.run_dir.resolve()))}{escape(what)} · generated {now}</div></header>'
    )


def _summary(inp: RunInputs) -> str:
    key, run = T.key_numbers(inp), T.run_table(inp.config)
    cols = []
    if key:
        cols.append(f"<div><h2>Key numbers</h2>{kv_table(key)}</div>")
    if run:
        cols.append(f"<div><h2>Run</h2>{kv_table(run)}</div>")
    elif not inp.config:
        cols.append(
            '<div><h2>Run</h2><p class="missing" data-missing="config">No config.yaml: '
            "<code>alignkit train</code> writes one to its output_dir.</p></div>"
        )
    return f'<section id="summary" class="cols">{"".join(cols)}</section>'


def _health(inp: RunInputs, made: dict) -> str:
    """The health monitor's alerts: their timeline and a table with each one's evidence and advice. A
    run whose config has a `health` section but no alert says so; older runs get nothing."""
    if not inp.alerts:
        health = inp.config.get("health") if isinstance(inp.config.get("health"), dict) else None
        if health is None or not inp.has_metrics:
            return ""
        said = "is off (health.enabled: false)" if health.get("enabled") is False else "raised no alert"
        return f'<p class="sub" data-health="none">The training health monitor {said}.</p>'
    rows = []
    for a in sorted(inp.alerts, key=lambda a: num(a.get("step")) or 0):
        ev = a.get("evidence") if isinstance(a.get("evidence"), dict) else {}
        numbers = ", ".join(f"{k} = {_evidence_value(v)}" for k, v in ev.items())
        rows.append(
            f'<tr><td class="k">{text(a.get("step"))}</td><td class="k"><code>{escape(a["rule"])}</code>'
            f'</td><td>{text(a.get("message", ""))}<span class="ev">{escape(numbers)}</span></td>'
            f"<td>{text(a.get('advice', ''))}</td></tr>"
        )
    table = (
        '<table class="alerts"><thead><tr><th>step</th><th>rule</th><th>evidence</th><th>advice</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )
    stop = inp.summary.get("alert") if inp.summary.get("status") == "stopped_by_health" else None
    stopped = (
        '<p class="warn">'
        + text(
            f"The run stopped at step {inp.summary.get('steps')} on the alert of "
            f"`{stop.get('rule')}` (`train.stop_on`); its last checkpoint holds the "
            "model."
        )
        + "</p>"
        if isinstance(stop, dict)
        else ""
    )
    return (
        f'<div id="health"><h3>Health alerts ({len(rows)})</h3>{stopped}'
        + (figure(made["health"]) if "health" in made else "")
        + table
        + "</div>"
    )


def _evidence_value(v) -> str:
    if isinstance(v, list):
        return " -> ".join(_evidence_value(x) for x in v)
    return T.fmt_num(v) if num(v) is not None else str(v)


def _before_after(ba: dict) -> str:
    """The before/after table a run measured itself (the demo's held-out instruction following)."""
    header, rows = T.before_after_table(ba)
    parts = [f'<div data-section="before_after"><h3>{text(ba.get("title") or "Before and after")}</h3>']
    if ba.get("description"):
        parts.append(f'<p class="sub">{text(ba["description"])}</p>')
    parts.append(grid_table(header, rows))
    header, rows = T.side_check_table(ba)
    if rows:
        parts.append(grid_table(header, rows))
    return "".join(parts) + "</div>"


def _safety(inp: RunInputs) -> str:
    """The safety section of `alignkit eval --safety` (nothing when it was not run)."""
    header, rows = SF.safety_table(inp)
    if not rows:
        return ""
    plot = SF.safety_plot(inp)
    return (
        '<div data-section="safety"><h3>Safety</h3>'
        f'<p class="sub">{text(SF.judge_line(inp))}</p>{grid_table(header, rows)}'
        + (f'<div class="row">{figure(plot)}</div>' if plot else "")
        + "</div>"
    )


def _evaluation(inp: RunInputs, made: dict) -> str:
    parts = ['<section id="evaluation"><h2>Evaluation</h2>']
    if inp.before_after:
        parts.append(_before_after(inp.before_after))
    if not inp.eval and inp.before_after:  # measured already; `alignkit eval` would add diagnostics
        parts.append(
            '<p class="missing" data-missing="eval">Preference accuracies, length bias, generation win '
            "rates, KL and per-checkpoint diagnostics: run <code>alignkit eval</code> to add them.</p>"
            "</section>"
        )
        return "".join(parts)
    if not inp.eval:
        parts.append(
            '<p class="missing" data-missing="eval">No eval results (looked for eval/metrics.json and '
            "metrics.json): run <code>alignkit eval</code> to add preference accuracies, length bias, "
            "generation win rates, KL and per-checkpoint diagnostics.</p></section>"
        )
        return "".join(parts)
    tables = T.eval_tables(inp.eval)
    if tables:
        parts.append(
            '<div class="cols">'
            + "".join(f"<div><h3>{escape(t)}</h3>{kv_table(rows)}</div>" for t, rows in tables.items())
            + "</div>"
        )
    for row in EVAL_ROWS:
        figs = "".join(figure(made[n]) for n in row if n in made)
        if figs:
            parts.append(f'<div class="row">{figs}</div>')
        parts += [missing(n) for n in row if n not in made]
    parts.append(_samples(inp.eval))
    for name in ("strategy", "steering", "representation"):  # only evals that asked for them; no placeholder
        if name in made:
            parts.append(f'<div class="row">{figure(made[name])}</div>')
    parts.append(_safety(inp))
    header, rows = T.checkpoint_table(inp)
    if rows:
        parts.append(
            f"<details open><summary>Per-checkpoint numbers ({len(rows)})</summary>{grid_table(header, rows)}</details>"
        )
    parts.append("</section>")
    return "".join(parts)
