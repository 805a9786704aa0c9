"""Faults that lose nothing (issue 15), for every recipe.

- SIGKILL: a training process is killed with SIGKILL in the middle of a step chosen here (after the
  optimizer step of step 5 is applied in memory, before anything of it is written), then resumed
  from its last checkpoint (step 4); the final parameters equal the uninterrupted run within 1e-6.
- A full disk: every file of a checkpoint write, in turn, fails with `OSError: [Errno 28] No space
  left on device`; the previous checkpoint stays intact and usable and the error says what happened.

docs/faults.md lists every case and its result.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import base_overrides, toy_pairs, write_jsonl
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.train import loop

MASKED = {
    "prompt": "what is 2 plus 3 ?",
    "chosen_sentences": [{"text": "the answer is 5 .", "correct": True}, {"text": " sky is red .", "correct": False}],
    "rejected_sentences": [{"text": "the answer is 6 .", "correct": False}],
}
REWARDS = """
def chars(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]
"""


def _data(root: Path) -> None:
    rows = toy_pairs(40)
    write_jsonl(root / "pairs.jsonl", rows)
    write_jsonl(root / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    write_jsonl(
        root / "unpaired.jsonl",
        [
            {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
            for i, r in enumerate(rows)
        ],
    )
    write_jsonl(root / "masked.jsonl", [MASKED] * 24)
    write_jsonl(root / "negative.jsonl", [{"prompt": r["prompt"], "rejected": r["rejected"]} for r in rows[:24]])
    write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    (root / "rewards.py").write_text(REWARDS)


ONLINE = ["generation.num_samples=4", "generation.max_new_tokens=6", "train.batch_size=2"]
CASES = {  # name -> (data file, overrides)
    "sft": ("sft", ["recipe=sft"]),
    "dpo": ("pairs", ["recipe=dpo"]),
    "dpo_lora": ("pairs", ["recipe=dpo", "lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2"]),
    "dpo_qlora": (
        "pairs",
        ["recipe=dpo", "lora.enabled=true", "lora.r=4", "model.quantization=nf4", "train.learning_rate=1e-2"],
    ),
    "dpo_qlora_int8": (
        "pairs",
        ["recipe=dpo", "lora.enabled=true", "lora.r=4", "model.quantization=int8", "train.learning_rate=1e-2"],
    ),
    "kto": ("unpaired", ["recipe=unpaired", "loss.name=kto"]),
    "bco": ("unpaired", ["recipe=unpaired", "loss.name=bco"]),
    "masked": ("masked", ["recipe=masked"]),
    "negative": ("negative", ["recipe=negative", "generation.num_samples=2", "generation.max_new_tokens=4"]),
    "reward": ("pairs", ["recipe=reward"]),
    "reward_head": ("pairs", ["recipe=reward", "model.freeze_layers=2", "train.learning_rate=5e-2"]),
    "reward_lora": ("pairs", ["recipe=reward", "lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2"]),
    "grpo": ("prompts", ["recipe=grpo", "online.kl_coef=0.05", "online.iterations=2", *ONLINE]),
    "grpo_lora": ("prompts", ["recipe=grpo", "lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2", *ONLINE]),
    "grpo_qlora": (
        "prompts",
        ["recipe=grpo", "lora.enabled=true", "lora.r=4", "model.quantization=nf4", "train.learning_rate=1e-2", *ONLINE],
    ),
    "rloo": ("prompts", ["recipe=rloo", *ONLINE]),
    "online_dpo": ("prompts", ["recipe=online_dpo", *ONLINE]),
    "raft": ("prompts", ["recipe=raft", *ONLINE]),
    "ppo": ("prompts", ["recipe=ppo", "ppo.epochs=2", "ppo.minibatches=2", "online.kl_coef=0.05", *ONLINE]),
    "reinforce_pp": ("prompts", ["recipe=reinforce_pp", "online.kl_coef=0.05", *ONLINE]),
    "grpo_dapo": (
        "prompts",
        [
            "recipe=grpo",
            "loss.name=cispo",
            "online.dynamic_sampling=true",
            "online.overlong_buffer=3",
            "online.aggregation=dapo",
            *ONLINE,
        ],
    ),
}
KILL_AFTER_STEP = 5  # killed once step 5's update is applied, before any of it is saved; resumed from step 4


def _args(name: str, model_dir, root: Path, out: str) -> list:
    data, extra = CASES[name]
    args = base_overrides(model_dir, root / f"{data}.jsonl", root / out, root / "cache") + [
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0",
        "train.batch_size=4",
        "data.eval_fraction=0.1",
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_checkpoints=3",
        *extra,
    ]
    if data == "prompts":
        args.append(f"online.rewards={root / 'rewards.py'}:chars")
    return args


_KILL = r"""
import os, signal, sys
from alignkit.cli import main
from alignkit.train import modules

kill_after, module_steps = int(sys.argv[1]), {"n": 0}
real_step = modules.TrainedModule.step

def step(self, apply):
    real_step(self, apply)
    if self.name == "policy":
        module_steps["n"] += 1
        if module_steps["n"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler runs

modules.TrainedModule.step = step
sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def fault_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    _data(root)
    return root


def _params(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", list(CASES))
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(name, fault_root, tiny_model_dir):
    full = loop.train(load_config(None, _args(name, tiny_model_dir, fault_root, f"{name}-full")), progress=False)
    args = _args(name, tiny_model_dir, fault_root, f"{name}-killed")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL, str(KILL_AFTER_STEP), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = fault_root / f"{name}-killed"
    assert (run / "checkpoint-4").is_dir() and not (run / "checkpoint-6").exists()
    resumed = loop.train(load_config(None, args), resume=True, progress=False)
    assert _max_diff(_params(full.final_dir), _params(resumed.final_dir)) < 1e-6
    if name == "ppo":
        assert _max_diff(_params(full.run_dir / "final_value"), _params(resumed.run_dir / "final_value")) < 1e-6


# -- a full disk -------------------------------------------------------------------------------

_DISK_FULL = r"""
import errno, json, os, sys
from pathlib import Path

import safetensors.torch, torch, transformers.modeling_utils
from alignkit.config import load_config
from alignkit.train import checkpoint as ckpt, loop

fail = {"at": None, "seen": 0, "names": []}

def writing(path) -> None:
    # every file a checkpoint write creates passes here: fail the n-th one with ENOSPC
    path = str(path)
    if ".checkpoint-" not in path or ".tmp-" not in path:
        return
    fail["seen"] += 1
    fail["names"].append(os.path.basename(path))
    if fail["seen"] == fail["at"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

def audit(event, args):
    if event == "open" and args[0] is not None and isinstance(args[1], str) and any(m in args[1] for m in "wax+"):
        writing(args[0])
    elif event == "os.open" and args[2] is not None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        writing(args[0])

sys.addaudithook(audit)  # files Python opens; the writers in C++ and Rust are wrapped below
import transformers.tokenization_utils_tokenizers as fast_tokenizers
for cls in [c for c in vars(fast_tokenizers).values() if isinstance(c, type) and "_save_pretrained" in vars(c)]:
    real_save = cls._save_pretrained
    def save_pretrained(self, save_directory, *a, _real=real_save, **k):
        writing(os.path.join(str(save_directory), "tokenizer.json"))  # written by the Rust tokenizer
        return _real(self, save_directory, *a, **k)
    cls._save_pretrained = save_pretrained
for module, name in ((torch, "save"), (safetensors.torch, "save_file"),
                     (transformers.modeling_utils, "safe_save_file")):
    real = getattr(module, name)
    def patched(*a, _real=real, **k):
        target = a[1] if len(a) > 1 else k.get("filename", k.get("f"))
        writing(target)
        return _real(*a, **k)
    setattr(module, name, patched)

cfg = load_config(None, sys.argv[1:])
loop.train(cfg, progress=False)  # a run with checkpoints at steps 2 and 4 and final/
run = Path(cfg.output_dir)
first = ckpt.list_checkpoints(run)[-1]
fail["at"], fail["seen"], fail["names"] = None, 0, []
longer = load_config(None, sys.argv[1:] + ["train.max_steps=6"])
loop.train(longer, resume=True, allow_config_change=True, progress=False)  # count the files of one write
files_in_a_write, results = fail["seen"], []
import shutil
for n in range(1, files_in_a_write + 1):
    shutil.rmtree(run / "checkpoint-6", ignore_errors=True)  # resume from checkpoint-4 each time
    fail["at"], fail["seen"], fail["names"] = n, 0, []
    try:
        loop.train(longer, resume=True, allow_config_change=True, progress=False)
        outcome = "no error"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    leftovers = sorted(p.name for p in run.iterdir() if ".tmp-" in p.name)
    results.append({"file": fail["names"][-1] if fail["names"] else None, "error": outcome,
                    "previous_intact": ckpt.verify(first) is None, "leftovers": leftovers})
fail["at"] = None
final = loop.train(longer, resume=True, allow_config_change=True, progress=False)
print("RESULTS " + json.dumps({"results": results, "resumed_steps": final.steps}))
"""


def test_a_full_disk_at_any_file_of_a_checkpoint_write_keeps_the_previous_one(tiny_model_dir, tmp_path):
    _data(tmp_path)
    args = base_overrides(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "run", tmp_path / "cache") + [
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_checkpoints=5",
        "data.eval_fraction=0.1",
        "train.lr_schedule=constant",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    results = report["results"]
    files = {r["file"] for r in results}
    for expected in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "alignkit_config.yaml",
        "trainer_state.pt",
        "trainer_state.json",
        "manifest.json",
    ):
        assert expected in files, (expected, files)
    for r in results:
        assert "No space left on device" in r["error"] and "checkpoint" in r["error"], r
        assert r["previous_intact"] and r["leftovers"] == [], r
    assert report["resumed_steps"] == 6  # the run then goes on from the intact checkpoint
