"""The same DPO run on 1 process and on 2 (torchrun, FSDP2, gloo): per-step losses (they must
agree), tokens/s and peak memory per process.

    python bench/scaling.py [--pairs 64] [--steps 5] [--pairs-per-step 8] [--max-length 256]

SmolLM2-135M-Instruct on the shared HH-RLHF harmless pairs. One process uses 2 threads; the two
processes 1 thread each (torchrun's default), so both use the machine's 2 cores. The reference
log-probs are computed once (by the first run) and cached, so both time only training. Tokens/s is
the mean over the steps after the first. Last line:
`parity_max_abs_diff=<x> rss_per_process_ratio=<2-process/1-process> tokens_per_s_ratio=<2-process/1-process>`.
`--smoke` (examples/smoke.py): the same runs in seconds, a tiny model and synthetic pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402

WORKER = Path(__file__).with_name("scaling_worker.py")


def run(nproc: int, out: Path, args: list) -> tuple[float, list]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), "train", *args]
        env["OMP_NUM_THREADS"] = "2"
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--log-dir={out / 'torchrun-logs'}",  # not a new directory in /tmp for every job
            str(WORKER),
            str(out),
            "train",
            *args,
        ]
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{nproc}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss = [json.loads((out / f"rss-{r}.json").read_text())["peak_rss_mib"] for r in range(nproc)]
    return time.perf_counter() - start, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_scaling")
    args = smoke.parse_args(ap, pairs=8, steps=2, pairs_per_step=2, max_length=64)
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh()

    from alignkit.models import DEFAULT_MODEL
    from alignkit.train.metrics import read_metrics

    model = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    rows = [r for _, r in hh_data.usable_rows(hh)[0]][: args.pairs]
    data = hh_data.write_rows(out / "pairs.jsonl", rows)
    common = [
        f"model.name_or_path={model}",
        f"data.train={data}",
        "data.eval_fraction=0",
        f"data.max_length={args.max_length}",
        f"train.max_steps={args.steps}",
        "train.learning_rate=1e-6",
        "train.warmup_ratio=0",
        "train.shuffle=false",
        "train.report_to=[]",
        f"cache_dir={out / 'cache'}",
        "train.log_every=1",
        "train.save_every=0",
    ]
    per_process = {1: args.pairs_per_step, 2: args.pairs_per_step // 2}
    results = {}
    for nproc in (1, 2):
        run_dir = out / f"{nproc}proc"
        seconds, rss = run(
            nproc, run_dir, [*common, f"train.batch_size={per_process[nproc]}", f"output_dir={run_dir / 'run'}"]
        )
        metrics = read_metrics(run_dir / "run", "train")
        results[nproc] = {
            "seconds": seconds,
            "rss": rss,
            "losses": [m["loss"] for m in metrics],
            "tokens_per_s": sum(m["tokens_per_s"] for m in metrics[1:]) / max(1, len(metrics) - 1),
        }
    print(f"DPO on {model}, {args.pairs_per_step} pairs per step, max_length {args.max_length}, {args.steps} steps")
    print("step  loss (1 process)  loss (2 processes)")
    for i, (a, b) in enumerate(zip(results[1]["losses"], results[2]["losses"]), start=1):
        print(f"{i:>4}  {a:.8f}        {b:.8f}")
    for n in (1, 2):
        r = results[n]
        print(
            f"{n} process(es): {r['tokens_per_s']:.0f} tokens/s, peak RSS per process "
            f"{', '.join(f'{x:.0f}' for x in r['rss'])} MiB, {r['seconds']:.0f} s in all"
        )
    diff = max(abs(a - b) for a, b in zip(results[1]["losses"], results[2]["losses"]))
    rss_ratio = max(results[2]["rss"]) / results[1]["rss"][0]
    tps_ratio = results[2]["tokens_per_s"] / results[1]["tokens_per_s"]
    print(f"parity_max_abs_diff={diff:.2e} rss_per_process_ratio={rss_ratio:.3f} tokens_per_s_ratio={tps_ratio:.3f}")


if __name__ == "__main__":
    main()
