"""Train a Bradley-Terry reward model on SmolLM2-135M-Instruct with HH-RLHF harmless pairs; report
held-out accuracy next to the untrained model's own ranking accuracy (the baseline to beat).

    python bench/reward_model_hh.py [--freeze-layers 30] [--max-length 256] [--epochs 10] [--lr 3e-4]
                                    [--lora-r R [--lp-ft]] [--seed S]

Data: ../shared/data/hh_rlhf_harmless/dev.jsonl (not shipped; exits with a message when absent).
Train on its first 1000 rows, evaluate on the remaining 312 (malformed rows are skipped and
counted). The bottom `--freeze-layers` of the 30 blocks are frozen; at 30 (the default) the whole
trunk is, so its outputs are computed once and the head trains on them for `--epochs` epochs in
seconds. (With 20 frozen blocks, one epoch took 38.5 min and reached 0.555 [0.499, 0.609].)
With `--lora-r R`, the blocks above the frozen ones train LoRA adapters of rank R (alpha 2R)
instead of all their weights, and the head trains whole; with `--lp-ft` too, each LoRA run starts
from a model of its kind whose head alone was trained first (LP-FT, Kumar et al., arXiv 2202.10054:
a fitted head keeps the trunk's features from being bent to serve a random one).
Baseline: does the untrained causal LM give chosen a higher summed (or per-token mean) log-prob
than rejected? Last line: `heldout_accuracy=<x> ci95=<lo>,<hi> n=<n>`. `--smoke`
(examples/smoke.py): the same run in seconds, a tiny model (2 blocks, all frozen) and synthetic pairs.

With `--odin`, a second reward model with the same settings and `reward.disentangle: length`
(ODIN, arXiv 2402.07319) is trained (one per `--length-coefs` value; head-only runs share the
trunk outputs the first run cached), and all are scored on the held-out pairs by `alignkit eval`'s
length-bias section (an ODIN model by its quality head): accuracy overall, when the chosen reply
is the longer and when it is the shorter one, and the reward's correlation with reply length.
Last line then: `plain_acc=<a> odin_acc=<b> plain_gap=<c> odin_gap=<d> plain_len_corr=<e>
odin_len_corr=<f>` (gap: accuracy when chosen is shorter minus when it is longer; ODIN: the first
coefficient's model).
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
    ap.add_argument("--train-rows", type=int, default=1000, help="rows 1..N train, the rest are held out")
    ap.add_argument("--freeze-layers", type=int, default=30)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed (the head's initialisation, the data order)")
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA adapters of this rank on the unfrozen blocks (0: none)")
    ap.add_argument(
        "--lp-ft",
        action="store_true",
        help="with --lora-r: start each LoRA run from a model of the same kind whose head alone was trained first "
        "(every block frozen, 10 epochs at lr 3e-4): LP-FT, arXiv 2202.10054",
    )
    ap.add_argument("--out", default="runs/bench_reward_model_hh")
    ap.add_argument("--odin", action="store_true", help="also train an ODIN reward model and compare length bias")
    ap.add_argument("--skip-baseline", action="store_true", help="do not score the untrained LM's own ranking")
    ap.add_argument(
        "--length-coefs",
        default="1.0",
        help="--odin: reward.length_coef of each ODIN model, comma-separated (the last line reports the first)",
    )
    args = smoke.parse_args(ap, train_rows=8, freeze_layers=2, max_length=64, epochs=1.0, batch_size=4)
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out, n=2 * args.train_rows) if args.smoke else hh_data.require_hh()

    from alignkit.config import load_config
    from alignkit.eval.metrics import wilson_interval
    from alignkit.eval.run import EvalConfig, run_eval
    from alignkit.models import DEFAULT_MODEL
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    start = time.perf_counter()
    model = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    train_file, held_file, n_train, n_held, skipped = hh_data.write_split(out, args.train_rows, hh)
    print(
        f"HH-RLHF harmless: {len(skipped)} malformed rows skipped ({', '.join(loc for loc, _ in skipped)}); "
        f"train {n_train}, held-out {n_held}",
        flush=True,
    )

    base = (
        None
        if args.skip_baseline
        else run_eval(
            EvalConfig(
                model=model,
                data=str(held_file),
                max_length=args.max_length,
                batch_size=16,
                output_dir=str(out / "baseline"),
                progress=False,
            )
        )["preference"]
    )
    t_base = time.perf_counter() - start
    if args.lp_ft and not args.lora_r:
        sys.exit("--lp-ft starts LoRA runs from head-only models: give --lora-r too")
    common = [
        "recipe=reward",
        f"data.train={train_file}",
        f"data.eval={held_file}",
        f"data.max_length={args.max_length}",
        f"train.batch_size={args.batch_size}",
        f"seed={args.seed}",
        "train.eval_batch_size=16",
        "train.report_to=[]",
        "train.log_every=20",
    ]
    settings = common + [
        f"model.freeze_layers={args.freeze_layers}",
        f"train.epochs={args.epochs}",
        f"train.learning_rate={args.lr}",
    ]
    if args.lora_r:
        settings += ["lora.enabled=true", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}"]

    def initial_model(kind: list, name: str) -> list:
        """The model a run of this kind starts from: the base, or with --lp-ft the final model of a
        head-only run of the same kind (its head trained on the cached trunk outputs)."""
        if not args.lp_ft:
            return [f"model.name_or_path={model}"]
        from transformers import AutoConfig

        from alignkit.models import resolve_model_path

        blocks = AutoConfig.from_pretrained(resolve_model_path(model)).num_hidden_layers
        head_only = common + kind + [f"model.name_or_path={model}", f"model.freeze_layers={blocks}"]
        head_only += ["train.epochs=10", "train.learning_rate=3e-4", f"output_dir={out / f'head-{name}'}"]
        return [f"model.name_or_path={train(load_config(None, head_only), progress=False).final_dir}"]

    cfg = load_config(None, settings + initial_model([], "plain") + [f"output_dir={out / 'run'}"])
    result = train(cfg, progress=False)
    acc = read_metrics(result.run_dir, "eval")[-1]["accuracy"]
    lo, hi = wilson_interval(acc * n_held, n_held)
    elapsed = time.perf_counter() - start
    summary = {
        "heldout_accuracy": acc,
        "ci95": [lo, hi],
        "n": n_held,
        "n_train": n_train,
        "baseline_sum_logprob": base["ranking_accuracy"] if base else None,
        "baseline_mean_logprob": base["ranking_accuracy_mean_logprob"] if base else None,
        "seconds_total": round(elapsed),
        "seconds_baseline": round(t_base),
        "args": vars(args),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n| model | held-out accuracy [95% CI] | n |\n| --- | --- | --- |")
    for name, key in (
        ("untrained LM, summed log-prob", "ranking_accuracy"),
        ("untrained LM, mean log-prob", "ranking_accuracy_mean_logprob"),
    ):
        if base is None:
            continue
        b = base[key]
        print(f"| {name} | {b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] | {b['n']} |")
    print(
        f"| reward model ({n_train} pairs, {args.freeze_layers} blocks frozen"
        f"{f', LoRA r={args.lora_r}' if args.lora_r else ''}, {args.epochs:g} epochs) | {acc:.3f} "
        f"[{lo:.3f}, {hi:.3f}] | {n_held} |"
    )
    print(f"total {elapsed / 60:.1f} min (baseline {t_base / 60:.1f} min)")
    if not args.odin:
        print(f"heldout_accuracy={acc:.3f} ci95={lo:.3f},{hi:.3f} n={n_held}")
        return
    coefs = [float(c) for c in args.length_coefs.split(",")]
    finals = {"plain": result.final_dir}
    for c in coefs:  # each run reads the trunk outputs the plain run cached
        kind = ["reward.disentangle=length", f"reward.length_coef={c:g}"]
        odin = settings + kind + initial_model(kind, f"odin-{c:g}") + [f"output_dir={out / f'odin-{c:g}'}"]
        finals[f"odin-{c:g}"] = train(load_config(None, odin), progress=False).final_dir
    biases = {}
    for name, final in finals.items():
        from alignkit.rewards import build_reward

        report = run_eval(
            EvalConfig(
                model=model,
                data=str(held_file),
                max_length=args.max_length,
                batch_size=16,
                rewards=[build_reward(str(final), device="cpu")],
                output_dir=str(out / f"eval-{name}"),
                progress=False,
            )
        )
        acc_all, bias = report["preference"]["reward_accuracy"], report["length_bias"]
        longer, shorter = bias["accuracy_chosen_longer"], bias["accuracy_chosen_shorter"]
        gap = None if None in (shorter["value"], longer["value"]) else shorter["value"] - longer["value"]
        biases[name] = (acc_all["value"], gap, bias["corr_reward_length"])
        print(
            f"| {name} | {acc_all['value']:.3f} [{acc_all['ci95'][0]:.3f}, {acc_all['ci95'][1]:.3f}] "
            f"| chosen longer {_f(longer['value'])} (n={longer['n']}) | chosen shorter {_f(shorter['value'])} "
            f"(n={shorter['n']}) | r(reward, length) {_f(bias['corr_reward_length'])} |",
            flush=True,
        )
    (p, o) = biases["plain"], biases[f"odin-{coefs[0]:g}"]
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")
    print(
        f"plain_acc={p[0]:.3f} odin_acc={o[0]:.3f} plain_gap={_f(p[1])} odin_gap={_f(o[1])} "
        f"plain_len_corr={_f(p[2])} odin_len_corr={_f(o[2])}"
    )


def _f(x) -> str:
    """A number to 3 places; `nan` where it is undefined (no pair of that kind, a constant reward)."""
    return "nan" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
