"""The Python API's entry points where they need more than one layer: `train` runs the training loop
and writes the run's HTML report at its end (the loop, a lower layer, does not know the report).

    import alignkit
    result = alignkit.train(alignkit.load_config("run.yaml"))
"""

from __future__ import annotations

from pathlib import Path

from alignkit.config import RunConfig
from alignkit.train.loop import RunResult
from alignkit.train.loop import train as train_loop


def write_report(run_dir) -> Path:
    """RUN/report.html, built from the run directory (`alignkit report` does the same)."""
    from alignkit.report import build_report

    path = build_report(run_dir)
    print(f"alignkit: report in {path} (add evaluation with `alignkit eval --run {run_dir}`)", flush=True)
    return path


def train(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    resume_from: str | None = None,
    allow_config_change: bool = False,
) -> RunResult:
    """`alignkit.train.loop.train` (see there), then the report: written when the run ends and when a
    health rule stops it, and handed to every tracker of `train.report_to`."""
    return train_loop(
        cfg,
        resume=resume,
        progress=progress,
        resume_from=resume_from,
        allow_config_change=allow_config_change,
        finish=write_report,
    )
