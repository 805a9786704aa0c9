"""Matplotlib figures -> inline SVG strings that can sit side by side in one HTML page.

Figures are made with `matplotlib.figure.Figure` directly, not `pyplot`: no global figure
registry, no GUI backend, nothing to close, and the caller's pyplot backend is left alone (the
SVG canvas renders like Agg, without a display).
"""

from __future__ import annotations

import io
import re
from contextlib import contextmanager

import matplotlib
from matplotlib.figure import Figure

TRAIN = "#2563eb"
EVAL = "#ea580c"
GOOD = "#16a34a"
BAD = "#dc2626"
MUTED = "#6b7280"
PALETTE = [TRAIN, EVAL, GOOD, BAD, "#7c3aed", "#0891b2", "#ca8a04", "#db2777"]

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.labelcolor": "#374151",
    "axes.edgecolor": "#9ca3af",
    "axes.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
    "xtick.color": "#4b5563",
    "ytick.color": "#4b5563",
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.frameon": False,
    "legend.fontsize": 8,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    # Glyphs as paths: the page looks the same with no fonts installed and text cannot overflow
    # the layout matplotlib computed with its own font metrics.
    "svg.fonttype": "path",
}

_STRIP = [
    re.compile(r"^.*?(?=<svg\b)", re.S),  # XML prolog, DOCTYPE (it names a URL), comments
    re.compile(r"<metadata>.*?</metadata>\s*", re.S),  # RDF block with URLs and a timestamp
]
_ID = re.compile(r'\bid="([^"]+)"')


@contextmanager
def style(name: str):
    """House style; the hash salt makes clip-path ids (and so the output) deterministic."""
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": f"alignkit-{name}"}):
        yield


def new_figure(n: int, width: float = 10.0, height: float = 3.0) -> tuple[Figure, list]:
    """A figure with `n` panels: one row up to three, else rows of two (four in a row are too small to read).

    `height` is per row."""
    cols = n if n <= 3 else 2
    rows = -(-n // cols)
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.remove()
    if rows > 1:  # room between a panel's x label and the title of the panel below
        fig.get_layout_engine().set(hspace=0.06)
    return fig, axes[:n]


def to_svg(fig: Figure, name: str) -> str:
    """Render `fig` to an <svg> element whose ids are unique to `name` within the page."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    for pattern in _STRIP:
        svg = pattern.sub("", svg, count=1)
    return _prefix_ids(svg, f"{name}-").strip()


def _prefix_ids(svg: str, prefix: str) -> str:
    # Inline SVGs share the page's id namespace: two figures defining `#p1a2b` or `#DejaVuSans-30`
    # would make each reference resolve to the first, which is invalid and clips wrongly.
    ids = set(_ID.findall(svg))
    ref = re.compile(r'(\bid="|href="#|url\(#)([^")]+)')
    return ref.sub(lambda m: m.group(1) + (prefix + m.group(2) if m.group(2) in ids else m.group(2)), svg)
