"""Many processes (torchrun, FSDP2, gloo on the 2 CPU cores) train what one process trains.

Each recipe runs on 2 processes with train.batch_size B and on 1 process with 2B, from the same
tiny model and data: the losses of every step and the final parameters agree within 1e-5
(float32; the two runs add the same numbers in another order). Also: sharded checkpoints resume
exactly at the same scale and continue at another, `final/` is one consolidated directory, a
failure on one process ends the job with a clear message, and two "nodes" join one rendezvous.

The 2-process runs of the parity tests share one torchrun job (`dist_driver.py`): starting a
process (importing torch and transformers) costs more than a tiny run.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DRIVER, base_overrides, torchrun, toy_pairs, write_jsonl
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

REWARD = """
def chars(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]
"""


def _data(root: Path) -> dict:
    rows = toy_pairs(40)
    files = {
        "pairs": write_jsonl(root / "pairs.jsonl", rows),
        "sft": write_jsonl(root / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]),
        "unpaired": write_jsonl(
            root / "unpaired.jsonl",
            [
                {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
                for i, r in enumerate(rows)
            ],
        ),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows]),
    }
    (root / "rewards.py").write_text(REWARD)
    return files


# name -> (data file, overrides); batch sizes are added per scale
RECIPES = {  # the parity runs
    "sft": ("sft", ["recipe=sft", "train.learning_rate=1e-2"]),
    "dpo": ("pairs", ["recipe=dpo"]),
    "dpo_live": ("pairs", ["recipe=dpo", "reference=live"]),
    "dpo_lora": ("pairs", ["recipe=dpo", "lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2"]),
    # QLoRA: both scales dequantize the same 4-bit base (the scaler blocks do not depend on the
    # process count), so the usual 1e-5 holds
    "dpo_qlora": (
        "pairs",
        ["recipe=dpo", "lora.enabled=true", "lora.r=4", "model.quantization=nf4", "train.learning_rate=1e-2"],
    ),
    "dpo_qlora_int8": (  # an int8 base is replicated, not sharded (FSDP2 cannot split torchao's int8 tensor)
        "pairs",
        ["recipe=dpo", "lora.enabled=true", "lora.r=4", "model.quantization=int8", "train.learning_rate=1e-2"],
    ),
    "kto": ("unpaired", ["recipe=unpaired", "loss.name=kto"]),
    "reward": ("pairs", ["recipe=reward"]),
    "reward_head": ("pairs", ["recipe=reward", "model.freeze_layers=2", "train.learning_rate=5e-2"]),  # head only
    # ODIN's correlations over every process's micro-batch (each process's replies differentiable
    # on it alone), so 2 processes of 2 pairs train what 1 process of 4 trains; head only, over
    # every training reply
    "reward_odin": ("pairs", ["recipe=reward", "reward.disentangle=length"]),
    "reward_odin_head": (
        "pairs",
        ["recipe=reward", "reward.disentangle=length", "model.freeze_layers=2", "train.learning_rate=5e-2"],
    ),
    "dpo_checkpointing": ("pairs", ["recipe=dpo", "model.gradient_checkpointing=true"]),
    "grpo": ("prompts", ["recipe=grpo", "online.kl_coef=0.05"]),
    "rloo": ("prompts", ["recipe=rloo"]),
    "ppo": ("prompts", ["recipe=ppo", "ppo.epochs=2", "ppo.minibatches=1", "online.kl_coef=0.05"]),
}
ONLINE = ("grpo", "rloo", "ppo")


def _args(name: str, model_dir, root: Path, out: Path, batch: int) -> list:
    data, extra = RECIPES[name]
    args = base_overrides(model_dir, root / f"{data}.jsonl", out, root / "cache") + [
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0",
        "data.eval_fraction=0.1",
        "train.max_steps=4",
        f"train.batch_size={batch}",
        "train.shuffle=true",
        "train.log_every=1",
        *extra,
    ]
    if name in ONLINE:
        args += [
            f"online.rewards={root / 'rewards.py'}:chars",
            "generation.num_samples=4",
            "generation.max_new_tokens=6",
            "data.eval_fraction=0.1",
        ]
    return args


@pytest.fixture(scope="module")
def two_process_runs(tiny_model_dir, tmp_path_factory):
    """Every recipe of RECIPES trained on 2 processes (batch 2 each), in one torchrun job."""
    root = tmp_path_factory.mktemp("dist")
    _data(root)
    runs = [{"argv": ["train", *_args(name, tiny_model_dir, root, root / f"{name}-2", 2)]} for name in RECIPES]
    start = time.perf_counter()
    proc = torchrun(runs, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    seconds = time.perf_counter() - start
    # what the 2-process job cached, before any 1-process run of the tests adds to root/cache
    shutil.copytree(root / "cache" / "reference", root / "two-process-cache" / "reference")
    return root, proc, seconds


def _params(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_processes_train_what_one_process_trains(name, two_process_runs, tiny_model_dir):
    root, _, _ = two_process_runs
    one = loop.train(load_config(None, _args(name, tiny_model_dir, root, root / f"{name}-1", 4)), progress=False)
    a, b = read_metrics(one.run_dir, "train"), read_metrics(root / f"{name}-2", "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), (ra["step"], ra["loss"], rb["loss"])
        assert rb["tokens"] == ra["tokens"]  # the same examples in each global step
        if name in ONLINE:
            assert rb["reward"] == pytest.approx(ra["reward"], abs=1e-6)  # the same samples, the same groups
    pa, pb = _params(one.final_dir), _params(root / f"{name}-2" / "final")
    assert pa.keys() == pb.keys()  # final/ is one consolidated directory (LoRA merged)
    # ODIN: the gathered replies come in another order ([chosen, rejected] of each process), so
    # the correlations' float32 sums differ in the last bits, and its steep first steps (gradient
    # norm 97, clipped) carry that to 1.02e-5 in the weights (measured; each process's micro-batch
    # alone instead: losses 1.317 against 1.086 at step 1)
    tol = 1e-4 if name == "reward_odin" else 1e-5
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < tol
    if name == "ppo":
        va, vb = _params(one.run_dir / "final_value"), _params(root / f"{name}-2" / "final_value")
        assert max(float((va[k] - vb[k]).abs().max()) for k in va) < 1e-5  # the critic, sharded like the policy


def test_only_the_main_process_speaks(two_process_runs):
    _, proc, _ = two_process_runs
    assert proc.stdout.count("alignkit: loaded 40 examples from") == len(RECIPES)  # once per run, not per process
    assert proc.stdout.count("alignkit: done after 4 steps") == len(RECIPES)
    assert "process 1" not in proc.stderr


def test_the_reference_cache_made_by_two_processes_serves_one(two_process_runs, tiny_model_dir, capsys):
    """The 2-process DPO run wrote the cache under the key one process uses: a 1-process run given
    only what the 2-process job cached (a directory of its own) finds it."""
    root, _, _ = two_process_runs
    own = root / "two-process-cache"
    loop.train(
        load_config(None, _args("dpo", tiny_model_dir, root, root / "dpo-cache-check", 4) + [f"cache_dir={own}"]),
        progress=False,
    )
    out = capsys.readouterr().out
    assert f"reference log-probs (train): reusing cache {own}" in out, out


def _dpo_args(model_dir, root: Path, out: str, *extra) -> list:
    # a constant learning rate: a run extended with --allow-config-change keeps the schedule it had
    return _args("dpo", model_dir, root, root / out, 2) + [
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_checkpoints=5",
        "train.lr_schedule=constant",
        *extra,
    ]


@pytest.fixture(scope="module")
def full_dpo(tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (`_dpo_args`) that the kill-and-resume tests end where."""
    root = tmp_path_factory.mktemp("full_dpo")
    _data(root)
    full = torchrun([{"argv": ["train", *_dpo_args(tiny_model_dir, root, "full")]}], root)
    assert full.returncode == 0, full.stderr[-4000:]
    return root / "full"


def test_a_killed_process_ends_the_job_and_a_resume_at_the_same_scale_is_exact(full_dpo, tiny_model_dir, tmp_path):
    _data(tmp_path)
    start = time.perf_counter()
    killed = torchrun(
        [{"argv": ["train", *_dpo_args(tiny_model_dir, tmp_path, "run")], "kill_rank": 1, "kill_after_save": 4}],
        tmp_path,
    )
    assert killed.returncode != 0 and time.perf_counter() - start < 120  # torchrun tore the job down
    run = tmp_path / "run"
    assert (run / "checkpoint-4" / "dcp").is_dir() and not (run / "final").exists()
    resumed = torchrun([{"argv": ["train", *_dpo_args(tiny_model_dir, tmp_path, "run"), "--resume"]}], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    a, b = _params(full_dpo / "final"), _params(run / "final")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_resume_at_another_scale_keeps_the_global_batch(full_dpo, tiny_model_dir, tmp_path):
    """2 -> 1: the 1-process resume takes 2 micro-batches per step (grad_accum 2) and ends where the
    2-process run ends; 1 -> 2 likewise."""
    _data(tmp_path)
    killed = torchrun(
        [{"argv": ["train", *_dpo_args(tiny_model_dir, tmp_path, "two-to-one")], "kill_rank": 0, "kill_after_save": 2}],
        tmp_path,
    )
    assert killed.returncode != 0
    cfg = load_config(None, _dpo_args(tiny_model_dir, tmp_path, "two-to-one"))
    result = loop.train(cfg, resume=True, progress=False)
    assert result.steps == 6
    a, b = _params(full_dpo / "final"), _params(tmp_path / "two-to-one" / "final")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    rows = read_metrics(tmp_path / "two-to-one", "train")
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in read_metrics(full_dpo, "train")]
    # one process with grad_accum 2 writes a checkpoint that two processes resume (1 -> 2)
    one = load_config(
        None, _dpo_args(tiny_model_dir, tmp_path, "one-to-two", "train.grad_accum=2", "train.max_steps=2")
    )
    loop.train(one, progress=False)
    longer = _dpo_args(tiny_model_dir, tmp_path, "one-to-two", "train.grad_accum=2", "train.max_steps=6")
    cont = torchrun([{"argv": ["train", *longer, "--resume", "--allow-config-change"]}], tmp_path)
    assert cont.returncode == 0, cont.stderr[-4000:]
    assert "train.grad_accum becomes 1" in cont.stdout
    c = _params(tmp_path / "one-to-two" / "final")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-5


def test_export_turns_a_sharded_checkpoint_into_a_model_directory(two_process_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignkit.cli import main

    root, _, _ = two_process_runs
    for run in ("dpo_lora-2", "dpo_qlora-2"):
        ckpt = root / run / "checkpoint-4"
        assert (ckpt / "dcp").is_dir()
        assert main(["export", str(ckpt), str(tmp_path / run)]) == 0
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / run).state_dict()
        final = _params(root / run / "final")
        assert max(float((exported[k] - final[k]).abs().max()) for k in final) < 1e-6  # LoRA merged, same weights


def test_a_lora_checkpoint_holds_adapters_and_optimizer_state_only(two_process_runs):
    import torch.distributed.checkpoint as dcp

    root, _, _ = two_process_runs
    for run in ("dpo_lora-2", "dpo_qlora-2"):
        keys = dcp.FileSystemReader(str(root / run / "checkpoint-4" / "dcp")).read_metadata().state_dict_metadata
        weights = [k for k in keys if k.startswith("policy.model.")]
        assert weights and all("lora_" in k for k in weights), weights[:3]  # no frozen base weight


def test_an_error_on_one_process_ends_every_process_with_its_message(tiny_model_dir, tmp_path):
    """A reward that fails on one prompt only: the process that samples it stops with a clear
    message, and torchrun ends the other one, which was waiting for it."""
    _data(tmp_path)
    (tmp_path / "picky.py").write_text(
        "def picky(prompts, completions, **columns):\n"
        "    if any('9 plus 9' in str(p) for p in prompts):\n"
        "        raise ValueError('cannot score a prompt about 9 plus 9')\n"
        "    return [1.0 for _ in completions]\n"
    )
    rows = [{"prompt": f"what is {a} plus {b} ?"} for a, b in [(1, 2), (3, 4), (5, 6), (9, 9)] * 4]
    write_jsonl(tmp_path / "picky.jsonl", rows)
    args = base_overrides(tiny_model_dir, tmp_path / "picky.jsonl", tmp_path / "run", tmp_path / "cache") + [
        "recipe=grpo",
        f"online.rewards={tmp_path / 'picky.py'}:picky",
        "generation.num_samples=2",
        "generation.max_new_tokens=4",
        "train.batch_size=2",
        "train.shuffle=false",
        "data.eval_fraction=0",
        "train.max_steps=4",
    ]
    start = time.perf_counter()
    proc = torchrun([{"argv": ["train", *args]}], tmp_path)
    assert proc.returncode != 0 and time.perf_counter() - start < 120
    assert "cannot score a prompt about 9 plus 9" in proc.stderr and "process 1 failed" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "x"\n')
    proc = torchrun(
        [{"argv": ["train", *base_overrides(tiny_model_dir, bad, tmp_path / "r2", tmp_path / "cache")]}], tmp_path
    )
    assert proc.returncode != 0 and "bad.jsonl:2" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nproc_per_node_starts_torchrun_and_leaves_no_log_directory(tiny_model_dir, tmp_path):
    """`alignkit train --nproc-per-node 2` (docs/scaling.md) trains on 2 processes; torchrun's log
    directory, which it makes in the temporary directory for every job and leaves, is removed."""
    _data(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = _args("dpo", tiny_model_dir, tmp_path, tmp_path / "np", 2) + ["train.max_steps=2", "train.save_every=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "train", "--nproc-per-node", "2", *args],
        env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in proc.stdout
    state = json.loads((tmp_path / "np" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and (tmp_path / "np" / "final" / "model.safetensors").is_file()
    left = [p.name for p in tmp.iterdir() if p.name.startswith(("torchelastic_", "alignkit-torchrun-"))]
    assert left == []


def test_two_nodes_on_one_machine_join_one_rendezvous(tiny_model_dir, tmp_path):
    """Two torchrun launches, one process each, as two machines would run them (--nnodes 2)."""
    _data(tmp_path)
    port = _free_port()
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps([{"argv": ["train", *_args("dpo", tiny_model_dir, tmp_path, tmp_path / "nodes", 2)]}]))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={r}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=alignkit-test",
                f"--log-dir={tmp_path / f'torchrun-{r}'}",
                str(DRIVER),
                str(runs),
            ],
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    one = loop.train(load_config(None, _args("dpo", tiny_model_dir, tmp_path, tmp_path / "single", 4)), progress=False)
    a, b = _params(one.final_dir), _params(tmp_path / "nodes" / "final")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_eval_splits_its_log_prob_passes_over_processes(two_process_runs, tmp_path):
    """`alignkit eval --run` of the 2-process DPO run, on 2 processes and on 1: the same numbers
    (the sharded checkpoint is assembled for the checkpoint pass)."""
    from alignkit.cli import main

    root, _, _ = two_process_runs
    run = tmp_path / "dpo-2"
    shutil.copytree(root / "dpo-2", run)
    proc = torchrun(
        [{"argv": ["eval", "--run", str(run), "--no-progress", "--no-report", "--output-dir", str(tmp_path / "two")]}],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main(["eval", "--run", str(run), "--no-progress", "--no-report", "--output-dir", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert two["pair_sources"] == one["pair_sources"] and two["n_pairs"] == 4
    for key in ("ranking_accuracy", "implicit_reward_accuracy", "implicit_margin"):
        assert two["preference"][key]["value"] == pytest.approx(one["preference"][key]["value"], abs=1e-6)
    assert [c["step"] for c in two["checkpoints"]] == [4]
    assert two["checkpoints"][0]["chosen_logp_change"] == pytest.approx(
        one["checkpoints"][0]["chosen_logp_change"], abs=1e-5
    )


def test_a_process_dead_in_a_sharded_write_loses_only_that_checkpoint(full_dpo, tiny_model_dir, tmp_path):
    """Process 1 dies while the shards of checkpoint-4 are written: checkpoint-2 is the last whole
    one, the half-written directory is removed on resume, and the run ends where it would have."""
    from alignkit.train import checkpoint as ckpt

    _data(tmp_path)
    killed = torchrun(
        [{"argv": ["train", *_dpo_args(tiny_model_dir, tmp_path, "run")], "kill_rank": 1, "kill_in_write": 4}], tmp_path
    )
    assert killed.returncode != 0
    run = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-2"]
    # the surviving process's collective fails and it removes the half-written directory; if it
    # could not (killed outright), the resume does
    left = any(p.name.startswith(".checkpoint-4.tmp-") for p in run.iterdir())
    resumed = torchrun([{"argv": ["train", *_dpo_args(tiny_model_dir, tmp_path, "run"), "--resume"]}], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "checkpoint-2 at step 2" in resumed.stdout and (not left or "removed .checkpoint-4.tmp-" in resumed.stdout)
    assert not any(p.name.startswith(".checkpoint-") for p in run.iterdir())
    a, b = _params(full_dpo / "final"), _params(run / "final")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_a_damaged_shard_is_named_and_an_earlier_checkpoint_offered(two_process_runs, tiny_model_dir, tmp_path):
    """The manifest covers a sharded checkpoint's DCP files too: a truncated shard stops the resume
    with the checkpoint's name, and --resume-from takes the previous one."""
    import shutil

    from alignkit.train import checkpoint as ckpt

    _data(tmp_path)
    args = _dpo_args(tiny_model_dir, tmp_path, "run")
    done = torchrun([{"argv": ["train", *args]}], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()  # as if stopped after checkpoint-6
    shard = sorted((run / "checkpoint-6" / "dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"checkpoint-6 is damaged: dcp/__\d_0\.distcp has 100 bytes.*"
        r"--resume-from checkpoint-4",
    ):
        loop.train(load_config(None, args), resume=True, progress=False)
    result = loop.train(load_config(None, args), resume_from="checkpoint-4", progress=False)  # 1 process now
    assert result.steps == 6 and (run / "final" / "model.safetensors").is_file()


def test_one_gpu_process_binds_an_indexed_device(monkeypatch):
    """torchrun with one process and dist.strategy=fsdp on "cuda": torch refuses a device_id without
    an index, so the group is joined on cuda:LOCAL_RANK, and with gloo beside NCCL, which refuses CPU
    tensors (the GPU check found both; CI has no GPU, so the calls into CUDA and NCCL are recorded
    here instead of made)."""
    import torch
    import torch.distributed as tdist

    from alignkit.config import DistConfig
    from alignkit.distributed import Dist

    calls = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **k: calls.update(backend=backend, **k))
    dist = Dist.from_env(DistConfig(strategy="fsdp"), torch.device("cuda"), "bf16")
    assert calls["backend"] == "cpu:gloo,cuda:nccl"  # CPU tensors too (the loop sums batch weights on CPU)
    assert calls["device_id"] == torch.device("cuda", 0) and calls["set_device"] == torch.device("cuda", 0)
    assert dist.enabled and dist.strategy == "fsdp" and dist.mixed_precision
