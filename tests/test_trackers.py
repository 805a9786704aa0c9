"""`train.report_to`: each tracker, run for real and offline, holds what metrics.jsonl holds.

Every backend test trains the tiny model for 4 steps (evaluating at 2 and 4) with one health alert
injected at step 2, then reads back what the backend wrote through its own files or API: the
config, every finite number of every train and eval row at its step, the alert rows, and the
report file. A missing package, an unknown tracker name and the old `train.tensorboard` key are
errors that say what to do.
"""

import glob
import json
import math
import re
import struct
import sys
import time
from pathlib import Path

import pytest
from conftest import base_overrides

import alignkit.api
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.train import loop
from alignkit.train.metrics import MetricsLogger, read_metrics

ALERT = {
    "rule": "loss_stuck_at_ln2",
    "seen_in": "train",
    "message": "loss 0.6931 is ln 2 after 2 steps.",
    "evidence": {"loss": 0.6931},
    "advice": "raise the learning rate.",
}


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    """The user settings that would point a tracker at a server or another store."""
    for var in (
        "WANDB_MODE",
        "WANDB_PROJECT",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "TRACKIO_DIR",
        "TRACKIO_SPACE_ID",
        "TRACKIO_SERVER_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def _cfg(tiny_model_dir, pairs_file, tmp_path, *extra, out="run"):
    return load_config(
        None,
        base_overrides(tiny_model_dir, pairs_file, tmp_path / out, tmp_path / "cache")
        + [
            "train.learning_rate=5e-3",
            "train.batch_size=4",
            "train.warmup_ratio=0",
            "data.eval_fraction=0.1",
            "train.max_steps=4",
            "train.eval_every=2",
            *extra,
        ],
    )


def _train_with_alert(monkeypatch, cfg):
    """Train, with ALERT logged right after step 2's train row (as the health monitor would)."""

    class AlertingLogger(MetricsLogger):
        def log(self, step, metrics, split="train"):
            super().log(step, metrics, split)
            if split == "train" and step == 2:
                self.log_alert(step, ALERT)

    monkeypatch.setattr(loop, "MetricsLogger", AlertingLogger)
    result = alignkit.api.train(cfg, progress=False)  # the report is handed to the trackers too
    return result.run_dir


def _expected(run_dir) -> dict:
    """{(step, "train/loss"): value} of every finite number metrics.jsonl holds for train and eval."""
    out = {}
    for r in read_metrics(run_dir):
        if r["split"] in ("train", "eval"):
            out.update(
                {
                    (r["step"], f"{r['split']}/{k}"): v
                    for k, v in r.items()
                    if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v)
                }
            )
    return out


def _alerts(run_dir) -> list:
    return [r for r in read_metrics(run_dir) if r["split"] == "alert"]


def _check_common(run_dir, logged: dict, float32: bool = False):
    expected = _expected(run_dir)
    assert {s for s, _ in expected} == {1, 2, 3, 4} and (4, "eval/loss") in expected and (2, "eval/loss") in expected
    assert set(logged) == set(expected)
    for key, value in expected.items():
        if float32:  # TensorBoard stores scalars as float32
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
        else:
            assert logged[key] == value, key
    alerts = _alerts(run_dir)
    assert any(a["step"] == 2 and a["rule"] == ALERT["rule"] and a["message"] == ALERT["message"] for a in alerts)
    return alerts


# ---------------------------------------------------------------------------------------------
# One real run per backend.


def test_tensorboard(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _train_with_alert(
        monkeypatch, _cfg(tiny_model_dir, pairs_file, tmp_path, "train.report_to=[tensorboard]")
    )
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    logged = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    alerts = _check_common(run_dir, logged, float32=True)

    def texts(tag):
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]

    ((step, config),) = texts("config")
    assert "recipe: dpo" in config and "learning_rate: 0.005" in config and str(tiny_model_dir) in config
    shown = {
        (step, tag[len("alert/") : -len("/text_summary")], text)
        for tag in acc.Tags()["tensors"]
        if tag.startswith("alert/")
        for step, text in texts(tag[: -len("/text_summary")])
    }
    assert shown == {(a["step"], a["rule"], f"{a['message']} {a['advice']}") for a in alerts}
    assert texts("report") == [(0, f"`{run_dir / 'report.html'}`")]


def _wandb_records(run_file: Path) -> list:
    """The records of a finished run's `.wandb` file. wandb's service process writes the file
    asynchronously: `finish()` can return before the records reach the disk, so wait (up to 60 s)
    for the `exit` record, which is written last."""
    deadline = time.monotonic() + 60
    while True:
        records = _read_wandb_file(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_wandb_file(run_file: Path) -> list:
    """The protobuf records of a `.wandb` file: a 7-byte header (':W&B', magic, version), then
    LevelDB-log chunks (crc32 4 bytes, length 2, type 1: full, first, middle, last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a chunk not yet written out
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_run(run_dir) -> dict:
    (offline,) = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    (run_file,) = glob.glob(f"{offline}/run-*.wandb")
    out = {"dir": Path(offline), "history": {}, "alerts": [], "files": [], "config": {}}
    for r in _wandb_records(Path(run_file)):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            out["history"].update({(r.history.step.num, k): v for k, v in items.items() if not k.startswith("_")})
        elif kind == "alert":
            out["alerts"].append((r.alert.title, r.alert.text, r.alert.level))
        elif kind == "files":
            out["files"] += [f.path for f in r.files.files]
    return out


def test_wandb_offline(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    run_dir = _train_with_alert(monkeypatch, _cfg(tiny_model_dir, pairs_file, tmp_path, "train.report_to=[wandb]"))
    run = _wandb_run(run_dir)
    alerts = _check_common(run_dir, run["history"])
    assert run["config"]["recipe"] == "dpo" and run["config"]["train"]["learning_rate"] == 0.005
    assert run["config"]["model"]["name_or_path"] == str(tiny_model_dir)
    assert run["id"] == json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert sorted(run["alerts"]) == sorted(
        (a["rule"], f"step {a['step']}: {a['message']} {a['advice']}", "WARN") for a in alerts
    )
    assert "report.html" in run["files"]
    assert (run["dir"] / "files" / "report.html").read_bytes() == (run_dir / "report.html").read_bytes()


def test_trackio_local_store(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    # The first test in this process to import trackio: trackio fixes its store directory then.
    run_dir = _train_with_alert(monkeypatch, _cfg(tiny_model_dir, pairs_file, tmp_path, "train.report_to=[trackio]"))
    from trackio import utils
    from trackio.api import Api
    from trackio.sqlite_storage import SQLiteStorage

    assert Path(utils.TRACKIO_DIR) == (run_dir / "trackio").resolve()
    assert (run_dir / "trackio" / "alignkit.db").is_file()
    name = json.loads((run_dir / "trackers.json").read_text())["trackio"]
    assert name == "run"
    logged = {}
    for row in SQLiteStorage.get_logs("alignkit", name):
        logged.update({(row["step"], k): v for k, v in row.items() if k not in ("step", "timestamp")})
    alerts = _check_common(run_dir, logged)
    config = SQLiteStorage.get_run_config("alignkit", name)
    assert config["recipe"] == "dpo" and config["train"]["learning_rate"] == 0.005
    (run,) = [r for r in Api().runs("alignkit") if r.name == name]
    assert sorted((a["step"], a["title"], a["text"], a["level"]) for a in run.alerts()) == sorted(
        (a["step"], a["rule"], f"{a['message']} {a['advice']}", "warn") for a in alerts
    )
    artifact = SQLiteStorage.get_artifact_manifest("alignkit", f"{name}-report", None)
    assert artifact["producer_run_name"] == name
    (entry,) = artifact["manifest"]
    (blob,) = (run_dir / "trackio" / "artifacts").rglob(entry["digest"])  # trackio's content-addressed store
    assert entry["path"] == "report.html" and blob.read_bytes() == (run_dir / "report.html").read_bytes()


def _mlflow(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return client, run_id


def test_mlflow_sqlite_store(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    run_dir = _train_with_alert(monkeypatch, _cfg(tiny_model_dir, pairs_file, tmp_path, "train.report_to=[mlflow]"))
    client, run_id = _mlflow(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    logged = {
        (m.step, key): m.value
        for key in run.data.metrics
        if not key.startswith("alert/")
        for m in client.get_metric_history(run_id, key)
    }
    alerts = _check_common(run_dir, logged)
    params = run.data.params
    assert params["recipe"] == "dpo" and float(params["train.learning_rate"]) == 0.005
    assert params["model.name_or_path"] == str(tiny_model_dir)
    assert (
        json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text())["train"][
            "max_steps"
        ]
        == 4
    )
    saved = sorted(f.path for f in client.list_artifacts(run_id, "alerts"))
    assert saved == sorted(f"alerts/step-{a['step']}-{a['rule']}.json" for a in alerts)
    got = json.loads(
        Path(client.download_artifacts(run_id, f"alerts/step-2-{ALERT['rule']}.json", str(tmp_path))).read_text()
    )
    assert got == {"step": 2, **ALERT}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, f"alert/{ALERT['rule']}")] == [(2, 1.0)]
    report = Path(client.download_artifacts(run_id, "report.html", str(tmp_path / "dl")))
    assert report.read_bytes() == (run_dir / "report.html").read_bytes()
    assert str(run.info.artifact_uri).startswith((run_dir / "mlflow" / "artifacts").resolve().as_uri())


# ---------------------------------------------------------------------------------------------
# Resuming continues the same tracker run.


def _two_legs(run_dir, backend):
    """Steps 1-3, then a resume from a checkpoint at step 2 that logs steps 3-4 (as the loop would)."""
    config = {"recipe": "dpo", "train": {"learning_rate": 0.005}}
    first = MetricsLogger(run_dir, [backend], config)
    for step in (1, 2, 3):
        first.log(step, {"loss": 2.0 ** (1 - step)})
    first.close()
    second = MetricsLogger(run_dir, [backend], config, resume_step=2)
    for step in (3, 4):
        second.log(step, {"loss": 10.0 + step})
    second.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(run_dir)] == [(1, 1.0), (2, 0.5), (3, 13.0), (4, 14.0)]


def test_wandb_resume_keeps_the_run_id(tmp_path):
    run_dir = tmp_path / "wandb-resume"
    _two_legs(run_dir, "wandb")
    legs = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(legs) == 2  # offline, each leg is its own directory ...
    runs = []
    for leg in legs:
        records = _wandb_records(Path(leg))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
        runs.append((run.run_id, run.resume, steps))
    runs.sort(key=lambda r: r[2])  # by their steps: a leg started in the same second gets the suffix -1
    assert runs[0][0] == runs[1][0]  # ... of the same run, which `wandb sync` appends to
    assert runs[0][2] == [1, 2, 3] and runs[1][2] == [3, 4] and runs[1][1]


def test_mlflow_resume_appends_to_the_same_run(tmp_path):
    run_dir = tmp_path / "mlflow-resume"
    _two_legs(run_dir, "mlflow")
    client, run_id = _mlflow(run_dir)
    assert len(client.search_runs([client.get_experiment_by_name("alignkit").experiment_id])) == 1
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == [(1, 1.0), (2, 0.5), (3, 0.25), (3, 13.0), (4, 14.0)]  # MLflow keeps both step-3 values
    assert client.get_run(run_id).info.status == "FINISHED"


def test_trackio_resume_continues_the_named_run(tmp_path):
    from trackio.api import Api
    from trackio.sqlite_storage import SQLiteStorage

    run_dir = tmp_path / "trackio-resume"
    _two_legs(run_dir, "trackio")
    runs = [r for r in Api().runs("alignkit") if r.name == "trackio-resume"]
    assert len(runs) == 1
    steps = sorted((row["step"], row["train/loss"]) for row in SQLiteStorage.get_logs("alignkit", "trackio-resume"))
    assert steps == [(1, 1.0), (2, 0.5), (3, 0.25), (3, 13.0), (4, 14.0)]


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "backend,module",
    [("wandb", "wandb"), ("trackio", "trackio"), ("mlflow", "sqlalchemy"), ("tensorboard", "tensorboard")],
)
def test_missing_package_names_the_install_command_before_any_model_loads(
    backend, module, tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails, find_spec finds nothing

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr(loop, "setup", no_model)
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, f"train.report_to=[{backend}]")
    install = re.escape("pip install tensorboard" if backend == "tensorboard" else f'pip install "alignkit[{backend}]"')
    with pytest.raises(ConfigError, match=rf"includes {backend}, but {module} is not installed: `{install}`"):
        loop.train(cfg, progress=False)


def test_unknown_tracker_lists_the_valid_ones(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"unknown tracker 'wandbb'; valid: tensorboard, wandb, trackio, mlflow "
        r".*Did you mean `wandb`\?",
    ):
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.report_to=[tensorboard, wandbb]")
    with pytest.raises(ConfigError, match=r"`train.report_to` must be a list"):
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.report_to=wandb")
    assert _cfg(tiny_model_dir, pairs_file, tmp_path, "train.report_to=[]").train.report_to == []
    assert load_config(None, [f"data.train={pairs_file}"]).train.report_to == ["tensorboard"]


def test_old_tensorboard_key_names_report_to(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match=r"`train.tensorboard` is now `train.report_to`"):
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.tensorboard=false")
    old = tmp_path / "old.yaml"
    old.write_text(f"data: {{train: {pairs_file}}}\ntrain: {{tensorboard: true}}\n")
    with pytest.raises(ConfigError, match=r"old.yaml: `train.tensorboard` is now `train.report_to`"):
        load_config(str(old))
