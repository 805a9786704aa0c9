"""Metrics: one JSON line per logged step in `metrics.jsonl`, and TensorBoard when installed.

Lines are strict JSON: a non-finite value is written as null (the loop marks such steps with
`"nonfinite": 1` or `"skipped": 1`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignkit import jsonfile


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # Drop lines written after the checkpoint we resume from: they will be logged again.
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        record = {"step": step, "split": split}
        record.update({k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v)
                       for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(jsonfile.dumps(record) + "\n")  # NaN / inf become null: the file stays strict JSON
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """The logger of processes other than the main one: they log nothing."""

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if split is None or r["split"] == split]
