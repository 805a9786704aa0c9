"""Runs a user can trust: safe trainer-state loading, no silent NaN, honest resumes, checkpoints
checked before use, errors before expensive work (issue 12)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, crash_after, toy_pairs, write_jsonl
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.train import checkpoint as ckpt
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


def _cfg(tiny_model_dir, data, tmp_path, *extra, out="run"):
    return load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / out, tmp_path / "cache")
        + ["train.learning_rate=5e-3", "train.batch_size=4", "train.warmup_ratio=0", "data.eval_fraction=0.1", *extra],
    )


def _strict_json_lines(path: Path) -> list:
    """Parse like a strict JSON parser: bare NaN / Infinity are errors."""

    def refuse(name):
        raise ValueError(f"non-JSON constant {name} in {path}")

    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines() if ln.strip()]


def _params(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


# -- trainer state: no code execution ----------------------------------------------------------


class _Payload:
    """What a crafted trainer_state.pt could carry: unpickling calls os.makedirs(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pickle_payload_in_trainer_state_is_refused_and_never_runs(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=4", "train.save_every=2")
    loop.train(cfg, progress=False)
    c = tmp_path / "run" / "checkpoint-4"
    state = torch.load(c / ckpt.STATE_FILE, weights_only=True)  # what alignkit wrote loads safely
    marker = tmp_path / "pwned"
    state["state"]["evil"] = _Payload(str(marker))
    torch.save(state, c / ckpt.STATE_FILE)
    ckpt.write_manifest(c)  # an attacker would make the manifest match too
    with pytest.raises(ckpt.CheckpointError, match="will not load it"):
        loop.train(cfg, resume=True, progress=False)
    assert not marker.exists()


def test_rng_state_round_trips_as_tensors():
    import random

    import numpy as np

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both
    state = ckpt.rng_state()
    assert all(torch.is_tensor(v) for v in state.values())
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# -- non-finite losses and gradients -----------------------------------------------------------


def test_a_huge_learning_rate_stops_the_run_and_writes_no_nan(tiny_model_dir, pairs_file, tmp_path, capsys):
    args = [
        "train",
        *base_overrides(tiny_model_dir, pairs_file, tmp_path / "run", tmp_path / "cache"),
        "train.learning_rate=1e6",
        "train.max_steps=8",
        "train.save_every=1",
        "train.batch_size=4",
        "data.eval_fraction=0.1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.on_nonfinite=stop" in err and "pairs.jsonl:" in err
    step = int(err.split("step ")[1].split(":")[0])
    assert step >= 2
    run = tmp_path / "run"
    assert not (run / "final").exists()
    names = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert names[-1] == f"checkpoint-{step - 1}"  # the last good one is kept; nothing written after it
    for name in names:
        assert all(torch.isfinite(t).all() for t in _params(run / name).values()), name
    rows = _strict_json_lines(run / "metrics.jsonl")
    assert rows[-1]["step"] == step and rows[-1]["nonfinite"] == 1
    summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["status"] == "stopped_nonfinite" and summary["steps"] == step - 1
    assert "pairs.jsonl:" in summary["message"]


def _nan_at(monkeypatch, step_call: int):
    """Make the recipe's training loss NaN on its `step_call`-th training call (1-based)."""
    from alignkit.train.recipes.dpo import PreferenceRecipe

    real, calls = PreferenceRecipe.loss, {"n": 0}

    def loss(self, model, batch, split):
        out, metrics = real(self, model, batch, split)
        if split == "train":
            calls["n"] += 1
            if calls["n"] == step_call:
                out = out * float("nan")
        return out, metrics

    monkeypatch.setattr(PreferenceRecipe, "loss", loss)


def test_the_message_names_the_micro_batch_that_broke_the_step(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 4)  # grad_accum 2: call 4 is step 2's second micro-batch
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=4", "train.grad_accum=2", "train.shuffle=false")
    with pytest.raises(loop.TrainingError) as info:
        loop.train(cfg, progress=False)
    msg = str(info.value)
    assert "step 2:" in msg and "Micro-batch 2 of 2" in msg
    # unshuffled, 36 training pairs in file order: micro-batch 4 holds the 13th to 16th training pairs
    train_lines = [ln for ln in _train_lines(tmp_path / "run")]
    assert f"pairs.jsonl:{train_lines[12]}" in msg and f"pairs.jsonl:{train_lines[15]}" in msg
    assert f"pairs.jsonl:{train_lines[11]}," not in msg


def _train_lines(run_dir: Path) -> list:
    """1-based line numbers of the training pairs (those not held out), in file order."""
    held = {s.rsplit(":", 1)[1] for s in json.loads((run_dir / "heldout.json").read_text())["sources"]}
    return [str(i) for i in range(1, 41) if str(i) not in held]


def test_skip_step_drops_the_update_and_goes_on(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3)
    cfg = _cfg(
        tiny_model_dir, pairs_file, tmp_path, "train.max_steps=5", "train.on_nonfinite=skip_step", "train.save_every=2"
    )
    result = loop.train(cfg, progress=False)
    rows = _strict_json_lines(result.run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r.get("skipped", 0) for r in train_rows] == [0, 0, 1, 0, 0]
    assert train_rows[2]["loss"] is None
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in _params(result.final_dir).values())


def test_skip_step_leaves_the_weights_of_the_skipped_step_unchanged(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3)
    cfg = _cfg(
        tiny_model_dir,
        pairs_file,
        tmp_path,
        "train.max_steps=3",
        "train.on_nonfinite=skip_step",
        "train.save_every=2",
        "train.keep_checkpoints=5",
    )
    result = loop.train(cfg, progress=False)
    before, after = _params(result.run_dir / "checkpoint-2"), _params(result.run_dir / "checkpoint-3")
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- resuming with a changed config ------------------------------------------------------------


def test_a_resume_with_changed_settings_is_refused_and_names_them(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "train.save_every=3"]
    crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *steps), progress=False)
    changed = _cfg(
        tiny_model_dir, pairs_file, tmp_path, *steps, "train.learning_rate=1e-3", "loss.beta=0.3", "train.batch_size=2"
    )
    with pytest.raises(ConfigError) as info:
        loop.train(changed, resume=True, progress=False)
    msg = str(info.value)
    for line in (
        "train.learning_rate: 0.005 -> 0.001",
        "loss.beta: 0.1 -> 0.3",
        "train.batch_size: 4 -> 2",
        "--allow-config-change",
    ):
        assert line in msg
    # a setting that only changes reporting is fine
    same = _cfg(
        tiny_model_dir,
        pairs_file,
        tmp_path,
        *steps,
        "train.log_every=2",
        "train.report_to=[]",
        "health.kl_budget=0.5",
        "train.stop_on=[grad_norm_spike]",
    )
    assert loop.train(same, resume=True, progress=False).steps == 6


def test_a_run_saved_before_keys_moved_still_resumes_and_exports(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """Configs alignkit wrote with `train.tensorboard` (now train.report_to) are read in today's
    spelling; a user's own file with the old key is still an error naming the new one."""
    import yaml

    from alignkit.train.export import export_checkpoint

    steps = ["train.max_steps=4", "train.save_every=2"]
    crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *steps), progress=False)
    saved = tmp_path / "run" / "checkpoint-2" / "alignkit_config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["train"]["report_to"]
    old["train"]["tensorboard"] = True  # as alignkit wrote it before trackers
    saved.write_text(yaml.safe_dump(old))
    (saved.parent / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(saved.parent)  # the old checkpoint was whole
    assert load_config(str(saved), saved=True).train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="`train.tensorboard` is now `train.report_to`"):
        load_config(str(saved))
    monkeypatch.undo()
    assert loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *steps), resume=True, progress=False).steps == 4
    out = export_checkpoint(tmp_path / "run" / "checkpoint-2", tmp_path / "exported")
    assert (out / "model.safetensors").is_file()


def test_allow_config_change_applies_the_new_learning_rate_and_records_it(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    steps = ["train.max_steps=6", "train.save_every=3", "train.lr_schedule=constant"]
    real = crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *steps), progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    changed = _cfg(tiny_model_dir, pairs_file, tmp_path, *steps, "train.learning_rate=1e-3")
    loop.train(changed, resume=True, allow_config_change=True, progress=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run", "train")]
    assert lrs == [5e-3] * 3 + [1e-3] * 3
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "config_changes.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 3 and rows[0]["changes"] == {"train.learning_rate": {"from": 0.005, "to": 0.001}}
    assert load_config(str(tmp_path / "run" / "config.yaml")).train.learning_rate == 1e-3


def test_raising_max_steps_with_allow_config_change_trains_on(tiny_model_dir, pairs_file, tmp_path):
    loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=3"), progress=False)
    longer = _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=5")
    with pytest.raises(ConfigError, match="train.max_steps: 3 -> 5"):
        loop.train(longer, resume=True, progress=False)
    result = loop.train(longer, resume=True, allow_config_change=True, progress=False)
    assert [r["step"] for r in read_metrics(result.run_dir, "train")] == [1, 2, 3, 4, 5]


def test_resuming_a_finished_run_changes_nothing(tiny_model_dir, pairs_file, tmp_path, capsys):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=3")
    loop.train(cfg, progress=False)
    files = {p: (tmp_path / "run" / p).read_bytes() for p in ("summary.json", "metrics.jsonl", "config.yaml")}
    capsys.readouterr()
    result = loop.train(cfg, resume=True, progress=False)
    assert "already finished at step 3" in capsys.readouterr().out
    assert {p: (tmp_path / "run" / p).read_bytes() for p in files} == files
    assert result.steps == 3 and result.train_metrics["loss"] == json.loads(files["summary.json"])["train"]["loss"]


def test_overrides_may_follow_options(tiny_model_dir, pairs_file, tmp_path, capsys):
    common = base_overrides(tiny_model_dir, pairs_file, tmp_path / "run", tmp_path / "cache")
    assert main(["train", *common, "train.max_steps=2", "train.save_every=1"]) == 0
    # after --resume, with a key that changes nothing: accepted (argparse used to reject it)
    assert main(["train", *common, "--resume", "train.max_steps=2", "train.log_every=2"]) == 0
    assert main(["train", *common, "--resume", "train.max_steps=3"]) == 2
    assert "train.max_steps: 2 -> 3" in capsys.readouterr().err
    assert main(["train", *common, "--resume", "train.max_steps=3", "--allow-config-change"]) == 0


# -- errors before expensive work --------------------------------------------------------------


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.learning_rate=-1e-5", "train.learning_rate` must be a positive number"),
        ("train.adam_betas=[0.9, 1.5]", "train.adam_betas"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("lora.r=0", "lora.r"),
    ],
)
def test_bad_numbers_fail_when_the_config_loads(override, match, tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match=match):
        _cfg(tiny_model_dir, pairs_file, tmp_path, override)


def test_an_output_dir_that_is_a_file_fails_before_the_model_loads(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    (tmp_path / "taken").write_text("not a directory")
    monkeypatch.setattr(loop, "setup", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, out="taken"), progress=False)
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, out="taken/run"), progress=False)


# -- damaged checkpoints -----------------------------------------------------------------------


def _two_checkpoints(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3"]
    real = crash_after(monkeypatch, 4)
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, *steps)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    return cfg


@pytest.mark.parametrize("damage", ["truncate_weights", "truncate_state", "delete_state", "no_manifest"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_offered(
    damage, tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    cfg = _two_checkpoints(tiny_model_dir, pairs_file, tmp_path, monkeypatch)
    c = tmp_path / "run" / "checkpoint-4"
    if damage == "truncate_weights":
        data = (c / "model.safetensors").read_bytes()
        (c / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncate_state":
        data = (c / ckpt.STATE_FILE).read_bytes()
        (c / ckpt.STATE_FILE).write_bytes(data[:100])
    elif damage == "delete_state":
        (c / ckpt.STATE_FILE).unlink()
    else:
        (c / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError) as info:
        loop.train(cfg, resume=True, progress=False)
    msg = str(info.value)
    assert "checkpoint-4 is damaged" in msg and "--resume-from checkpoint-2" in msg
    result = loop.train(cfg, resume_from="checkpoint-2", progress=False)
    assert result.steps == 6 and (result.final_dir / "model.safetensors").is_file()


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    full = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=6", out="full"), progress=False)
    cfg = _two_checkpoints(tiny_model_dir, pairs_file, tmp_path, monkeypatch)
    loop.train(cfg, resume_from=str(tmp_path / "run" / "checkpoint-2"), progress=False)
    a, b = _params(full.final_dir), _params(tmp_path / "run" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint.*checkpoint-2, checkpoint-4, checkpoint-6"):
        loop.train(cfg, resume_from="checkpoint-9", progress=False)


def test_leftovers_of_interrupted_writes_are_removed(tiny_model_dir, pairs_file, tmp_path, capsys):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=2", "train.save_every=1")
    loop.train(cfg, progress=False)
    run = tmp_path / "run"
    (run / ".checkpoint-3.tmp-abc123").mkdir()
    (run / ".checkpoint-3.tmp-abc123" / "model.safetensors").write_text("half")
    os.replace(run / "final", run / ".final.old-999")  # killed between atomic_dir's two renames
    capsys.readouterr()
    for_resume = _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=2", "train.save_every=1")
    loop.train(for_resume, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "removed .checkpoint-3.tmp-abc123" in out and "restored final from .final.old-999" in out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert (run / "final" / "model.safetensors").is_file()


# -- a real SIGKILL during a checkpoint write ----------------------------------------------------

_KILL_SCRIPT = r"""
import os, signal, sys
from alignkit.config import load_config
from alignkit.train import checkpoint as ckpt, loop

cfg = load_config(None, sys.argv[2:])
kill_at = int(sys.argv[1])
real = ckpt.write_manifest

def write_manifest(directory):
    # the weights and trainer state of checkpoint `kill_at` are on disk, its manifest is not
    if directory.name.startswith(f".checkpoint-{kill_at}.tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(directory)

ckpt.write_manifest = write_manifest
loop.train(cfg, resume="--resume" in os.environ.get("ALIGNKIT_TEST_RESUME", ""), progress=False)
"""


def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(tiny_model_dir, pairs_file, tmp_path):
    args = base_overrides(tiny_model_dir, pairs_file, tmp_path / "run", tmp_path / "cache") + [
        "train.learning_rate=5e-3",
        "train.batch_size=4",
        "train.warmup_ratio=0",
        "train.max_steps=6",
        "train.save_every=2",
        "data.eval_fraction=0.1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, "4", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-2"]
    assert any(p.name.startswith(".checkpoint-4.tmp-") for p in run.iterdir())
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, "0", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(env, ALIGNKIT_TEST_RESUME="--resume"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removed .checkpoint-4.tmp-" in proc.stdout
    full = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, "0", *args[:-4], f"output_dir={tmp_path / 'full'}", *args[-3:]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert full.returncode == 0, full.stderr[-2000:]
    a, b = _params(tmp_path / "full" / "final"), _params(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical


# -- online runs: exact resume inside an iterations cycle, BCO's shift carried --------------------

REWARD = """
def yes_share(prompts, completions, **columns):
    return [c.split().count("yes") / max(1, len(c.split())) for c in completions]

def chars(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]  # varies between samples: every group makes a pair
"""


def _online_cfg(tiny_model_dir, tmp_path, recipe, *extra, out="run", reward="yes_share"):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_pairs(24)])
    fn = tmp_path / "rewards.py"
    fn.write_text(REWARD)
    return load_config(
        None,
        base_overrides(tiny_model_dir, prompts, tmp_path / out, tmp_path / "cache")
        + [
            f"recipe={recipe}",
            f"online.rewards={fn}:{reward}",
            "generation.num_samples=4",
            "generation.max_new_tokens=6",
            "train.batch_size=2",
            "train.warmup_ratio=0",
            "train.learning_rate=3e-2",
            "data.eval_fraction=0",
            *extra,
        ],
    )


def test_grpo_resumed_between_two_updates_of_a_rollout_is_exact(tiny_model_dir, tmp_path, monkeypatch):
    extra = ["online.iterations=2", "train.max_steps=6", "train.save_every=3", "train.lr_schedule=constant"]
    full = loop.train(_online_cfg(tiny_model_dir, tmp_path, "grpo", *extra, out="full", reward="chars"), progress=False)
    real = crash_after(monkeypatch, 3)  # step 3 is the first of two updates on its rollout
    cfg = _online_cfg(tiny_model_dir, tmp_path, "grpo", *extra, reward="chars")
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    resumed = loop.train(cfg, resume=True, progress=False)
    a, b = _params(full.final_dir), _params(resumed.final_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    rows = read_metrics(resumed.run_dir, "train")
    assert rows[3]["time/generation_s"] == 0  # step 4 reused step 3's samples


def test_iterations_with_grad_accum_reuse_every_micro_batch(tiny_model_dir, tmp_path):
    cfg = _online_cfg(
        tiny_model_dir,
        tmp_path,
        "grpo",
        "online.iterations=2",
        "train.grad_accum=2",
        "train.max_steps=4",
        reward="chars",
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert [r["time/generation_s"] > 0 for r in rows] == [True, False, True, False]
    assert all(r["ratio_mean"] != 1.0 for r in rows[1::2])


def test_online_dpo_carries_bco_reward_shift_and_resumes_it(tiny_model_dir, tmp_path, monkeypatch):
    extra = ["loss.name=bco_pair", "train.max_steps=4", "train.save_every=2"]
    full = loop.train(
        _online_cfg(tiny_model_dir, tmp_path, "online_dpo", *extra, out="full", reward="chars"), progress=False
    )
    state = torch.load(full.run_dir / "checkpoint-4" / ckpt.STATE_FILE, weights_only=True)
    shift = state["recipe"]["reward_shift"]
    assert shift["count"] > 0 and shift["total"] != 0
    real = crash_after(monkeypatch, 2)
    cfg = _online_cfg(tiny_model_dir, tmp_path, "online_dpo", *extra, reward="chars")
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    resumed = loop.train(cfg, resume=True, progress=False)
    state2 = torch.load(resumed.run_dir / "checkpoint-4" / ckpt.STATE_FILE, weights_only=True)
    assert state2["recipe"]["reward_shift"] == pytest.approx(shift)
    a, b = _params(full.final_dir), _params(resumed.final_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_a_shared_checkpoint_never_turns_on_remote_code_by_itself(tiny_model_dir, pairs_file, tmp_path, capsys):
    """A checkpoint from someone else whose saved config says model.trust_remote_code=true is not
    exported (which would run the model repository's code) unless the user says so."""
    import yaml

    loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=2", "train.save_every=2"), progress=False)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = checkpoint / "alignkit_config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    cfg["model"]["trust_remote_code"] = True
    saved.write_text(yaml.safe_dump(cfg))
    (checkpoint / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(checkpoint)
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code=true" in err and "--trust-remote-code" in err and not (tmp_path / "out").exists()
    assert main(["export", str(checkpoint), str(tmp_path / "out"), "--trust-remote-code"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
