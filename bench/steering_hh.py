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
Last line: `alignment_slope=<margin per unit strength> helpfulness_quadratic=<s² coefficient> n=<pairs>`.
Needs ../shared/data (skips with a message otherwise). `--smoke` (examples/smoke.py): the same run in
seconds, a tiny model (layers 0 and 1) and synthetic pairs and answers.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-rows", type=int, default=1000)
    ap.add_argument("--sweep-pairs", type=int, default=200)
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 15, 20])
    ap.add_argument("--sweep", default="0,1,2,4,8")
    ap.add_argument("--helpfulness-answers", type=int, default=48, help="GSM8K answers for the helpfulness NLL")
    ap.add_argument("--num-prompts", type=int, default=48, help="alignkit eval's --num-prompts")
    ap.add_argument("--representation-layers", default="0,3,6,9,12,15,18,21,24,27,29")
    ap.add_argument("--out", default="runs/bench_steering")
    args = smoke.parse_args(ap, fit_rows=10, sweep_pairs=4, layers=[0, 1], sweep="0,1,2", helpfulness_answers=4,
                            num_prompts=4, representation_layers="0,1")
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh()
    gsm8k = hh_data.smoke_gsm8k(out) if args.smoke else hh_data.require_gsm8k()

    from alignkit.cli import main as alignkit
    from alignkit.models import default_model_dir

    rows, skipped = hh_data.usable_rows(hh)
    fit = hh_data.write_rows(out / "fit.jsonl", [r for _, r in rows[: args.fit_rows]])
    sweep = hh_data.write_rows(out / "sweep.jsonl", [r for _, r in rows[args.fit_rows: args.fit_rows + args.sweep_pairs]])
    gsm = [json.loads(line) for line in gsm8k.read_text().splitlines()[: args.helpfulness_answers]]
    helpful = hh_data.write_rows(out / "helpfulness.jsonl", [{"prompt": g["question"], "completion": g["answer"]}
                                                             for g in gsm])
    model = smoke.tiny_model_dir(out) if args.smoke else str(default_model_dir())
    start = time.perf_counter()
    alignkit(["steer", "fit", "--model", model, "--data", str(fit), "--layers", *map(str, args.layers),
              "--method", "mean_diff", "--out", str(out / "vectors")])
    fit_min = (time.perf_counter() - start) / 60
    alignkit(["eval", "--model", model, "--data", str(sweep), "--steer", str(out / "vectors"), "--steer-sweep",
              args.sweep, "--helpfulness", str(helpful), "--num-prompts", str(args.num_prompts), "--max-length", "512",
              "--representation-layers", args.representation_layers, "--output-dir", str(out / "eval")])
    total = (time.perf_counter() - start) / 60
    m = json.loads((out / "eval" / "metrics.json").read_text())
    sw = m["steering"]
    print(f"\nfit on {len(rows[: args.fit_rows])} usable HH rows ({len(skipped)} unusable rows of the file skipped) "
          f"in {fit_min:.1f} min; sweep on {sw['n_pairs']} later rows; {total:.1f} min in all")
    print("| strength | alignment: mean log-prob margin | preference accuracy | helpfulness NLL/token | NLL - NLL(0) |")
    print("| --- | --- | --- | --- | --- |")
    for r in sw["rows"]:
        print(f"| {r['strength']:g} | {r['margin']:+.3f} | {r['pair_accuracy']:.3f} | {r['nll']:.4f} | "
              f"{r['helpfulness_loss']:+.4f} |")
    align, helpful = sw["fits"]["margin"], sw["fits"]["helpfulness_loss"]  # coefficients highest power first
    print(f"alignment linear fit: slope {align['line']['coef'][0]:+.4f}, R² {align['line']['r2']:.3f}; "
          f"helpfulness loss quadratic fit: {helpful['quadratic']['coef'][0]:+.5f} s², "
          f"R² {helpful['quadratic']['r2']:.3f} (linear fit R² {helpful['line']['r2']:.3f})")
    rep = m["representation"]
    print("probe accuracy by layer: " + ", ".join(f"{l}: {a:.2f}" for l, a in zip(rep["layers"], rep["probe_accuracy"])))
    print(f"alignment_slope={align['line']['coef'][0]:+.4f} "
          f"helpfulness_quadratic={helpful['quadratic']['coef'][0]:+.5f} n={sw['n_pairs']}")


if __name__ == "__main__":
    main()
