"""PPO (PPO-max) on a 2-core CPU: SmolLM2-135M-Instruct learns to answer small sums with the bare
number, the task of `grpo_cpu.py` with the same reward, held-out sums and samples per rollout
(`sums_task.py`).

    python examples/ppo_cpu.py [--rollouts 40] [--out runs/example_ppo_cpu]

PPO adds a value model (the policy's weights with a scalar head; its bottom blocks frozen to keep
the CPU budget), GAE advantages, and per rollout 1 epoch of 2 minibatch updates. Last line:
`heldout_reward before=<x> after=<y> n=<n>`. `--smoke` (smoke.py): the same run in seconds, with a
tiny random-init model.
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
    ap.add_argument("--rollouts", type=int, default=40, help="rollouts of 4 prompts x 6 samples (GRPO's 40 steps)")
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--critic-lr", type=float, default=2e-5)
    ap.add_argument("--critic-frozen-layers", type=int, default=24, help="of SmolLM2's 30 blocks")
    ap.add_argument("--out", default="runs/example_ppo_cpu")
    ap.add_argument("--heldout", type=int, default=sums_task.N_HELDOUT, help="held-out sums")
    args = smoke.parse_args(ap, rollouts=1, heldout=4, critic_frozen_layers=1)

    from alignkit.config import load_config
    from alignkit.models import default_model_dir
    from alignkit.train.loop import train

    out = ROOT / args.out
    train_file, held_file = sums_task.write_data(out, n_heldout=args.heldout)
    model = smoke.tiny_model_dir(out) if args.smoke else str(default_model_dir())
    epochs, minibatches = 1, 2
    steps = args.rollouts * epochs * minibatches
    cfg = load_config(
        None,
        [
            "recipe=ppo",
            *sums_task.common_overrides(train_file, held_file, out, steps, args.lr, model),
            f"ppo.epochs={epochs}",
            f"ppo.minibatches={minibatches}",
            "ppo.gamma=1.0",
            "ppo.lam=0.95",
            f"critic.learning_rate={args.critic_lr}",
            f"critic.freeze_layers={args.critic_frozen_layers}",
        ],
    )
    start = time.perf_counter()
    result = train(cfg)
    sums_task.report("PPO", steps, (time.perf_counter() - start) / 60, result.run_dir, model, held_file)


if __name__ == "__main__":
    main()
