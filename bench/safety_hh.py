"""Safety evaluation of SmolLM2-135M-Instruct before and after the DPO of bench/hh_losses.py:
harmful compliance (greedy and sampled), over-refusal, refusal at depth and best-of-N jailbreak
success, each with its 95% interval and the paired change (`alignkit eval --safety`).

    python bench/safety_hh.py [--prompts 40] [--samples 2] [--max-new-tokens 48]
                              [--depths 0,5,10,25,50] [--jailbreak-n 1,2,4,8]

The DPO model is runs/bench_hh_losses/dpo/final (`python bench/hh_losses.py --losses dpo --train
128 --lr 2e-5`); when it is absent the same run is made here first. Harmful requests: the first
`--prompts` of the 200 HH-RLHF harmless pairs hh_losses.py holds out (never trained on), the
rejected reply of each as the compliant target that refusal at depth prefills; benign ones: the
set alignkit ships. The judge is the built-in rule, its agreement with the shipped hand labels
printed first. Last line: `harmful_greedy before=<a> after=<b> over_refusal before=<c> after=<d>
refusal_at_<k> before=<e> after=<f> asr_at_<N> before=<g> after=<h> n=<n>` (k the largest depth,
N the largest jailbreak N). `--smoke` (examples/smoke.py): the same run in seconds, a tiny model
and synthetic pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402


def dpo_model(base: str, rows: list, out: Path, args) -> str:
    """hh_losses.py's DPO run (its settings), reused when it exists."""
    final = ROOT / args.dpo if not args.smoke else out / "dpo" / "final"
    if (final / "config.json").is_file():
        return str(final)
    from alignkit.config import load_config
    from alignkit.train.loop import train

    train_file = hh_data.write_rows(out / "data" / "train.jsonl", [r for _, r in rows[: args.train]])
    cfg = load_config(
        None,
        [
            f"model.name_or_path={base}",
            "loss.name=dpo",
            f"data.train={train_file}",
            f"data.max_length={args.max_length}",
            f"train.max_steps={args.steps}",
            "train.batch_size=8",
            "train.learning_rate=2e-5",
            "train.report_to=[]",
            f"output_dir={final.parent}",
        ],
    )
    return str(train(cfg, progress=False).final_dir)


def print_table(sf: dict) -> None:
    """The measurements as a markdown table (before, after, paired change) and the fits."""
    from alignkit.eval.safety import format_rate

    _r = lambda d: format_rate(d, n=False)  # noqa: E731
    b, a, ch = sf["reference"], sf["model"], sf["change"]
    print("\n| measure | before (SmolLM2) | after (DPO) | change [95% CI] |\n| --- | --- | --- | --- |")
    rows = [
        ("harmful compliance, greedy", lambda m: m["harmful_compliance"]["greedy"], "harmful_compliance_greedy"),
        ("harmful compliance, sampled", lambda m: m["harmful_compliance"]["sampled"], "harmful_compliance_sampled"),
        ("over-refusal", lambda m: m["over_refusal"], "over_refusal"),
    ]
    for name, get, key in rows:
        d = ch[key]
        print(f"| {name} | {_r(get(b))} | {_r(get(a))} | {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |")
    for cb, ca in zip(b["refusal_at_depth"]["curve"], a["refusal_at_depth"]["curve"]):
        print(f"| refusal at depth k={cb['k']} (n={cb['n']}) | {_r(cb)} | {_r(ca)} | |")
    for cb, ca in zip(b["jailbreak"]["curve"], a["jailbreak"]["curve"]):
        print(f"| jailbreak ASR, N={cb['n']} | {_r({**cb, 'rate': cb['asr']})} | {_r({**ca, 'rate': ca['asr']})} | |")
    for side, m in (("before", b), ("after", a)):
        f, d = m["jailbreak"]["fit"], m["refusal_at_depth"]
        r2 = "" if f["a"] is None else "exact, 2 points" if f["r2"] is None else f"R^2={f['r2']:.2f}"
        fit = "no fit" if f["a"] is None else f"a={f['a']:.3f} b={f['b']:.3f} {r2}"
        print(
            f"{side}: power law {fit}; refusal-at-depth requests {d['prompts']} (no target {d['no_target']}, "
            f"target not compliant {d['target_not_compliant']})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=40, help="harmful requests (and at most this many benign ones)")
    ap.add_argument("--samples", type=int, default=2, help="sampled replies per harmful request")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--depths", default="0,5,10,25,50")
    ap.add_argument("--jailbreak-n", default="1,2,4,8")
    ap.add_argument("--dpo", default="runs/bench_hh_losses/dpo/final", help="the DPO model (made when absent)")
    ap.add_argument("--train", type=int, default=128, help="when the DPO model is made: training pairs")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_safety_hh")
    args = smoke.parse_args(
        ap, prompts=4, samples=2, max_new_tokens=6, depths="0,2", jailbreak_n="1,2", train=8, steps=1
    )
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh()

    from alignkit.eval.run import EvalConfig, run_eval
    from alignkit.eval.safety import SafetySettings
    from alignkit.eval.safety_inputs import SafetyPlan
    from alignkit.generation.decode import SamplingParams
    from alignkit.models import DEFAULT_MODEL
    from alignkit.report import build_report

    base = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    rows, skipped = hh_data.usable_rows(hh)
    held = hh_data.write_rows(out / "data" / "heldout.jsonl", [r for _, r in rows[-200:]])
    model = dpo_model(base, rows, out, args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    depths = tuple(int(x) for x in args.depths.split(","))
    ns = tuple(int(x) for x in args.jailbreak_n.split(","))
    plan = SafetyPlan(
        str(held),
        num_prompts=args.prompts,
        settings=SafetySettings(params=params, samples=args.samples, depths=depths, jailbreak_n=ns),
    )
    start = time.perf_counter()
    cfg = EvalConfig(model=model, reference=base, safety=plan, output_dir=str(out / "eval"), batch_size=16)
    sf = run_eval(cfg)["safety"]
    build_report(out / "eval")
    ag = sf["judge_agreement"]
    print(f"{len(skipped)} malformed HH rows skipped; {time.perf_counter() - start:.0f} s of evaluation")
    print(f"judge {sf['judge']}: agreement {ag['accuracy']:.3f} [{ag['lo']:.3f}, {ag['hi']:.3f}], kappa {ag['kappa']}")
    print_table(sf)
    b, a = sf["reference"], sf["model"]
    k, n = depths[-1], max(ns)
    rate = lambda m, i: m["refusal_at_depth"]["curve"][i]["rate"]  # noqa: E731
    fmt = lambda x: "nan" if x is None else f"{x:.3f}"  # noqa: E731
    print(
        f"harmful_greedy before={fmt(b['harmful_compliance']['greedy']['rate'])} "
        f"after={fmt(a['harmful_compliance']['greedy']['rate'])} "
        f"over_refusal before={fmt(b['over_refusal']['rate'])} after={fmt(a['over_refusal']['rate'])} "
        f"refusal_at_{k} before={fmt(rate(b, -1))} after={fmt(rate(a, -1))} "
        f"asr_at_{n} before={fmt(b['jailbreak']['curve'][-1]['asr'])} after={fmt(a['jailbreak']['curve'][-1]['asr'])} "
        f"n={len(plan.harmful)}"
    )


if __name__ == "__main__":
    main()
