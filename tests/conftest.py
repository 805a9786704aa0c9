import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.testing import save_tiny_model_dir

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_pairs(n: int = 40, seed: int = 0) -> list:
    """Arithmetic prompts; chosen gives the sum, rejected refuses. Words are in the tiny vocab."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "prompt": f"what is {a} plus {b} ?",
                "chosen": f"the answer is {a + b} .",
                "rejected": "sorry i cannot help .",
            }
        )
    return rows


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", toy_pairs())


@pytest.fixture
def sft_file(tmp_path) -> Path:
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in toy_pairs()]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def base_overrides(model_dir, data, out, cache) -> list:
    return [
        f"model.name_or_path={model_dir}",
        f"data.train={data}",
        f"output_dir={out}",
        f"cache_dir={cache}",
        "train.report_to=[]",
    ]


# Under pytest-xdist (`make test` runs two workers) each worker and the processes its tests start use
# one thread: two torch processes with two threads each on two cores run several times slower.
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1 if XDIST else 2)


def crash_after(monkeypatch, at_step: int):
    """Make a run stop right after checkpoint `at_step` is written, as a crash would; returns the
    real `save_checkpoint`."""
    from alignkit.train import checkpoint as ckpt

    real = ckpt.save_checkpoint

    def save(run_dir, step, *a, **k):
        path = real(run_dir, step, *a, **k)
        if step == at_step:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    return real


DRIVER = Path(__file__).with_name("dist_driver.py")


def count_sent(monkeypatch, adapters_as: str = "save_peft", check=None) -> dict:
    """Counts what a run sends its sampler: adapter updates (written by `AdapterUpdate.<adapters_as>`:
    `save_peft` for vLLM, `save` for alignkit's samplers; `check(update)` runs on each) and files of
    full weights (`vllm_engine.write_weights`). Returns the live counts {"adapters", "weights"}."""
    from alignkit.generation import adapters, vllm_engine

    sent = {"adapters": 0, "weights": 0}
    real_save, real_write = getattr(adapters.AdapterUpdate, adapters_as), vllm_engine.write_weights

    def save(self, directory):
        sent["adapters"] += 1
        if check is not None:
            check(self)
        return real_save(self, directory)

    def write(state, directory):
        sent["weights"] += 1
        return real_write(state, directory)

    monkeypatch.setattr(adapters.AdapterUpdate, adapters_as, save)
    monkeypatch.setattr(vllm_engine, "write_weights", write)
    return sent


def torchrun(runs: list, tmp_path: Path, nproc: int = 2, timeout: int = 600, launcher: list | None = None):
    """`runs` ({"argv": [...], ...} each, see dist_driver.py) in one torchrun job of `nproc`
    processes, one thread each; the finished process (its returncode, stdout, stderr)."""
    job = time.monotonic_ns()
    spec = tmp_path / f"runs-{job}.json"
    spec.write_text(json.dumps(runs))
    # torchrun's log directory (it makes one in /tmp for every job and leaves it) in the test's own
    logs = f"--log-dir={tmp_path / f'torchrun-{job}'}"
    cmd = launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", logs]
    return subprocess.run(
        [*cmd, str(DRIVER), str(spec)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
