"""Experiment trackers: the run's config, metrics, alerts and report where users look for them.

`train.report_to` lists the backends; `alignkit.train.metrics.MetricsLogger` writes
`metrics.jsonl` (always) and hands every row to each tracker named there. Each backend is one small
class behind the `Tracker` protocol, in `BACKENDS` under the name `alignkit.registries.trackers`
registers (which `alignkit.config` reads to validate `train.report_to`). Nothing is imported until a
run starts a tracker, so the packages stay
optional: `check_installed` turns a missing one into a `ConfigError` with its install command
before any model loads.

Every backend writes locally, under the run directory, and needs no network or account:

| backend | where (default) | user override |
| --- | --- | --- |
| tensorboard | `RUN/tensorboard/` | - |
| wandb | offline run in `RUN/wandb/offline-run-*` (`wandb sync` uploads it) | `WANDB_MODE`, `WANDB_PROJECT` |
| trackio | SQLite store `RUN/trackio/` (`trackio show` reads it; `TRACKIO_DIR=RUN/trackio`) | `TRACKIO_DIR` |
| mlflow | SQLite store `RUN/mlflow/mlflow.db`, artifacts in `RUN/mlflow/artifacts/` | `MLFLOW_TRACKING_URI`,
`MLFLOW_EXPERIMENT_NAME` |

An environment variable the user set wins over the default: it is how these tools are pointed at a
server or a shared store, and a user who set one expects it to hold.

Resuming a run (`MetricsLogger(resume_step=N)`) continues the same tracker run where the backend
can: wandb and mlflow reuse the run id saved in `RUN/trackers.json`, trackio the run name. The
steps between the checkpoint and a crash are logged again; TensorBoard hides the first copies
(`purge_step`), mlflow and trackio keep both values for those steps, and wandb offline writes each
resumed leg into its own `offline-run-*` directory with the same run id (sync them in order; a
server run drops a re-logged step whose number it has already seen).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Protocol

from alignkit import jsonfile
from alignkit.config import flat_dict
from alignkit.errors import ConfigError
from alignkit.registries.trackers import TRACKERS, check_installed

IDS_FILE = "trackers.json"  # RUN/trackers.json: {backend: run id or name}, so that a resume reuses them


class Tracker(Protocol):
    """One backend. Metric keys arrive prefixed with their split (`train/loss`, `eval/loss`), values
    finite numbers; only the main process has trackers."""

    def start(self, run_dir: Path, config: dict, resume_step: int | None) -> str:
        """Open (or, with `resume_step`, reopen) the run and record `config` (the nested dict of
        config.yaml); return where it writes, for the line the run prints."""

    def log(self, step: int, metrics: dict) -> None:
        """Record `metrics` ({"train/loss": 0.69, ...}) at optimizer step `step`."""

    def log_alert(self, step: int, alert: dict) -> None:
        """Record a health alert (its `rule`, `message`, `level` when present; see `alert_title`)."""

    def log_artifact(self, path: Path) -> None:
        """Attach a file (the run's report.html) to the run."""

    def close(self) -> None:
        """Flush and finish the run."""


# ---------------------------------------------------------------------------------------------
# Helpers the backends share.


def alert_title(alert: dict) -> str:
    return str(alert.get("rule") or alert.get("title") or "alert")


def alert_text(alert: dict) -> str:
    """The alert in one readable line: its message and advice when given, else the whole dict
    (the numbers behind it are in `evidence`, which the message already quotes)."""
    parts = [str(alert[k]) for k in ("message", "advice") if alert.get(k)]
    return " ".join(parts) if parts else jsonfile.dumps(alert, default=str)


def alert_level(alert: dict) -> str:
    """INFO, WARN or ERROR (the levels wandb and trackio share); anything else reads as WARN."""
    level = str(alert.get("level") or alert.get("severity") or "warn").upper()
    level = {"WARNING": "WARN", "CRITICAL": "ERROR"}.get(level, level)
    return level if level in ("INFO", "WARN", "ERROR") else "WARN"


def _read_ids(run_dir: Path) -> dict:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_id(run_dir: Path, backend: str, resume_step: int | None) -> str | None:
    """The id this backend's run had before, when resuming; None for a new run."""
    return _read_ids(run_dir).get(backend) if resume_step is not None else None


def _save_id(run_dir: Path, backend: str, run_id: str) -> None:
    jsonfile.write_atomic(run_dir / IDS_FILE, {**_read_ids(run_dir), backend: run_id})


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


# ---------------------------------------------------------------------------------------------
# Backends.


class TensorBoardTracker:
    def start(self, run_dir: Path, config: dict, resume_step: int | None) -> str:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        where = run_dir / "tensorboard"
        # purge_step: TensorBoard hides the earlier files' events from this step on, so the steps
        # between the checkpoint and a crash are not drawn twice.
        self._writer = SummaryWriter(str(where), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:  # TensorBoard's text tab renders Markdown
            self._writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        return str(where)

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)

    def log_alert(self, step: int, alert: dict) -> None:
        self._writer.add_text(f"alert/{alert_title(alert)}", alert_text(alert), step)

    def log_artifact(self, path: Path) -> None:
        # TensorBoard stores no files: a text entry says where the report is.
        self._writer.add_text("report", f"`{path}`")

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """Weights & Biases, offline unless `WANDB_MODE` says otherwise (`wandb sync RUN/wandb/offline-run-*`
    uploads an offline run). Alerts are wandb alerts; the report is a run file."""

    def start(self, run_dir: Path, config: dict, resume_step: int | None) -> str:
        import wandb

        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "alignkit",
            name=run_dir.name,
            id=_run_id(run_dir, "wandb", resume_step),
            dir=str(run_dir),
            # wandb checks the user's WANDB_MODE itself; its stubs accept only the literal modes
            mode=os.environ.get("WANDB_MODE") or "offline",  # type: ignore[arg-type]
            config=config,
            resume="allow",
            # alignkit's run is its own, even when the user's code has a wandb run open.
            reinit="create_new",
        )
        _save_id(run_dir, "wandb", self._run.id)
        return f"{run_dir / 'wandb'} (run id {self._run.id}, mode {self._run.settings.mode})"

    def log(self, step: int, metrics: dict) -> None:
        self._run.log(metrics, step=step)

    def log_alert(self, step: int, alert: dict) -> None:
        import wandb

        level = getattr(wandb.AlertLevel, alert_level(alert))  # type: ignore[attr-defined]  # not in wandb's .pyi
        self._run.alert(
            title=alert_title(alert), text=f"step {step}: {alert_text(alert)}", level=level, wait_duration=0
        )

    def log_artifact(self, path: Path) -> None:
        self._run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self._run.finish()


class TrackioTracker:
    """trackio, with its local SQLite store in `RUN/trackio/` (project `alignkit`, run named after the
    run directory). trackio reads its store directory (`TRACKIO_DIR`) once, when first imported: a
    process that trains several runs keeps the first run's store (the printed line says where)."""

    def start(self, run_dir: Path, config: dict, resume_step: int | None) -> str:
        if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
            os.environ["TRACKIO_DIR"] = str((run_dir / "trackio").resolve())
            try:
                import trackio  # noqa: F401  (reads TRACKIO_DIR now)
            finally:  # not left to child processes or later imports elsewhere
                del os.environ["TRACKIO_DIR"]
        import trackio
        from trackio import utils

        previous = _run_id(run_dir, "trackio", resume_step)
        self._name = previous or _safe_name(run_dir.name)
        self._run = trackio.init(
            project="alignkit", name=self._name, config=config, resume="allow" if previous else "never", embed=False
        )
        _save_id(run_dir, "trackio", self._name)
        return f"{utils.TRACKIO_DIR} (project alignkit, run {self._name})"

    def log(self, step: int, metrics: dict) -> None:
        self._run.log(metrics, step=step)

    def log_alert(self, step: int, alert: dict) -> None:
        import trackio

        level = getattr(trackio.AlertLevel, alert_level(alert))
        self._run.alert(title=alert_title(alert), text=alert_text(alert), level=level, step=step)

    def log_artifact(self, path: Path) -> None:
        self._run.log_artifact(path, name=f"{self._name}-{_safe_name(path.stem)}", type=_safe_name(path.stem))

    def close(self) -> None:
        from trackio import context_vars

        if context_vars.current_run.get() is self._run:
            import trackio

            trackio.finish()  # also clears trackio's current run, so its exit hook does not finish it again
        else:
            self._run.finish()


class MlflowTracker:
    """MLflow, through its client (no global active run), into a SQLite store in `RUN/mlflow/`
    (MLflow 3 keeps the `./mlruns` file store in maintenance mode and refuses it by default).
    The config goes in as parameters (flat keys) and as `config.json`; alerts as
    `alerts/step-N-RULE.json` files plus a metric `alert/RULE` = 1 at their step; the report as a file.
    Parameters cannot change in MLflow, so a resume does not log them again (a resume's config
    changes are in RUN/config_changes.jsonl)."""

    MAX_PARAM = 6000  # MLflow rejects longer parameter values

    def start(self, run_dir: Path, config: dict, resume_step: int | None) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        store = run_dir / "mlflow"
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
        self._client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "alignkit"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # local store: artifacts beside it, not in ./mlruns of the current directory
            local = None if os.environ.get("MLFLOW_TRACKING_URI") else (store / "artifacts").resolve().as_uri()
            experiment_id = client.create_experiment(name, artifact_location=local)
        previous = _run_id(run_dir, "mlflow", resume_step)
        if previous is not None:
            self._id = previous
            client.update_run(self._id, status="RUNNING")
        else:
            self._id = client.create_run(
                experiment_id, run_name=run_dir.name, tags={"alignkit.run_dir": str(run_dir.resolve())}
            ).info.run_id
            params = [Param(k, str(v)[: self.MAX_PARAM]) for k, v in flat_dict(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                client.log_batch(self._id, params=params[i : i + 100])
            client.log_dict(self._id, config, "config.json")
        _save_id(run_dir, "mlflow", self._id)
        return f"{uri} (experiment {name}, run id {self._id})"

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_alert(self, step: int, alert: dict) -> None:
        rule = _safe_name(alert_title(alert))
        self._client.log_dict(self._id, jsonfile.finite({"step": step, **alert}), f"alerts/step-{step}-{rule}.json")
        self._client.log_metric(self._id, f"alert/{rule}", 1.0, step=step)

    def log_artifact(self, path: Path) -> None:
        self._client.log_artifact(self._id, str(path))

    def close(self) -> None:
        self._client.set_terminated(self._id, "FINISHED")


# ---------------------------------------------------------------------------------------------
# The registry.


# name -> the class implementing it (names, packages and install commands: alignkit.registries.trackers)
BACKENDS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
    "mlflow": MlflowTracker,
}


def start(names, run_dir: Path, config: dict, resume_step: int | None) -> list[Tracker]:
    """Start each named tracker; on a failure, close the ones already started and re-raise."""
    check_installed(names)  # also here: a MetricsLogger made outside `alignkit train`
    started = []
    try:
        for name in names:
            tracker = BACKENDS[name]()
            where = tracker.start(Path(run_dir), config, resume_step)
            started.append(tracker)
            print(f"alignkit: {name} logs to {where}", flush=True)
    except ImportError as e:  # a package that find_spec saw but that does not import
        close_all(started)
        raise ConfigError(
            f"`train.report_to`: {name} could not be imported ({e}); reinstall it with `{TRACKERS[name].install}`."
        ) from e
    except BaseException:
        close_all(started)
        raise
    return started


def close_all(trackers: list[Tracker]) -> None:
    """Close every tracker, even when one fails; then raise the first failure."""
    error = None
    for t in trackers:
        try:
            t.close()
        except Exception as e:  # the others must still flush their files
            error = error or e
    if error is not None:
        raise error
