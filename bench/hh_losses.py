"""Train SmolLM2-135M-Instruct briefly on HH-RLHF harmless pairs with several direct alignment
losses; report held-out preference accuracy for each, with a 95% bootstrap interval.

    python bench/hh_losses.py [--losses dpo,ipo,simpo,orpo] [--train 256] [--heldout 200] [--steps 16]

Data: ../shared/data/hh_rlhf_harmless/dev.jsonl (not shipped; the script exits with a message when
absent). Training pairs are the first `--train` usable rows, held-out pairs the last `--heldout`.
"Preference accuracy" is each method's own implicit-reward ranking on held-out pairs
(`rewards/accuracies` at evaluation: beta * log-ratio for reference-based losses, the length-
normalised log-prob for SimPO, the log-odds for ORPO), next to the untrained model's own ranking
by summed and by mean log-prob. Last line: `best=<loss> heldout_accuracy=<x> n=<n>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless" / "dev.jsonl"


def bootstrap_ci(values, n_boot=10_000, seed=0):
    v = np.asarray(values, dtype=float)
    means = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)
    return float(v.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def split_data(out: Path, n_train: int, n_heldout: int) -> tuple[Path, Path, int]:
    from alignkit.data.formats import load_preference_examples

    result = load_preference_examples(str(HH), on_bad_record="skip")
    rows = [json.loads(line) for line in HH.read_text().splitlines() if line.strip()]
    good = {ex.source.rsplit(":", 1)[1] for ex in result.examples}  # 1-based line numbers kept
    usable = [r for i, r in enumerate(rows, start=1) if str(i) in good]
    if len(usable) < n_train + n_heldout:
        sys.exit(f"only {len(usable)} usable pairs; lower --train or --heldout")
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in usable[:n_train]))
    held.write_text("".join(json.dumps(r) + "\n" for r in usable[-n_heldout:]))
    return train, held, len(result.skipped)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (better than the normal one near 0 or 1)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def baseline(held: Path, max_length: int) -> dict:
    """The untrained model's own ranking: is log pi(chosen) > log pi(rejected) (sum and mean)?"""
    import torch

    from alignkit.config import load_config
    from alignkit.train.loop import setup

    cfg = load_config(None, [f"data.train={held}", "data.eval_fraction=0", f"data.max_length={max_length}",
                             "loss.name=simpo", "train.tensorboard=false"])
    tokenizer, recipe, data, model, device, autocast = setup(cfg)
    from alignkit.logprobs import segment_logps

    sums, means = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.train), 8):
            batch = recipe.collate(data.train[i:i + 8])
            out = segment_logps(model, batch)
            b = batch.num_examples
            sums += (out.logps[:b] > out.logps[b:]).float().tolist()
            avg = out.logps / out.counts.clamp(min=1)
            means += (avg[:b] > avg[b:]).float().tolist()
    return {"sum_logprob": bootstrap_ci(sums), "mean_logprob": bootstrap_ci(means)}


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
    args = ap.parse_args()
    if not HH.is_file():
        sys.exit(f"skipped: {HH} not found (the benchmark needs the shared HH-RLHF data)")

    from alignkit.config import load_config
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    out = ROOT / args.out
    train_file, held_file, skipped = split_data(out / "data", args.train, args.heldout)
    print(f"HH-RLHF harmless: {skipped} malformed rows skipped; train {args.train}, held-out {args.heldout}")
    results = {"baseline": baseline(held_file, args.max_length)}
    for name in args.losses.split(","):
        start = time.perf_counter()
        cfg = load_config(None, [
            f"loss.name={name}", f"data.train={train_file}", f"data.eval={held_file}",
            f"data.max_length={args.max_length}", f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}", f"train.learning_rate={args.lr}",
            "train.tensorboard=false", "train.eval_batch_size=16", f"output_dir={out / name}"])
        result = train(cfg, progress=False)
        acc = read_metrics(result.run_dir, "eval")[-1]["rewards/accuracies"]
        results[name] = {"accuracy": acc, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: held-out preference accuracy {acc:.3f} ({results[name]['seconds']:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| method | held-out preference accuracy [95% CI] | time (s) |\n| --- | --- | --- |")
    for key in ("sum_logprob", "mean_logprob"):
        m, lo, hi = results["baseline"][key]
        print(f"| untrained, {key.replace('_', ' ')} | {m:.3f} [{lo:.3f}, {hi:.3f}] | - |")
    for name in args.losses.split(","):
        lo, hi = wilson(results[name]["accuracy"], args.heldout)
        print(f"| {name} | {results[name]['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {results[name]['seconds']:.0f} |")
    best = max(args.losses.split(","), key=lambda n: results[n]["accuracy"])
    print(f"best={best} heldout_accuracy={results[best]['accuracy']:.3f} n={args.heldout}")


if __name__ == "__main__":
    main()
