"""A process reward model on GSM8K with steps labelled by `alignkit data steps` (Math-Shepherd), against
an outcome reward model and majority vote for best-of-N, all from SmolLM2-135M-Instruct samples.

    python bench/prm_gsm8k.py [--train 40] [--heldout 48] [--solutions 3] [--rollouts 4] [--n 8]

Questions: the short ones of GSM8K (a reference solution of at most `--max-lines` lines, the
`#### <answer>` line included): the first `--train` of the train split for labels, the first
`--heldout` of the test split for best-of-N. The generator (SmolLM2-135M-Instruct, temperature 0.7,
up to 128 new tokens, a system prompt asking for one step per line and `#### <number>` last)
writes `--solutions` solutions per training question; a solution is cut after its first `####`
line and split into steps at newlines. The reference solution (calculator notes removed) is added
to each question's records, a departure from Math-Shepherd, which labels the generator's solutions
only: this model answers about 2% of these questions right, so without the references nearly
every label would be 0. `alignkit data steps` then labels every step from `--rollouts`
continuations of its prefix (hard labels: any continuation reaches the answer; the last step: the
solution's own answer), checked by `numeric_match`.

Models, both `recipe: prm` from SmolLM2-135M-Instruct with a new scalar head, 2 epochs of 8
records at 2e-5: the PRM on the step labels, and an outcome reward model (ORM; Cobbe et al.'s
verifier, arXiv 2110.14168) on the same solutions as one step each, labelled by whether the answer
is right, read at the reply's last token (`aggregate: last`). The labelled questions' last quarter
is held out: step accuracy (the PRM's score above 1/2 exactly when the hard label is 1, 95% Wilson)
beside the share of the majority label, which a constant would reach.

Best-of-N: `--n` samples per held-out question from the same generator, one pick by each of the
PRM (the minimum over steps, PRM800K's choice), the ORM, and majority vote over final answers
(ties: the earlier sample); accuracy with 95% Wilson intervals, beside the first sample's (N=1)
and pass@N (any sample right), and the PRM's paired difference from majority vote and from the
ORM (95% bootstrap over questions). Last line: `bon_accuracy prm=<p> orm=<o> majority=<m>
first=<f> pass_at_n=<a> step_accuracy=<s> n=<questions>`. `--smoke` (examples/smoke.py): the same
code in seconds, a tiny model and synthetic sums.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402

SYSTEM = (
    "Solve the math problem step by step, one step per line. End with the final answer on its own line "
    "as: #### <number>"
)


def solution_steps(text: str) -> list[str]:
    """A sampled solution's steps: its lines up to and including the first with `####` (the model
    tends to repeat the answer line until its token budget runs out)."""
    steps = []
    for line in text.splitlines():
        if line.strip():
            steps.append(line.strip())
            if "####" in line:
                break
    return steps or ["(empty)"]


def short_questions(path: Path, max_lines: int, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if len(hh_data.gsm8k_steps(r["answer"])) <= max_lines][:n]


def prompt_of(row: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}]


def sample(lm, rows: list, n: int, seed: int) -> list[list[str]]:
    from alignkit.generation.decode import SamplingParams

    params = SamplingParams(max_new_tokens=128, temperature=0.7, n=n)
    return lm.chat([prompt_of(r) for r in rows], params, seed=seed)


def label(base: str, records: list, out: Path, args) -> list[dict]:
    """`alignkit data steps` on `records` (each with its steps), in a process of its own, as a user runs it."""
    data = hh_data.write_rows(out / "data" / "to_label.jsonl", records)
    labelled = out / "data" / "labelled.jsonl"
    cmd = [sys.executable, "-m", "alignkit", "data", "steps", "--data", str(data), "--out", str(labelled)]
    cmd += ["--model", base, "--rollouts", str(args.rollouts), "--max-new-tokens", "96", "--temperature", "0.7"]
    cmd += ["--batch-size", "64", "--seed", "0", "--no-progress"]
    if labelled.is_file():  # a finished earlier run with the same settings is reused, else refused
        cmd.append("--resume")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and "finished" not in proc.stderr:
        sys.exit(f"alignkit data steps failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in labelled.read_text().splitlines() if line.strip()]


def train_prm(base: str, records: list, name: str, out: Path, args) -> str:
    from alignkit.config import load_config
    from alignkit.train.loop import train

    data = hh_data.write_rows(out / "data" / f"{name}.jsonl", records)
    cfg = load_config(
        None,
        [
            "recipe=prm",
            f"model.name_or_path={base}",
            f"data.train={data}",
            "data.eval_fraction=0",
            f"data.max_length={args.max_length}",
            "train.epochs=2",
            "train.batch_size=8",
            f"train.learning_rate={args.lr}",
            "train.report_to=[]",
            f"output_dir={out / name}",
        ],
    )
    return str(train(cfg, progress=False).final_dir)


def paired_ci(a: np.ndarray, b: np.ndarray) -> str:
    from alignkit.eval.metrics import bootstrap_mean_ci

    mean, lo, hi = bootstrap_mean_ci(a - b)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=40, help="training questions to label")
    ap.add_argument("--heldout", type=int, default=48, help="test questions for best-of-N")
    ap.add_argument("--solutions", type=int, default=3, help="sampled solutions per training question")
    ap.add_argument("--rollouts", type=int, default=4, help="continuations from each step prefix")
    ap.add_argument("--n", type=int, default=8, help="samples per question for best-of-N")
    ap.add_argument("--max-lines", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--out", default="runs/bench_prm_gsm8k")
    args = smoke.parse_args(ap, train=8, heldout=4, solutions=1, rollouts=1, n=2, max_length=96)
    out = ROOT / args.out

    from alignkit.eval.metrics import wilson_interval
    from alignkit.generation.text_models import text_model
    from alignkit.models import DEFAULT_MODEL
    from alignkit.rewards.build import build_reward
    from alignkit.rewards.verifiable import final_answer, numbers_equal

    if args.smoke:
        train_path = test_path = hh_data.smoke_gsm8k(out)
    else:
        test_path = hh_data.require_gsm8k()
        train_path = test_path.with_name("train.jsonl")
    base = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    start = time.perf_counter()
    lm = text_model(base, batch_size=64)
    train_rows = short_questions(train_path, args.max_lines, args.train)
    sampled = sample(lm, train_rows, args.solutions, seed=0)
    records = []
    for q, (row, texts) in enumerate(zip(train_rows, sampled)):
        for steps in [hh_data.gsm8k_steps(row["answer"])] + [solution_steps(t) for t in texts]:
            records.append({"prompt": prompt_of(row), "answer": row["answer"], "steps": steps, "question": q})
    labelled = label(base, records, out, args)
    t_label = time.perf_counter() - start
    n_steps = sum(len(r["steps"]) for r in labelled)
    right = sum(sum(r["hard"]) for r in labelled)
    sampled_right = sum(r["solution_correct"] for k, r in enumerate(labelled) if k % (args.solutions + 1))
    print(
        f"labelled {len(labelled)} solutions ({len(train_rows)} references), {n_steps} steps, {int(right)} labelled "
        f"right; sampled solutions right: {sampled_right} of {len(train_rows) * args.solutions} "
        f"({t_label / 60:.1f} min)",
        flush=True,
    )

    cut = len(train_rows) - max(1, len(train_rows) // 4)  # the last quarter of the questions is held out
    fit = [r for r in labelled if r["question"] < cut]
    held = [r for r in labelled if r["question"] >= cut]
    prm_dir = train_prm(base, [{k: r[k] for k in ("prompt", "steps", "labels")} for r in fit], "prm", out, args)
    orm_records = [
        {"prompt": r["prompt"], "steps": ["\n".join(r["steps"])], "labels": [float(r["solution_correct"])]} for r in fit
    ]
    orm_dir = train_prm(base, orm_records, "orm", out, args)
    prm, orm = build_reward({"name": prm_dir, "aggregate": "min"}), build_reward({"name": orm_dir, "aggregate": "last"})

    scores = prm.step_scores([r["prompt"] for r in held], ["\n".join(r["steps"]) for r in held])
    pairs = [(s > 0.5, lab >= 0.5) for r, ss in zip(held, scores) for s, lab in zip(ss, r["hard"])]
    n_held = len(pairs)
    step_acc = sum(p == y for p, y in pairs) / n_held
    majority_share = max(sum(y for _, y in pairs), n_held - sum(y for _, y in pairs)) / n_held
    lo, hi = wilson_interval(step_acc * n_held, n_held)
    print(
        f"held-out steps: {n_held} ({len(held)} solutions of {len(train_rows) - cut} questions); PRM step accuracy "
        f"{step_acc:.3f} [{lo:.3f}, {hi:.3f}]; the majority label's share {majority_share:.3f}",
        flush=True,
    )

    test_rows = short_questions(test_path, args.max_lines, args.heldout)
    candidates = sample(lm, test_rows, args.n, seed=1)
    flat_prompts = [prompt_of(r) for r, c in zip(test_rows, candidates) for _ in c]
    flat_texts = ["\n".join(solution_steps(t)) for c in candidates for t in c]
    prm_scores = np.array(prm(flat_prompts, flat_texts)).reshape(len(test_rows), args.n)
    orm_scores = np.array(orm(flat_prompts, flat_texts)).reshape(len(test_rows), args.n)
    picks = {name: [] for name in ("prm", "orm", "majority", "first", "pass_at_n")}
    for q, (row, cands) in enumerate(zip(test_rows, candidates)):
        gold = final_answer(row["answer"])
        texts = ["\n".join(solution_steps(t)) for t in cands]
        ok = [numbers_equal(final_answer(t), gold) for t in texts]
        answers = [final_answer(t) for t in texts]
        counts = Counter(a for a in answers if a is not None)
        vote = answers.index(max(counts, key=lambda a: (counts[a], -answers.index(a)))) if counts else 0
        picks["prm"].append(ok[int(np.argmax(prm_scores[q]))])
        picks["orm"].append(ok[int(np.argmax(orm_scores[q]))])
        picks["majority"].append(ok[vote])
        picks["first"].append(ok[0])
        picks["pass_at_n"].append(any(ok))
    acc = {k: np.array(v, dtype=float) for k, v in picks.items()}
    n = len(test_rows)
    print(f"\nbest-of-{args.n} on {n} held-out questions\n\n| pick | accuracy [95% Wilson] |\n| --- | --- |")
    for k, v in acc.items():
        lo, hi = wilson_interval(v.sum(), n)
        print(f"| {k} | {v.mean():.3f} [{lo:.3f}, {hi:.3f}] |")
    print(f"\nPRM - majority: {paired_ci(acc['prm'], acc['majority'])}; PRM - ORM: {paired_ci(acc['prm'], acc['orm'])}")
    results = {k: float(v.mean()) for k, v in acc.items()}
    results.update(
        step_accuracy=step_acc, step_majority_share=majority_share, n=n, minutes=(time.perf_counter() - start) / 60
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"bon_accuracy prm={results['prm']:.3f} orm={results['orm']:.3f} majority={results['majority']:.3f} "
        f"first={results['first']:.3f} pass_at_n={results['pass_at_n']:.3f} step_accuracy={step_acc:.3f} n={n}"
    )


if __name__ == "__main__":
    main()
