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
Last line: `methods=<n> all_raised=<true|false>`.
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

import sums_task  # noqa: E402

METHODS = {
    "grpo": ["recipe=grpo"],
    "rloo": ["recipe=rloo"],
    "reinforce_pp": ["recipe=reinforce_pp", "online.kl_coef=0.01"],
    "gspo": ["recipe=grpo", "loss.name=gspo"],
    "cispo": ["recipe=grpo", "loss.name=cispo", "online.aggregation=dapo"],
    "ppo": ["recipe=ppo", "ppo.epochs=1", "ppo.minibatches=2", "critic.learning_rate=2e-5", "critic.freeze_layers=24"],
    "online_dpo": ["recipe=online_dpo"],
    "raft": ["recipe=raft"],
    "distill": ["recipe=distill"],
}
STEPS_PER_ROLLOUT = {"ppo": 2}


def run_one(method: str, args, train_file: Path, held_file: Path) -> dict:
    """Train `method` in this process (called in a fresh one) and measure it."""
    from alignkit.config import load_config
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    out = Path(args.out) / method
    steps = args.rollouts * STEPS_PER_ROLLOUT.get(method, 1)
    extra = list(METHODS[method])
    if method == "distill":
        teacher = Path(args.out) / "grpo" / "run" / "final"
        if not teacher.is_dir():
            raise SystemExit(f"distill needs the GRPO run's model as its teacher: run --methods grpo first ({teacher})")
        extra.append(f"teacher.name_or_path={teacher}")
    cfg = load_config(None, [*extra, *sums_task.common_overrides(train_file, held_file, out, steps, args.lr)])
    start = time.perf_counter()
    result = train(cfg, progress=False)
    minutes = (time.perf_counter() - start) / 60
    rows = read_metrics(result.run_dir, "train")
    gen = sum(r["time/generation_s"] for r in rows) / max(1e-9, sum(r["step_time_s"] for r in rows))
    before = json.loads((Path(args.out) / "before.json").read_text())
    after = sums_task.heldout_rewards(str(result.run_dir / "final"), held_file)
    d = paired_bootstrap(before, after)
    return {"method": method, "settings": extra, "steps": steps, "minutes": minutes, "sampling_share": gen,
            "before": sum(before) / len(before), "after": sum(after) / len(after), "n": len(after),
            "change": d.diff, "lo": d.lo, "hi": d.hi, "improved": d.improved, "worsened": d.worsened}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_online"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this method here
    args = ap.parse_args()
    out = Path(args.out)
    train_file, held_file = sums_task.write_data(out)
    if args.one:
        res = run_one(args.one, args, train_file, held_file)
        (out / args.one / "result.json").write_text(json.dumps(res, indent=2))
        return
    from alignkit.models import default_model_dir

    if not (out / "before.json").exists():
        (out / "before.json").write_text(json.dumps(sums_task.heldout_rewards(str(default_model_dir()), held_file)))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    results = []
    for m in methods:
        path = out / m / "result.json"
        if not path.exists():
            print(f"== {m}", flush=True)
            subprocess.run([sys.executable, __file__, "--one", m, "--rollouts", str(args.rollouts), "--lr", str(args.lr),
                            "--out", str(out)], check=True)
        results.append(json.loads(path.read_text()))
    print("\n| method | held-out before | after | change [95% CI] | better / worse | steps | minutes | sampling |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['method']} | {r['before']:.3f} | {r['after']:.3f} | {r['change']:+.3f} [{r['lo']:+.3f}, "
              f"{r['hi']:+.3f}] | {r['improved']} / {r['worsened']} | {r['steps']} | {r['minutes']:.1f} | "
              f"{100 * r['sampling_share']:.0f}% |")
    raised = all(r["after"] > r["before"] for r in results)
    print(f"methods={len(results)} all_raised={str(raised).lower()}")


if __name__ == "__main__":
    main()
