"""Metrics: one JSON line per logged step in `metrics.jsonl`, and the trackers of `train.report_to`.

Lines are strict JSON: a non-finite value is written as null (the loop marks such steps with
`"nonfinite": 1` or `"skipped": 1`). Rows have `"split": "train"`, `"eval"` or `"alert"` (a health
alert: its step and fields). Every row also goes to each tracker (`alignkit.train.trackers`)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from alignkit import jsonfile
from alignkit.train import trackers as tracker_backends


class MetricsLogger:
    """`metrics.jsonl` plus the trackers named in `report_to` (see `alignkit.train.trackers`).

    `config`: the run's config (a RunConfig or its dict), which each tracker records once.
    `resume_step`: the checkpoint's step when resuming: rows after it are dropped from
    metrics.jsonl (they will be logged again) and the trackers reopen their runs."""

    def __init__(self, run_dir: Path, report_to=(), config=None, resume_step: int | None = None):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # Drop lines written after the checkpoint we resume from: they will be logged again.
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None:
            self.path.write_text("")
        is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
        config = dataclasses.asdict(config) if is_instance else dict(config or {})
        self.trackers = tracker_backends.start(list(report_to), run_dir, config, resume_step)

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(jsonfile.dumps(record) + "\n")  # NaN / inf become null: the file stays strict JSON

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        record = {"step": step, "split": split}
        record.update(
            {k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        )
        self._write(record)
        # Trackers get the numbers as written (so they equal the file), finite ones only: a NaN step
        # is marked by its `nonfinite` / `skipped` flag, which is a number and goes too.
        scalars = {
            f"{split}/{k}": v
            for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v)
        }
        for t in self.trackers:
            t.log(step, scalars)

    def log_alert(self, step: int, alert: dict) -> None:
        """A health alert at `step`: an `{"step", "split": "alert", **alert}` row in metrics.jsonl,
        and the alert on every tracker. `alert` is JSON-able; trackers show its `rule` as the title
        and its `message` and `advice` as the text (mlflow keeps the whole dict, `evidence` included)."""
        record = {"step": step, "split": "alert"}
        record.update({k: v for k, v in alert.items() if k not in record})
        self._write(record)
        for t in self.trackers:
            t.log_alert(step, alert)

    def log_artifact(self, path: Path) -> None:
        """Attach a file (the run's report.html) to every tracker's run."""
        for t in self.trackers:
            t.log_artifact(Path(path))

    def close(self) -> None:
        tracker_backends.close_all(self.trackers)


class NullLogger:
    """The logger of processes other than the main one: they log nothing."""

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        pass

    def log_alert(self, step: int, alert: dict) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if split is None or r["split"] == split]
