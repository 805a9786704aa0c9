"""Read what a run directory holds into one `RunInputs`, tolerating every file being absent.

Besides what `alignkit train` and `alignkit eval` write, a run directory may hold
`before_after.json`: a before/after measurement made outside `alignkit eval`, such as the demo's
held-out instruction following (`write_before_after` writes it; its schema is `BEFORE_AFTER_DOC`).

A report is often built from a run that is still going, was killed, or holds only an eval, so each
input is optional. What is present but unreadable raises `AlignkitError` naming the file (and line);
the one exception is a half-written last line of `metrics.jsonl` (a run killed mid-write), which is
dropped with a note shown in the report rather than refusing to report on the rest of the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignkit.errors import AlignkitError
from alignkit.train.metrics import read_metrics

EVAL_FORMAT_VERSION = 1
EVAL_SECTIONS = ("preference", "length_bias", "generation", "checkpoints", "strategy")
# Where an eval's metrics.json may be, in order of preference.
EVAL_CANDIDATES = ("eval/metrics.json", "metrics.json")
BEFORE_AFTER = "before_after.json"
BEFORE_AFTER_VERSION = 1
BEFORE_AFTER_DOC = """{"alignkit_before_after": 1, "title": str, "description": str,
 "rows": [{"label": str, "before": float, "after": float, "diff": float, "ci95": [lo, hi], "n": int,
           "overall": bool (optional: the row the key numbers show)}, ...],
 "side_checks": [{"label": str, "before": float, "after": float, "n": int}, ...] (optional)}"""
LOOKED_FOR = ("metrics.jsonl", "summary.json", "config.yaml") + EVAL_CANDIDATES + (BEFORE_AFTER,)


@dataclass
class RunInputs:
    run_dir: Path
    train_rows: list = field(default_factory=list)  # metrics.jsonl rows with split "train"
    eval_rows: list = field(default_factory=list)  # metrics.jsonl rows with split "eval"
    alerts: list = field(default_factory=list)  # metrics.jsonl rows with split "alert" (health monitor)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)  # an `alignkit eval` metrics.json
    before_after: dict = field(default_factory=dict)  # a before_after.json (e.g. the demo's measurement)
    episode: dict = field(default_factory=dict)  # the last row of episodes.jsonl (multi-turn runs, `env.name`)
    sources: list = field(default_factory=list)  # the files read, relative to run_dir
    notes: list = field(default_factory=list)  # problems the reader worked around, shown in the report

    @property
    def has_metrics(self) -> bool:
        return bool(self.train_rows or self.eval_rows)

    def usable(self) -> bool:
        return bool(self.has_metrics or self.summary or self.config or self.eval or self.before_after)


def num(x) -> float | None:
    """`x` as a finite float, or None for anything else (None, NaN, inf, strings, bools)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def read_run(run_dir) -> RunInputs:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise AlignkitError(f"run directory {run_dir} does not exist.")
    if not run_dir.is_dir():
        raise AlignkitError(f"{run_dir} is a file; pass the run directory that holds it ({run_dir.parent}).")
    inputs = RunInputs(run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        rows = _read_metrics_rows(run_dir, inputs.notes)
        inputs.train_rows = [r for r in rows if r.get("split", "train") == "train"]
        inputs.eval_rows = [r for r in rows if r.get("split") == "eval"]
        inputs.alerts = [r for r in rows if r.get("split") == "alert" and isinstance(r.get("rule"), str)]
        inputs.sources.append("metrics.jsonl")
    if (run_dir / "summary.json").is_file():
        inputs.summary = _read_json_object(run_dir / "summary.json")
        inputs.sources.append("summary.json")
    if (run_dir / "config.yaml").is_file():
        inputs.config = _read_yaml_object(run_dir / "config.yaml")
        inputs.sources.append("config.yaml")
    for rel in EVAL_CANDIDATES:
        path = run_dir / rel
        if path.is_file():
            data = _read_json_object(path)
            if _is_eval(data):
                inputs.eval = data
                inputs.sources.append(rel)
                _check_eval_version(data, rel, inputs.notes)
                break
            inputs.notes.append(
                f"{rel} ignored: it has no `alignkit_eval` key and none of the sections "
                f"{', '.join(EVAL_SECTIONS)}, so it is not an `alignkit eval` result."
            )
    if (run_dir / BEFORE_AFTER).is_file():
        inputs.before_after = _read_json_object(run_dir / BEFORE_AFTER)
        check_before_after(inputs.before_after, run_dir / BEFORE_AFTER)
        inputs.sources.append(BEFORE_AFTER)
    if (run_dir / "episodes.jsonl").is_file():
        rows = _read_metrics_tolerant(run_dir / "episodes.jsonl", inputs.notes)
        rows = [r for r in rows if isinstance(r.get("spans"), list)]
        if rows:
            inputs.episode = rows[-1]
            inputs.sources.append("episodes.jsonl")
    if not inputs.usable():
        raise AlignkitError(
            f"nothing to report in {run_dir}: looked for {', '.join(LOOKED_FOR)} and found none "
            "(or only empty ones). Pass the output_dir of `alignkit train` or the folder `alignkit eval` wrote."
        )
    return inputs


def _read_metrics_rows(run_dir: Path, notes: list) -> list:
    path = run_dir / "metrics.jsonl"
    try:
        rows = read_metrics(run_dir)
    except json.JSONDecodeError:
        rows = _read_metrics_tolerant(path, notes)
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or num(r.get("step")) is None]
    if bad:
        raise AlignkitError(
            f"{path}: row {bad[0]} has no numeric `step` (or is not a JSON object); each line "
            'must look like {"step": 10, "split": "train", "loss": 0.69}.'
        )
    return rows


def _read_metrics_tolerant(path: Path, notes: list) -> list:
    """Parse line by line to name the bad line; forgive only a truncated last line."""
    lines = [(i, ln) for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    rows = []
    for k, (lineno, ln) in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:
                notes.append(f"metrics.jsonl line {lineno} is incomplete (a run stopped mid-write?) and was skipped.")
                break
            raise AlignkitError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete that line.") from e
    return rows


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AlignkitError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix or delete the file.") from e
    if not isinstance(data, dict):
        raise AlignkitError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}.")
    return data


def _read_yaml_object(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AlignkitError(f"{path}: not valid YAML ({e}); fix or delete the file.") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AlignkitError(f"{path}: expected a mapping of config keys, got {type(data).__name__}.")
    return data


def _is_eval(data: dict) -> bool:
    return "alignkit_eval" in data or any(k in data for k in EVAL_SECTIONS)


def _check_eval_version(data: dict, rel: str, notes: list) -> None:
    version = data.get("alignkit_eval")
    if version is not None and version != EVAL_FORMAT_VERSION:
        notes.append(
            f"{rel} has eval format version {version!r}; this report reads version "
            f"{EVAL_FORMAT_VERSION}, so sections it does not know are left out."
        )


def check_before_after(data: dict, where) -> None:
    """Raise `AlignkitError` naming `where` and the first problem when `data` is not a before/after section."""

    def bad(what: str):
        raise AlignkitError(f"{where}: {what}; a before/after section looks like {BEFORE_AFTER_DOC}")

    if data.get("alignkit_before_after") != BEFORE_AFTER_VERSION:
        bad(f"`alignkit_before_after` must be {BEFORE_AFTER_VERSION}, found {data.get('alignkit_before_after')!r}")
    for key in ("rows", "side_checks"):
        value = data.get(key, [])
        if not isinstance(value, list) or (key == "rows" and not value):
            bad(f"`{key}` must be a{' non-empty' if key == 'rows' else ''} list")
        for i, row in enumerate(value):
            if not isinstance(row, dict) or not isinstance(row.get("label"), str):
                bad(f"{key}[{i}] must be an object with a `label`")
            for k in ("before", "after"):
                if num(row.get(k)) is None:
                    bad(f"{key}[{i}].{k} must be a finite number, found {row.get(k)!r}")


def write_before_after(run_dir, section: dict) -> Path:
    """Write `section` to run_dir/before_after.json, checked first so the report can always read it."""
    path = Path(run_dir) / BEFORE_AFTER
    check_before_after(section, path)
    path.write_text(json.dumps(section, indent=2), encoding="utf-8")
    return path
