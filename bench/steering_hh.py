"""Steering SmolLM2-135M-Instruct toward the chosen replies of the shared HH-RLHF harmless pairs,
and the alignment/helpfulness trade-off as the strength grows (Wolf et al., arXiv 2401.16332).

    python bench/steering_hh.py [--fit-rows 1000] [--sweep-pairs 200] [--layers 10 15 20]

1. `alignkit steer fit`: difference-of-means directions between the chosen and rejected replies'
   hidden states (mean over the reply's tokens) at --layers, on usable rows 1..fit-rows (the last
   20% of them held out for the per-layer separation).
2. `alignkit eval --steer-sweep 0,1,2,4,8` on the next --sweep-pairs rows (never seen by the fit):
   alignment = the steered model's mean log p(chosen) - log p(rejected); helpfulness = per-token
   NLL of 48 GSM8K reference answers (../shared/data/gsm8k/test.jsonl, question -> worked answer);
   linear and quadratic fits with R^2; plus the representation section (a probe per layer).
Needs ../shared/data (skips with a message otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import hh_data  # noqa: E402

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-rows", type=int, default=1000)
    ap.add_argument("--sweep-pairs", type=int, default=200)
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 15, 20])
    ap.add_argument("--sweep", default="0,1,2,4,8")
    ap.add_argument("--out", default="runs/bench_steering")
    args = ap.parse_args()
    if not GSM8K.is_file():
        sys.exit(f"skipped: {GSM8K} not found (the benchmark needs the shared GSM8K data)")

    from alignkit.cli import main as alignkit
    from alignkit.models import default_model_dir

    out = ROOT / args.out
    rows, skipped = hh_data.usable_rows()
    fit = hh_data.write_rows(out / "fit.jsonl", [r for _, r in rows[: args.fit_rows]])
    sweep = hh_data.write_rows(out / "sweep.jsonl", [r for _, r in rows[args.fit_rows: args.fit_rows + args.sweep_pairs]])
    gsm = [json.loads(line) for line in GSM8K.read_text().splitlines()[:48]]
    helpful = hh_data.write_rows(out / "helpfulness.jsonl", [{"prompt": g["question"], "completion": g["answer"]}
                                                             for g in gsm])
    model = str(default_model_dir())
    start = time.perf_counter()
    alignkit(["steer", "fit", "--model", model, "--data", str(fit), "--layers", *map(str, args.layers),
              "--method", "mean_diff", "--out", str(out / "vectors")])
    fit_min = (time.perf_counter() - start) / 60
    alignkit(["eval", "--model", model, "--data", str(sweep), "--steer", str(out / "vectors"), "--steer-sweep",
              args.sweep, "--helpfulness", str(helpful), "--num-prompts", "48", "--max-length", "512",
              "--representation-layers", "0,3,6,9,12,15,18,21,24,27,29", "--output-dir", str(out / "eval")])
    total = (time.perf_counter() - start) / 60
    m = json.loads((out / "eval" / "metrics.json").read_text())
    sw = m["steering"]
    print(f"\nfit on {len(rows[: args.fit_rows])} usable HH rows ({len(skipped)} unusable rows of the file skipped) "
          f"in {fit_min:.1f} min; sweep on {sw['n_pairs']} later rows; {total:.1f} min in all")
    print("| strength | alignment: mean log-prob margin | preference accuracy | helpfulness NLL/token | NLL - NLL(0) |")
    print("| --- | --- | --- | --- | --- |")
    for r in sw["rows"]:
        print(f"| {r['strength']:g} | {r['margin']:+.3f} | {r['accuracy']:.3f} | {r['nll']:.4f} | "
              f"{r['helpfulness_loss']:+.4f} |")
    f = sw["fits"]
    print(f"alignment linear fit: slope {f['alignment_linear']['coef'][0]:+.4f}, R² {f['alignment_linear']['r2']:.3f}; "
          f"helpfulness loss quadratic fit: {f['helpfulness_quadratic']['coef'][0]:+.5f} s², "
          f"R² {f['helpfulness_quadratic']['r2']:.3f} (linear fit R² {f['helpfulness_linear']['r2']:.3f})")
    rep = m["representation"]
    print("probe accuracy by layer: " + ", ".join(f"{l}: {a:.2f}" for l, a in zip(rep["layers"], rep["probe_accuracy"])))


if __name__ == "__main__":
    main()
