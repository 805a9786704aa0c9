"""GRPO on a 2-core CPU in under 10 minutes: SmolLM2-135M-Instruct learns to answer small sums
with the bare number.

    python examples/grpo_cpu.py [--steps 40] [--out runs/example_grpo_cpu]

The task (generated here, seeded): "What is 17 + 8? Reply with only the number." The reward sums
two verifiable checks: the last number in the reply is the right sum (`numeric_match`, 1.0), and
the reply is the bare number and nothing else (`regex`, 0.5). Held-out reward is the mean over 48
unseen sums of each prompt's greedy reply, before training and after. Last line:
`heldout_reward before=<x> after=<y> n=<n>`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sums(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        rows.append({"prompt": f"What is {a} + {b}? Reply with only the number.", "answer": str(a + b)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--out", default="runs/example_grpo_cpu")
    args = ap.parse_args()

    from alignkit.config import load_config
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    train_file, held_file = out / "train.jsonl", out / "heldout.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in sums(400, seed=1)))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in sums(48, seed=2)))
    rewards = [{"name": "numeric_match", "answer_column": "answer", "weight": 1.0},
               {"name": "regex", "pattern": r"\s*-?\d+\s*\.?\s*", "search": False, "weight": 0.5}]
    cfg = load_config(None, [
        "recipe=grpo", f"data.train={train_file}", f"data.eval={held_file}", "data.max_length=96",
        f"online.rewards={json.dumps(rewards)}", "generation.num_samples=6", "generation.max_new_tokens=24",
        "generation.temperature=1.0", "generation.batch_size=8", "train.batch_size=4",
        f"train.max_steps={args.steps}", f"train.learning_rate={args.lr}", "train.warmup_ratio=0",
        "train.lr_schedule=constant", "train.log_every=5", "train.tensorboard=false", f"output_dir={out / 'run'}"])
    start = time.perf_counter()
    result = train(cfg)
    evals = read_metrics(result.run_dir, "eval")
    before, after = evals[0], evals[-1]
    rows = read_metrics(result.run_dir, "train")
    gen = sum(r["time/generation_s"] for r in rows) / max(1e-9, sum(r["step_time_s"] for r in rows))
    print(f"\n{args.steps} GRPO steps in {(time.perf_counter() - start) / 60:.1f} min "
          f"(sampling {100 * gen:.0f}% of step time)")
    for name, e in (("before", before), ("after", after)):
        parts = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in e.items() if k.startswith("reward/"))
        print(f"held-out {name}: reward {e['reward']:.3f} ({parts}); mean length {e['completion_length']:.1f} tokens")
    print(f"heldout_reward before={before['reward']:.3f} after={after['reward']:.3f} n=48")


if __name__ == "__main__":
    main()
