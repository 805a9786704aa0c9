"""Every online method on the CPU sums task of `examples/grpo_cpu.py`, on the same prompts, samples
per prompt and number of rollouts; held-out reward before and after, wall time, share sampling.

    python bench/online_methods.py [--rollouts 30] [--methods grpo,rloo,...] [--out runs/bench_online]

SmolLM2-135M-Instruct; each rollout is 4 training prompts x 6 samples, up to 24 new tokens at
temperature 1.0, policy lr 2e-6 (constant), the reward of `examples/sums_task.py` (right sum 1.0,
bare number 0.5). Each method runs in a fresh process, one after the other. Held-out: 48 unseen
sums, greedy replies, the change with a 95% paired bootstrap interval over prompts.

Methods and their settings (the rest are alignkit's defaults):
  grpo          recipe grpo (ppo_clip, group-normalised advantages)
  rloo          recipe rloo (leave-one-out baseline)
  reinforce_pp  recipe reinforce_pp, online.kl_coef 0.01 (k1 KL in the reward, as the paper)
  gspo          recipe grpo, loss gspo (sequence ratio, the paper's clip ranges)
  cispo         recipe grpo, loss cispo, online.aggregation dapo (the paper's token-level mean)
  ppo           recipe ppo as examples/ppo_cpu.py (1 epoch x 2 minibatches: 2 optimizer steps per rollout)
  online_dpo    recipe online_dpo (best vs worst sample of each prompt, DPO beta 0.1)
  raft          recipe raft (SFT on the best of the 6 samples)
  distill       recipe distill, the teacher being the GRPO run's final model (run grpo first)

A method's result is kept in OUT/<method>/result.json, so a second call runs only what is missing.
Every method's settings are checked (as a config) before the first run. Last line:
`methods=<n> all_raised=<true|false>`. `--smoke` (examples/smoke.py): one rollout each of grpo, ppo
and distill (the methods this script treats specially), a tiny random-init model, in seconds each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import smoke  # noqa: E402
import sums_task  # noqa: E402

METHODS = {
    "grpo": ["recipe=grpo"],
    "rloo": ["recipe=rloo"],
    "reinforce_pp": ["recipe=reinforce_pp", "online.kl_coef=0.01"],
    "gspo": ["recipe=grpo", "loss.name=gspo"],
    "cispo": ["recipe=grpo", "loss.name=cispo", "online.aggregation=dapo"],
    "ppo": ["recipe=ppo", "ppo.epochs=1", "ppo.minibatches=2", "critic.learning_rate=2e-5"],  # + --critic-frozen-layers
    "online_dpo": ["recipe=online_dpo"],
    "raft": ["recipe=raft"],
    "distill": ["recipe=distill"],
}
STEPS_PER_ROLLOUT = {"ppo": 2}
# --smoke runs the methods this script treats specially (the recipes themselves are tested in tests/)
SMOKE_METHODS = "grpo,ppo,distill"


def model_dir(args) -> str:
    from alignkit.models import default_model_dir

    return smoke.tiny_model_dir(args.out) if args.smoke else str(default_model_dir())


def settings(method: str, args, train_file: Path, held_file: Path) -> tuple[list[str], list[str], int]:
    """`method`'s own settings, all its config overrides, and its optimizer steps."""
    steps = args.rollouts * STEPS_PER_ROLLOUT.get(method, 1)
    extra = list(METHODS[method])
    if method == "ppo":
        extra.append(f"critic.freeze_layers={args.critic_frozen_layers}")
    if method == "distill":
        extra.append(f"teacher.name_or_path={teacher_dir(args)}")
    out = Path(args.out) / method
    common = sums_task.common_overrides(train_file, held_file, out, steps, args.lr, model_dir(args))
    return extra, [*extra, *common], steps


def teacher_dir(args) -> Path:
    return Path(args.out) / "grpo" / "run" / "final"


def run_one(method: str, args, train_file: Path, held_file: Path) -> dict:
    """Train `method` in this process (called in a fresh one) and measure it."""
    from alignkit.config import load_config
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    if method == "distill" and not teacher_dir(args).is_dir():
        raise SystemExit(
            f"distill needs the GRPO run's model as its teacher: run --methods grpo first ({teacher_dir(args)})"
        )
    extra, overrides, steps = settings(method, args, train_file, held_file)
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    result = train(cfg, progress=False)
    minutes = (time.perf_counter() - start) / 60
    rows = read_metrics(result.run_dir, "train")
    gen = sum(r["time/generation_s"] for r in rows) / max(1e-9, sum(r["step_time_s"] for r in rows))
    before = json.loads((Path(args.out) / "before.json").read_text())
    after = sums_task.heldout_rewards(str(result.run_dir / "final"), held_file)
    d = paired_bootstrap(before, after)
    return {
        "method": method,
        "settings": extra,
        "steps": steps,
        "minutes": minutes,
        "sampling_share": gen,
        "before": sum(before) / len(before),
        "after": sum(after) / len(after),
        "n": len(after),
        "change": d.diff,
        "lo": d.lo,
        "hi": d.hi,
        "improved": d.improved,
        "worsened": d.worsened,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_online"))
    ap.add_argument("--heldout", type=int, default=sums_task.N_HELDOUT, help="held-out sums")
    ap.add_argument("--critic-frozen-layers", type=int, default=24, help="ppo's, of SmolLM2's 30 blocks")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this method here
    args = smoke.parse_args(ap, rollouts=1, heldout=4, critic_frozen_layers=1, methods=SMOKE_METHODS)
    out = Path(args.out)
    train_file, held_file = sums_task.write_data(out, n_heldout=args.heldout)
    if args.one:
        res = run_one(args.one, args, train_file, held_file)
        (out / args.one / "result.json").write_text(json.dumps(res, indent=2))
        return
    if not (out / "before.json").exists():
        (out / "before.json").write_text(json.dumps(sums_task.heldout_rewards(model_dir(args), held_file)))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    from alignkit.config import load_config

    for m in METHODS:  # every method's settings, checked before the first run (a bad key fails in seconds)
        load_config(None, settings(m, args, train_file, held_file)[1])
    results = []
    for m in methods:
        path = out / m / "result.json"
        if not path.exists():
            print(f"== {m}", flush=True)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", m, "--out", str(out)], check=True)
        results.append(json.loads(path.read_text()))
    print("\n| method | held-out before | after | change [95% CI] | better / worse | steps | minutes | sampling |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['method']} | {r['before']:.3f} | {r['after']:.3f} | {r['change']:+.3f} [{r['lo']:+.3f}, "
            f"{r['hi']:+.3f}] | {r['improved']} / {r['worsened']} | {r['steps']} | {r['minutes']:.1f} | "
            f"{100 * r['sampling_share']:.0f}% |"
        )
    raised = all(r["after"] > r["before"] for r in results)
    print(f"methods={len(results)} all_raised={str(raised).lower()}")


if __name__ == "__main__":
    main()
