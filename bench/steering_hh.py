"""Steering SmolLM2-135M-Instruct toward the chosen replies of the shared HH-RLHF harmless pairs,
measured as Wolf et al. ("Tradeoffs Between Alignment and Helpfulness in Language Models with
Representation Engineering", arXiv 2401.16332) measure it.

    python bench/steering_hh.py [--fit-rows 1000] [--prompts 64] [--layers 10 15 20]

1. `alignkit steer fit`: difference-of-means directions between the chosen and rejected replies'
   hidden states (mean over the reply's tokens) at --layers, on usable HH rows 1..fit-rows.
2. `alignkit eval --steer-sweep paper` (-8 .. 8, both signs, fine steps near 0; relative norm:
   strength 1 adds each layer's mean-difference vector, whose absolute norm is printed) with
   - behaviour: the harmful requests of the next --prompts HH rows (never seen by the fit), one
     sampled reply each (temperature 0.7, 48 tokens), judged refusal or compliance by alignkit's
     rule (`alignkit.rewards.refusal`); the rate is refusals minus compliances, in [-1, 1];
   - helpfulness: accuracy on --prompts GSM8K test questions (../shared/data/gsm8k/test.jsonl) as
     multiple choice scored from log-probs: the right final answer against three wrong numbers
     made from it (+1, x2, -1 of the answer or their nearest distinct positive values), each choice
     the reply "The answer is N.";
   - diagnostics: the teacher-forced log-prob margin on those HH pairs and the per-token NLL of
     the GSM8K worked answers;
   and the paper's fits: tanh for the behaviour rate, h0 / (1 + k s^2) for the accuracy, each
   beside a line and a quadratic, with R^2.
Last line: `behaviour_tanh_r2=<r2> behaviour_line_r2=<r2> accuracy_invquad_r2=<r2>
accuracy_quadratic_r2=<r2> n=<prompts>`.
Needs ../shared/data (skips with a message otherwise). `--smoke` (examples/smoke.py): the same run in
seconds, a tiny model (layers 0 and 1) and synthetic data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))

import hh_data  # noqa: E402
import smoke  # noqa: E402


def multiple_choice(gsm: list, seed: int = 0) -> list:
    """GSM8K questions as 4-way multiple choice: the final answer and three wrong numbers near it."""
    from alignkit.rewards.verifiable import final_answer

    rng = random.Random(seed)
    out = []
    for g in gsm:
        answer = final_answer(g["answer"].split("####")[-1])
        value = int(float(answer))
        wrong = []
        for cand in (value + 1, value * 2, value - 1, value + 2, value * 3, value + 10):
            if cand != value and cand > 0 and cand not in wrong:
                wrong.append(cand)
        choices = [value] + wrong[:3]
        rng.shuffle(choices)
        out.append(
            {
                "prompt": g["question"],
                "choices": [f"The answer is {c}." for c in choices],
                "answer": f"The answer is {value}.",
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-rows", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=64, help="harmful prompts, questions, pairs and answers each")
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 15, 20])
    ap.add_argument("--sweep", default="paper")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="runs/bench_steering")
    args = smoke.parse_args(ap, fit_rows=10, prompts=4, layers=[0, 1], sweep="-2,-1,0,1,2", max_new_tokens=4)
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh()
    gsm8k = hh_data.smoke_gsm8k(out) if args.smoke else hh_data.require_gsm8k()

    from alignkit.cli import main as alignkit
    from alignkit.data.formats import parse_preference_record
    from alignkit.models import default_model_dir

    rows, skipped = hh_data.usable_rows(hh)
    fit = hh_data.write_rows(out / "fit.jsonl", [r for _, r in rows[: args.fit_rows]])
    held = rows[args.fit_rows : args.fit_rows + args.prompts]
    pairs = hh_data.write_rows(out / "pairs.jsonl", [r for _, r in held])
    harmful = hh_data.write_rows(
        out / "harmful.jsonl", [{"prompt": list(parse_preference_record(r, f"hh:{i}").prompt)} for i, r in held]
    )
    gsm = [json.loads(line) for line in gsm8k.read_text().splitlines()[: args.prompts]]
    questions = hh_data.write_rows(out / "questions.jsonl", multiple_choice(gsm))
    answers = hh_data.write_rows(
        out / "answers.jsonl", [{"prompt": g["question"], "completion": g["answer"]} for g in gsm]
    )
    model = smoke.tiny_model_dir(out) if args.smoke else str(default_model_dir())
    start = time.perf_counter()
    assert (
        alignkit(
            [
                "steer",
                "fit",
                "--model",
                model,
                "--data",
                str(fit),
                "--layers",
                *map(str, args.layers),
                "--method",
                "mean_diff",
                "--out",
                str(out / "vectors"),
            ]
        )
        == 0
    )
    fit_min = (time.perf_counter() - start) / 60
    assert (
        alignkit(
            [
                "eval",
                "--model",
                model,
                "--steer",
                str(out / "vectors"),
                f"--steer-sweep={args.sweep}",
                "--behaviour-prompts",
                str(harmful),
                "--accuracy",
                str(questions),
                "--data",
                str(pairs),
                "--helpfulness",
                str(answers),
                "--num-prompts",
                str(args.prompts),
                "--max-length",
                "512",
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--temperature",
                "0.7",
                "--no-progress",
                "--output-dir",
                str(out / "eval"),
            ]
        )
        == 0
    )
    total = (time.perf_counter() - start) / 60
    sw = json.loads((out / "eval" / "metrics.json").read_text())["steering"]
    print(
        f"\nfit on {len(rows[: args.fit_rows])} usable HH rows ({len(skipped)} unusable rows of the file skipped) "
        f"in {fit_min:.1f} min; sweep on {sw['n_behaviour_prompts']} later HH prompts and pairs and "
        f"{sw['n_questions']} GSM8K questions; {total:.1f} min in all"
    )
    norms = sw["rows"][-1]["norm_by_layer"]
    top = max(abs(r["strength"]) for r in sw["rows"])
    print(
        "absolute norm added per unit of strength: " + ", ".join(f"layer {l}: {v / top:.2f}" for l, v in norms.items())
    )
    print(
        "| strength | behaviour (refusal - compliance) [95% CI] | refusal rate | MC accuracy | "
        "margin (diagnostic) | NLL/token (diagnostic) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in sw["rows"]:
        lo, hi = r["behaviour_ci95"]
        print(
            f"| {r['strength']:g} | {r['behaviour']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['refusal_rate']:.3f} | "
            f"{r['accuracy']:.3f} | {r['margin']:+.2f} | {r['nll']:.4f} |"
        )
    f = sw["fits"]

    def r2(group, name):
        v = f[group][name]["r2"]
        return "nan" if v is None else f"{v:.3f}"

    t = f["behaviour"]["tanh"]
    iq = f["accuracy"]["inverse_quadratic"]
    print(
        f"behaviour: tanh A {t['A']:+.3f} k {t['k']:.3f} s0 {t['s0']:+.2f} B {t['B']:+.3f} R² "
        f"{r2('behaviour', 'tanh')}; "
        f"line R² {r2('behaviour', 'line')}; quadratic R² {r2('behaviour', 'quadratic')}"
    )
    print(
        f"accuracy: h0/(1+k s²) h0 {iq['h0']:.3f} k {iq['k']:.4f} R² {r2('accuracy', 'inverse_quadratic')}; "
        f"line R² {r2('accuracy', 'line')}; quadratic R² {r2('accuracy', 'quadratic')}"
    )
    print(
        f"margin (diagnostic): line R² {r2('margin', 'line')}, quadratic R² {r2('margin', 'quadratic')}; "
        f"NLL loss (diagnostic): quadratic R² {r2('helpfulness_loss', 'quadratic')}"
    )
    print(
        f"behaviour_tanh_r2={r2('behaviour', 'tanh')} behaviour_line_r2={r2('behaviour', 'line')} "
        f"accuracy_invquad_r2={r2('accuracy', 'inverse_quadratic')} "
        f"accuracy_quadratic_r2={r2('accuracy', 'quadratic')} n={sw['n_behaviour_prompts']}"
    )


if __name__ == "__main__":
    main()
