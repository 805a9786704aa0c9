"""The run report: one self-contained HTML file of what a training run and its evals measured.

    from alignkit.report import build_report
    build_report("runs/my-dpo")          # -> runs/my-dpo/report.html

Reads, all optional: metrics.jsonl, summary.json, config.yaml (from `alignkit train`),
eval/metrics.json or metrics.json (from `alignkit eval`) and before_after.json (a before/after
measurement such as `alignkit demo`'s, see `inputs.write_before_after`). Layout: `inputs` reads
the directory, `plots` draws the figures, `tables` formats the numbers, `html` lays out the page.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from alignkit.report.html import render_page
from alignkit.report.inputs import LOOKED_FOR, read_run

__all__ = ["build_report", "LOOKED_FOR"]


def build_report(run_dir, output=None) -> Path:
    """Write the report for `run_dir` to `output` (default `run_dir/report.html`) and return its path.

    Sections whose inputs are absent are replaced by a one-line note saying what would fill them.
    Raises `AlignkitError` when run_dir holds none of the files in `LOOKED_FOR`, or one of them is
    unreadable. An existing directory as `output` gets a report.html inside it. The file is
    written to a temporary name beside it and renamed, so a reader never sees half a report.
    """
    inputs = read_run(run_dir)
    page = render_page(inputs)
    out = Path(run_dir) / "report.html" if output is None else Path(output)
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
