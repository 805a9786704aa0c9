"""Train SmolLM2-135M-Instruct briefly on HH-RLHF harmless pairs with several direct alignment
losses; report held-out preference accuracy for each, with a 95% Wilson interval.

    python bench/hh_losses.py [--losses dpo,ipo,simpo,orpo] [--train 256] [--heldout 200] [--steps 16] [--lr 5e-6]

Data: ../shared/data/hh_rlhf_harmless/dev.jsonl (not shipped; the script exits with a message when
absent). Training pairs are the first `--train` usable rows, held-out pairs the last `--heldout`.
"Preference accuracy" is each method's own implicit-reward ranking on held-out pairs
(`rewards/accuracies` at evaluation: beta * log-ratio for reference-based losses, the length-
normalised log-prob for SimPO, the log-odds for ORPO), next to the untrained model's own ranking
by summed and by mean log-prob. Last line: `best=<loss> heldout_accuracy=<x> n=<n>`.
`--smoke` (examples/smoke.py): the same run in seconds, a tiny model and synthetic pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402


def baseline(model: str, held: Path, max_length: int) -> dict:
    """The untrained model's own ranking: is log pi(chosen) > log pi(rejected) (sum and mean)?"""
    from alignkit.eval.run import EvalConfig, run_eval

    pref = run_eval(
        EvalConfig(
            model=model,
            data=str(held),
            max_length=max_length,
            batch_size=16,
            output_dir=str(held.parent.parent / "baseline"),
            progress=False,
        )
    )["preference"]
    return {"sum_logprob": pref["ranking_accuracy"], "mean_logprob": pref["ranking_accuracy_mean_logprob"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--losses", default="dpo,ipo,simpo,orpo")
    ap.add_argument("--train", type=int, default=256, help="training pairs")
    ap.add_argument("--heldout", type=int, default=200, help="held-out pairs")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--out", default="runs/bench_hh_losses")
    args = smoke.parse_args(ap, train=8, heldout=4, steps=1, batch_size=4, max_length=64)
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh()

    from alignkit.config import load_config
    from alignkit.eval.metrics import wilson_interval
    from alignkit.models import DEFAULT_MODEL
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    model = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    rows, skipped = hh_data.usable_rows(hh)
    if len(rows) < args.train + args.heldout:
        sys.exit(f"only {len(rows)} usable pairs; lower --train or --heldout")
    train_file = hh_data.write_rows(out / "data" / "train.jsonl", [r for _, r in rows[: args.train]])
    held_file = hh_data.write_rows(out / "data" / "heldout.jsonl", [r for _, r in rows[-args.heldout :]])
    print(f"HH-RLHF harmless: {len(skipped)} malformed rows skipped; train {args.train}, held-out {args.heldout}")
    results = {"baseline": baseline(model, held_file, args.max_length)}
    for name in args.losses.split(","):
        start = time.perf_counter()
        cfg = load_config(
            None,
            [
                f"model.name_or_path={model}",
                f"loss.name={name}",
                f"data.train={train_file}",
                f"data.eval={held_file}",
                f"data.max_length={args.max_length}",
                f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch_size}",
                f"train.learning_rate={args.lr}",
                "train.report_to=[]",
                "train.eval_batch_size=16",
                f"output_dir={out / name}",
            ],
        )
        result = train(cfg, progress=False)
        acc = read_metrics(result.run_dir, "eval")[-1]["rewards/accuracies"]
        results[name] = {"accuracy": acc, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: held-out preference accuracy {acc:.3f} ({results[name]['seconds']:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| method | held-out preference accuracy [95% CI] | time (s) |\n| --- | --- | --- |")
    for key in ("sum_logprob", "mean_logprob"):
        b = results["baseline"][key]
        print(f"| untrained, {key.replace('_', ' ')} | {b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] | - |")
    for name in args.losses.split(","):
        lo, hi = wilson_interval(results[name]["accuracy"] * args.heldout, args.heldout)
        print(f"| {name} | {results[name]['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {results[name]['seconds']:.0f} |")
    best = max(args.losses.split(","), key=lambda n: results[n]["accuracy"])
    print(f"best={best} heldout_accuracy={results[best]['accuracy']:.3f} n={args.heldout}")


if __name__ == "__main__":
    main()
