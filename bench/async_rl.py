"""Asynchronous GRPO on a 2-core CPU: does overlapping sampling and training pay, and does the
held-out reward survive the staleness?

The task of `examples/grpo_cpu.py` (SmolLM2-135M-Instruct learns to answer small sums; same prompts,
seeds, samples per prompt, learning rate and steps), trained four ways:

- `sync_2core`: today's run, one process sampling and training with both cores in turn;
- `sync`, `one_step_off`, `stream` (max_staleness 2): the same placement for all three, the
  sampler an `alignkit sample-serve` pinned to core 1 with one thread and the trainer pinned to
  core 0 with one thread; `sync` alternates (each waits for the other), the asynchronous modes
  overlap.

Each run is a fresh `alignkit train` process. Reported per run: samples/s over the training steps
(steps x prompts x samples / the summed step times), the trainer's and the sampler's busy shares,
and the held-out reward (48 unseen sums, greedy) after training with the paired 95% bootstrap
interval of its change from the starting model.

    python bench/async_rl.py [--steps 40] [--backend transformers|vllm] [--out runs/bench_async_rl]

`--backend vllm`: the sampler is an `alignkit vllm-serve` (vLLM's CPU build) instead.

Last line: `sync_samples_per_s=<same placement> sync_2core_samples_per_s=<x>
one_step_off_samples_per_s=<y> stream_samples_per_s=<z> heldout_sync=<a> heldout_one_step_off=<b>
heldout_stream=<c>`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import smoke  # noqa: E402
import sums_task  # noqa: E402

MODES = ("sync_2core", "sync", "one_step_off", "stream")
TRAINER_CPU, SAMPLER_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int | None):
    """A preexec_fn that pins the child to one core (where the machine has it)."""
    if cpu is None or cpu >= (os.cpu_count() or 1):
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def start_server(backend: str, model: str, sync_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = ["--model", model, "--port", str(port), "--sync-dir", str(sync_dir)]
    if backend == "vllm":
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(SAMPLER_CPU)
        cmd = [sys.executable, "-m", "alignkit", "vllm-serve", *common, "--max-model-len", "512", "--kv-cache-gib", "1"]
    else:
        cmd = [sys.executable, "-m", "alignkit", "sample-serve", *common, "--threads", "1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=pinned(SAMPLER_CPU))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the sampler server stopped; its log: {log}\n{log.read_text()[-3000:]}")
        try:
            import urllib.request

            urllib.request.urlopen(url + "/health", timeout=2)
        except OSError as e:  # 401 (an HTTPError, an OSError) means it is up and guarding
            if getattr(e, "code", None) == 401:
                return proc, url
            time.sleep(1)
        else:
            return proc, url
    raise SystemExit(f"the sampler server did not start within 600 s; its log: {log}")


def train(mode: str, args, model: str, files, out: Path, backend: str) -> Path:
    """One `alignkit train` process for `mode`; returns its run directory."""
    train_file, held_file = files
    run_out = out / mode
    overrides = ["recipe=grpo", *sums_task.common_overrides(train_file, held_file, run_out, args.steps, args.lr, model)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    server = None
    if mode == "sync_2core":
        env["OMP_NUM_THREADS"] = str(min(2, os.cpu_count() or 1))
        cpu = None
        if backend == "vllm":
            overrides.append("generation.backend=vllm")
    else:
        env["OMP_NUM_THREADS"] = "1"
        cpu = TRAINER_CPU
        sync_dir = out / f"sync_{mode}"
        server, url = start_server(backend, model, sync_dir, out / f"server_{mode}.log")
        key = "generation.vllm_server" if backend == "vllm" else "generation.sampler_server"
        if backend == "vllm":
            overrides.append("generation.backend=vllm")
        overrides += [f"{key}={url}", f"generation.vllm_sync_dir={sync_dir}", f"online.async.mode={mode}"]
        if mode == "stream":
            overrides.append("online.async.max_staleness=2")
    try:
        log = out / f"train_{mode}.log"
        with open(log, "w") as f:
            proc = subprocess.run(
                [sys.executable, "-m", "alignkit", "train", *overrides],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=pinned(cpu),
            )
        if proc.returncode != 0:
            raise SystemExit(f"{mode}: training failed; its log: {log}\n{log.read_text()[-3000:]}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    return run_out / "run"


def summarise(mode: str, run_dir: Path) -> dict:
    from alignkit.train.metrics import read_metrics

    rows = read_metrics(run_dir, "train")
    seconds = sum(r["step_time_s"] for r in rows)
    gen = sum(r["time/generation_s"] for r in rows)
    if mode in ("one_step_off", "stream"):
        trainer_idle, sampler_idle = rows[-1]["async/trainer_idle_fraction"], rows[-1]["async/sampler_idle_fraction"]
    else:  # lockstep: the trainer waits while the sampler samples, and the sampler idles while it trains
        trainer_idle = gen / seconds
        sampler_idle = 1 - trainer_idle
    return {"seconds": seconds, "trainer_idle": trainer_idle, "sampler_idle": sampler_idle}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--out", default="runs/bench_async_rl")
    ap.add_argument("--heldout", type=int, default=sums_task.N_HELDOUT, help="held-out sums")
    args = smoke.parse_args(ap, steps=2, heldout=4)

    from alignkit.eval.stats import paired_bootstrap
    from alignkit.models import default_model_dir

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    if args.backend == "vllm":
        out = out.with_name(out.name + "_vllm")
    files = sums_task.write_data(out, n_heldout=args.heldout)
    model = smoke.tiny_model_dir(out) if args.smoke else str(default_model_dir())
    per_step = 4 * 6  # train.batch_size x generation.num_samples (sums_task.common_overrides)
    before = sums_task.heldout_rewards(model, files[1])
    results = {}
    for mode in MODES:
        start = time.perf_counter()
        run_dir = train(mode, args, model, files, out, args.backend)
        r = summarise(mode, run_dir)
        r["samples_per_s"] = args.steps * per_step / r["seconds"]
        after = sums_task.heldout_rewards(str(run_dir / "final"), files[1])
        d = paired_bootstrap(before, after)
        r.update(heldout=d.after, change=d.diff, lo=d.lo, hi=d.hi, wall_min=(time.perf_counter() - start) / 60)
        results[mode] = r
        print(
            f"{mode:>13}: {r['samples_per_s']:.2f} samples/s ({r['seconds']:.0f} s of steps); trainer busy "
            f"{1 - r['trainer_idle']:.0%}, sampler busy {1 - r['sampler_idle']:.0%}; held-out reward "
            f"{d.before:.3f} -> {d.after:.3f} (change {d.diff:+.3f}, 95% [{d.lo:+.3f}, {d.hi:+.3f}])",
            flush=True,
        )
    sync = results["sync"]
    for mode in ("one_step_off", "stream"):
        r = results[mode]
        inside = sync["lo"] <= r["change"] <= sync["hi"]
        print(
            f"{mode}: {r['samples_per_s'] / sync['samples_per_s']:.2f}x the synchronous run on the same placement, "
            f"{r['samples_per_s'] / results['sync_2core']['samples_per_s']:.2f}x the 2-core synchronous run; "
            f"held-out change {r['change']:+.3f} {'inside' if inside else 'outside'} the synchronous run's interval "
            f"[{sync['lo']:+.3f}, {sync['hi']:+.3f}]"
        )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"sync_samples_per_s={sync['samples_per_s']:.3f} "
        f"sync_2core_samples_per_s={results['sync_2core']['samples_per_s']:.3f} "
        f"one_step_off_samples_per_s={results['one_step_off']['samples_per_s']:.3f} "
        f"stream_samples_per_s={results['stream']['samples_per_s']:.3f} "
        f"heldout_sync={sync['heldout']:.3f} heldout_one_step_off={results['one_step_off']['heldout']:.3f} "
        f"heldout_stream={results['stream']['heldout']:.3f}"
    )


if __name__ == "__main__":
    main()
