"""InfAlign on the CPU sums task: GRPO on the raw reward against GRPO on the calibrated,
best-of-N-transformed reward (CTRL), both then decoded with best-of-4 and best-of-8 and compared
with the reference (SmolLM2-135M-Instruct) by their expected win rates.

    python bench/infalign_sums.py [--steps 40] [--out runs/bench_infalign]

The task, reward, held-out sums and GRPO budget are those of `examples/grpo_cpu.py`
(`examples/sums_task.py`). The CTRL run's reward is `{name: calibrated, reward: <the task's>, k: 8,
transform: bon, n: 4}`: each training prompt's reward distribution under the reference is sampled
once (8 samples), a sample's reward becomes its quantile among them, then exp(t c) with the t of
`calibration.bon_t(4)`. Evaluation (`alignkit eval --bon-n 4,8`, the raw task reward): per held-out
prompt 16 samples of the policy, 16 of the reference and 16 more of the reference (held out); the
win rate of best-of-n (n distinct samples) against one reference sample and against best-of-n from
the reference, ties half, in closed form from the empirical rewards, averaged over the 48 prompts
with bootstrap intervals; the reference's own rows are its held-out samples measured the same way.
Last line: `bon4_winrate raw=<x> ctrl=<y> n=<n>` (best-of-4 against the reference's best-of-4).
`--smoke` (examples/smoke.py): the same runs in seconds, a tiny random-init model, 8 training sums.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import smoke  # noqa: E402
import sums_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--out", default="runs/bench_infalign")
    ap.add_argument("--train-prompts", type=int, default=400, help="training sums (the CTRL reward calibrates on each)")
    ap.add_argument("--heldout", type=int, default=sums_task.N_HELDOUT, help="held-out sums")
    args = smoke.parse_args(ap, steps=1, train_prompts=8, heldout=4)

    from alignkit.config import load_config
    from alignkit.eval.run import EvalConfig, run_eval
    from alignkit.generation.decode import SamplingParams
    from alignkit.models import default_model_dir
    from alignkit.rewards import build_reward
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    out = ROOT / args.out
    train_file, held_file = sums_task.write_data(out, n_train=args.train_prompts, n_heldout=args.heldout)
    base = smoke.tiny_model_dir(out) if args.smoke else str(default_model_dir())
    calibrated = {
        "name": "calibrated",
        "reward": sums_task.REWARDS,
        "k": 8,
        "transform": "bon",
        "n": 4,
        "max_new_tokens": 24,
        "model": base,
    }
    results, times = {}, {}
    for name, reward in (("raw", sums_task.REWARDS), ("ctrl", calibrated)):
        run_dir = out / name / "run"
        summary = run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "finished":
            print(f"{name}: reusing the finished run in {run_dir}")  # the training part is deterministic
        else:
            cfg = load_config(
                None,
                [
                    "recipe=grpo",
                    *sums_task.common_overrides(train_file, held_file, out / name, args.steps, args.lr, base),
                    f"online.rewards={json.dumps(reward)}",
                    f"output_dir={run_dir}",
                    "data.eval_fraction=0",
                    "data.eval=null",
                ],
            )
            train(cfg)
        times[name] = sum(r["step_time_s"] for r in read_metrics(run_dir, "train")) / 60  # the steps' time
        ev = run_eval(
            EvalConfig(
                model=str(run_dir / "final"),
                reference=base,
                prompts=str(held_file),
                rewards=[build_reward(sums_task.REWARDS)],
                bon_n=[4, 8],
                calibration_k=16,
                num_prompts=args.heldout,
                sampling=SamplingParams(max_new_tokens=24, temperature=1.0),
                output_dir=str(out / name / "eval"),
                progress=False,
            )
        )
        results[name] = ev["best_of_n"]
    print(
        "\n| model | training | calibrated reward (mean) | best-of-4 vs 1 ref | best-of-4 vs ref best-of-4 "
        "| best-of-8 vs 1 ref | best-of-8 vs ref best-of-8 |\n| --- | --- | --- | --- | --- | --- | --- |"
    )

    def cell(v: dict) -> str:
        return f"{v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"

    for name, b in results.items():
        cells = [
            cell(b["by_n"][n][key]) for n in ("4", "8") for key in ("vs_reference_sample", "vs_reference_best_of_n")
        ]
        print(
            f"| GRPO {name} | {times[name]:.1f} min | {b['policy_calibrated_mean']:.3f} | " + " | ".join(cells) + " |"
        )
    for name, b in results.items():  # measured, from the reference's held-out samples of each evaluation
        cells = [
            cell(b["by_n"][n][key])
            for n in ("4", "8")
            for key in ("reference_vs_reference_sample", "reference_vs_reference_best_of_n")
        ]
        print(f"| reference (eval of {name}) | - | - | " + " | ".join(cells) + " |")
    b4 = {k: v["by_n"]["4"]["vs_reference_best_of_n"]["value"] for k, v in results.items()}
    print(f"bon4_winrate raw={b4['raw']:.3f} ctrl={b4['ctrl']:.3f} n={args.heldout}")


if __name__ == "__main__":
    main()
