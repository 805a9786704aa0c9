"""Mask-DPO against DPO on GSM8K worked solutions whose steps are labelled right or wrong: which one
teaches the model to prefer a right step to a wrong one on questions it has not seen.

    python bench/mask_dpo_gsm8k.py [--train 256] [--heldout 150] [--steps 32] [--lr 2e-5]

Why GSM8K: Mask-DPO (Gu et al., arXiv 2503.02846) needs sentence-level correctness labels, which
HH-RLHF lacks; a worked GSM8K solution has them for free once a step is corrupted on purpose. Each
reference solution (GSM8K's calculator notes `<<...>>` removed) is split into lines, one step each.
A corrupted step has the last number of its line replaced by a wrong one (the right value plus a
non-zero offset in [-10, 10], kept non-negative), and is labelled incorrect; every other line is
labelled correct. A training pair is one question's solution twice: the chosen copy with c
corrupted steps (c = 0 or 1, even odds), the rejected copy with c + 1, at other steps where the
solution has enough. So the chosen reply is the better one, as a response-level annotator would
rank them by their share of wrong steps (the paper's setting), yet half the chosen replies hold a
wrong step and every rejected reply holds right ones: DPO raises and lowers those too, Mask-DPO
(`recipe: masked`, `loss.name: mask_dpo`) scores only the chosen reply's right steps and the
rejected reply's wrong ones.

Training: GSM8K's train split, the first `--train` rows with at least two lines with a number;
SmolLM2-135M-Instruct, `--steps` steps of 8 pairs at `--lr` (cosine), beta 0.1, the same pairs in
the same order for both losses. The yardstick, the same for all: GSM8K's test split, the last
`--heldout` rows; for every line with a number, the model's summed log-prob of the right line
against the corrupted line after the same right prefix (the question in the chat template, the
earlier lines right). Step accuracy is the share of held-out steps where the right line is more
likely (95% Wilson); the change against the untrained model is a paired bootstrap over questions
(95%). Last line: `step_accuracy base=<b> dpo=<d> mask_dpo=<m> n=<steps>`. `--smoke`
(examples/smoke.py): the same run in seconds, a tiny model and synthetic sums.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402

NUMBER = re.compile(r"\d+(?:\.\d+)?")


def numbered(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if NUMBER.search(line)]


def corrupt(line: str, rng: random.Random) -> str:
    """`line` with its last number replaced by a wrong one (an integer offset of 1-10 either way,
    never negative; the decimals kept as written)."""
    last = list(NUMBER.finditer(line))[-1]
    value = float(last.group())
    offsets = [d for d in range(-10, 11) if d and value + d >= 0]
    wrong = value + rng.choice(offsets)
    decimals = len(last.group().partition(".")[2])
    text = f"{wrong:.{decimals}f}" if decimals else str(int(wrong))
    return line[: last.start()] + text + line[last.end() :]


def training_pair(question: str, lines: list[str], rng: random.Random) -> dict:
    """One question's solution as a sentence-labelled pair: chosen with c in {0, 1} corrupted
    steps, rejected with c + 1 (at steps the chosen copy has right where there are enough)."""
    spots = numbered(lines)
    chosen_bad = set(rng.sample(spots, rng.randint(0, 1)))
    free = [i for i in spots if i not in chosen_bad]
    pool = free if len(free) >= len(chosen_bad) + 1 else spots
    rejected_bad = set(rng.sample(pool, len(chosen_bad) + 1))

    def sentences(bad: set) -> list[dict]:
        last = len(lines) - 1
        return [
            {"text": (corrupt(line, rng) if i in bad else line) + ("" if i == last else "\n"), "correct": i not in bad}
            for i, line in enumerate(lines)
        ]

    return {
        "prompt": question,
        "chosen_sentences": sentences(chosen_bad),
        "rejected_sentences": sentences(rejected_bad),
    }


def as_plain_pair(rec: dict) -> dict:
    """The same pair for DPO: the replies as whole texts, labels dropped."""
    text = lambda side: "".join(s["text"] for s in rec[side])  # noqa: E731
    return {"prompt": rec["prompt"], "chosen": text("chosen_sentences"), "rejected": text("rejected_sentences")}


def probe_records(question: str, lines: list[str], rng: random.Random) -> list[dict]:
    """One record per step with a number: the right line against its corruption after the same right
    prefix, scored on that line only (the masked format scores chosen's right and rejected's wrong
    sentences)."""
    out = []
    for i in numbered(lines):
        prefix = "".join(line + "\n" for line in lines[:i])
        head = [{"text": prefix, "correct": False}] if prefix else []
        out.append(
            {
                "prompt": question,
                "chosen_sentences": head + [{"text": lines[i], "correct": True}],
                "rejected_sentences": [{**h, "correct": True} for h in head]
                + [{"text": corrupt(lines[i], rng), "correct": False}],
            }
        )
    return out


def step_right(model_dir: str, items: list, pad_id: int) -> np.ndarray:
    """1.0 where the right line is more likely than the corrupted one, per probe item."""
    from alignkit.config import ModelConfig
    from alignkit.eval.run import pair_tables
    from alignkit.models import load_model

    model = load_model(ModelConfig(name_or_path=model_dir, dtype="float32"), for_training=False).eval()
    table = pair_tables(model, items, pad_id, 16)
    return (table[:, 0] > table[:, 1]).double().numpy()


def cluster_bootstrap(change: np.ndarray, owner: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple:
    """95% interval of the mean of `change` (per step) resampling whole questions (`owner`), since
    the steps of one question are not independent."""
    groups = [change[owner == q] for q in np.unique(owner)]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        sample = np.concatenate([groups[i] for i in pick])
        means.append(sample.mean())
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=150)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--out", default="runs/bench_mask_dpo_gsm8k")
    args = smoke.parse_args(ap, train=8, heldout=4, steps=1, max_length=64)
    out = ROOT / args.out

    from alignkit.config import ModelConfig, load_config
    from alignkit.data.masked import load_masked_examples, tokenize_masked_pairs
    from alignkit.eval import metrics as M
    from alignkit.models import DEFAULT_MODEL, load_tokenizer
    from alignkit.train.loop import train

    if args.smoke:
        train_path = held_path = hh_data.smoke_gsm8k(out)
    else:
        held_path = hh_data.require_gsm8k()
        train_path = held_path.with_name("train.jsonl")
    base = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    rng = random.Random(0)
    rows = [json.loads(line) for line in train_path.read_text().splitlines() if line.strip()]
    usable = [(r["question"], hh_data.gsm8k_steps(r["answer"])) for r in rows]
    usable = [(q, lines) for q, lines in usable if len(numbered(lines)) >= 2][: args.train]
    masked = [training_pair(q, lines, rng) for q, lines in usable]
    n_bad = sum(not s["correct"] for r in masked for s in r["chosen_sentences"])
    print(f"{len(masked)} training pairs; {n_bad} of their chosen replies hold a wrong step", flush=True)
    files = {
        "mask_dpo": hh_data.write_rows(out / "data" / "masked.jsonl", masked),
        "dpo": hh_data.write_rows(out / "data" / "pairs.jsonl", [as_plain_pair(r) for r in masked]),
    }
    held_rows = [json.loads(line) for line in held_path.read_text().splitlines() if line.strip()][-args.heldout :]
    probes, owner = [], []
    for q, r in enumerate(held_rows):
        recs = probe_records(r["question"], hh_data.gsm8k_steps(r["answer"]), rng)
        probes += recs
        owner += [q] * len(recs)
    owner = np.array(owner)
    probe_file = hh_data.write_rows(out / "data" / "heldout_steps.jsonl", probes)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=base))
    items, _ = tokenize_masked_pairs(load_masked_examples(str(probe_file)).examples, tokenizer, args.max_length)
    before = step_right(base, items, tokenizer.pad_token_id)
    results = {"base": {"right": before, "seconds": 0.0}}
    for method, recipe in (("dpo", "dpo"), ("mask_dpo", "masked")):
        start = time.perf_counter()
        cfg = load_config(
            None,
            [
                f"recipe={recipe}",
                f"model.name_or_path={base}",
                f"data.train={files[method]}",
                "data.eval_fraction=0",
                f"data.max_length={args.max_length}",
                f"loss.name={method}",
                "loss.beta=0.1",
                f"train.max_steps={args.steps}",
                "train.batch_size=8",
                f"train.learning_rate={args.lr}",
                "train.report_to=[]",
                f"output_dir={out / method}",
            ],
        )
        final = str(train(cfg, progress=False).final_dir)
        results[method] = {"right": step_right(final, items, tokenizer.pad_token_id)}
        results[method]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{method}: held-out step accuracy {results[method]['right'].mean():.3f}", flush=True)

    n = len(items)
    summary = {}
    print(
        f"\n{len(held_rows)} held-out questions, {n} steps\n\n| model | step accuracy [95% Wilson] "
        "| change vs untrained [95% bootstrap over questions] | time (s) |\n| --- | --- | --- | --- |"
    )
    for method, r in results.items():
        acc = float(r["right"].mean())
        lo, hi = M.wilson_interval(float(r["right"].sum()), n)
        change = r["right"] - before
        clo, chi = cluster_bootstrap(change, owner)
        summary[method] = {"accuracy": acc, "ci95": [lo, hi], "change": float(change.mean()), "change_ci95": [clo, chi]}
        delta = "-" if method == "base" else f"{change.mean():+.3f} [{clo:+.3f}, {chi:+.3f}]"
        print(f"| {method} | {acc:.3f} [{lo:.3f}, {hi:.3f}] | {delta} | {r['seconds']:.0f} |")
    (out / "results.json").write_text(json.dumps({"n_steps": n, "n_questions": len(held_rows), **summary}, indent=2))
    print(
        f"step_accuracy base={summary['base']['accuracy']:.3f} dpo={summary['dpo']['accuracy']:.3f} "
        f"mask_dpo={summary['mask_dpo']['accuracy']:.3f} n={n}"
    )


if __name__ == "__main__":
    main()
