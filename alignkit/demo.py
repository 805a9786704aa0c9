"""`alignkit demo`: align SmolLM2-135M-Instruct to follow formatting instructions, on CPU.

The steps, each timed:
  1. load the bundled model (de-quantized and cached on first use);
  2. greedy replies to the training requests and to the held-out prompts (the "before");
  3. preference pairs from the model's own training replies (`alignkit.demo_task.build_pairs`):
     chosen = the reply minimally edited to follow the instruction; rejected = the reply as it
     was, or with the word / phrase at the wrong end;
  4. DPO plus an NLL term on the chosen reply (as RPO, arXiv 2404.19733) with alignkit's own
     training loop and cached reference log-probs;
  5. greedy replies of the aligned model to the same held-out prompts (the "after"), written to
     results.json and, as the report's before/after table, to the run's before_after.json.
The score is judged by code (`alignkit.demo_task.judge`). The held-out prompts share no topic and
no required phrase with the training prompts. A 95% paired bootstrap interval over held-out
prompts says whether the change is larger than the noise; side checks report whether replies
still mention their topic and whether the model now reformats replies nobody asked it to.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from alignkit import demo_task, jsonfile
from alignkit.api import train
from alignkit.config import ModelConfig, load_config
from alignkit.eval.stats import paired_bootstrap
from alignkit.generation import SamplingParams, generate
from alignkit.models import DEFAULT_MODEL, default_model_dir, load_model, load_tokenizer
from alignkit.report import build_report
from alignkit.report.inputs import write_before_after

N_TRAIN = 96  # training requests; each usable reply gives two pairs (fix, misplace)
N_HELDOUT = 200  # held-out prompts: enough for a paired interval of about +-6 points
N_PLAIN = 50  # held-out requests without any instruction, for the unasked-formatting side check
GEN = SamplingParams(max_new_tokens=48)  # greedy: deterministic before/after
GEN_BATCH = 100
CONSTRAINT_LABELS = {"start_word": "begin with a word", "end_phrase": "end with a phrase"}

# DPO settings for the demo (measured; see docs/demo.md).
TRAIN_OVERRIDES = [
    "recipe=dpo",
    "losses=[{name: dpo, beta: 0.1, weight: 1.0}, {name: sft, weight: 1.0}]",
    "train.learning_rate=1e-5",
    "train.batch_size=8",
    "train.max_steps=16",
    "train.warmup_ratio=0.1",
    "train.lr_schedule=cosine",
    "data.eval_fraction=0",
    "data.max_length=192",
    "train.report_to=[]",
]


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"demo: {name}...", flush=True)

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.t, 1)

        return _Ctx()


def _replies(model, tok, prompts: list, progress: bool, desc: str) -> list[str]:
    return [r[0] for r in generate(model, tok, prompts, GEN, batch_size=GEN_BATCH, progress=progress, desc=desc)]


def _write_pairs(path: Path, items: list, replies: list) -> tuple[int, int]:
    """Write the pairs as ordinary alignkit preference data; return (pairs, requests skipped)."""
    pairs = demo_task.build_pairs(items, replies)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"prompt": p.messages, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    )
    used = sum(demo_task.usable_reply(i, r) for i, r in zip(items, replies))
    return len(pairs), len(items) - used


def _score(items: list, replies: list) -> dict:
    passed = [float(demo_task.judge(i, r)) for i, r in zip(items, replies)]
    by = {c: [p for i, p in zip(items, passed) if i.constraint == c] for c in demo_task.CONSTRAINTS}
    return {
        "passed": passed,
        "by_constraint": {c: sum(v) / len(v) for c, v in by.items() if v},
        "mentions_topic": sum(demo_task.mentions_topic(i, r) for i, r in zip(items, replies)) / len(items),
    }


def run_demo(
    output_dir: str = "runs/demo", seed: int = 0, progress: bool = True, overrides: list | None = None
) -> dict:
    """The demo; `overrides` (KEY=VALUE) change its training settings (checked before anything runs)."""
    start = time.perf_counter()
    overrides = list(overrides or [])
    load_config(
        None, TRAIN_OVERRIDES + overrides + ["data.train=pairs.jsonl"]
    )  # a bad key fails now, not after replies
    out = Path(output_dir)
    timer = _Timer()
    torch.manual_seed(seed)
    train_items = demo_task.train_prompts(N_TRAIN, seed)
    heldout = demo_task.heldout_prompts(N_HELDOUT)  # fixed benchmark, independent of the run seed
    plain = heldout[:N_PLAIN]

    with timer("load model"):
        model_dir = default_model_dir()
        mcfg = ModelConfig(name_or_path=str(model_dir))
        tok, model = load_tokenizer(mcfg), load_model(mcfg, device=torch.device("cpu"), for_training=False)
    with timer("replies before training"):
        train_replies = _replies(model, tok, [i.plain_messages() for i in train_items], progress, "training requests")
        before_replies = _replies(model, tok, [i.messages() for i in heldout], progress, "held-out (before)")
        plain_before = _replies(model, tok, [i.plain_messages() for i in plain], progress, "no instruction (before)")
    del model
    n_pairs, n_skipped = _write_pairs(out / "data" / "train_pairs.jsonl", train_items, train_replies)
    print(
        f"demo: {n_pairs} preference pairs from {len(train_items)} training requests "
        f"({n_skipped} skipped: reply cut off, repetitive, too short or already compliant)",
        flush=True,
    )

    with timer("DPO training"):
        cfg = load_config(
            None,
            TRAIN_OVERRIDES
            + [
                f"model.name_or_path={model_dir}",
                f"data.train={out / 'data' / 'train_pairs.jsonl'}",
                f"output_dir={out / 'run'}",
                f"seed={seed}",
                *overrides,
            ],
        )
        result = train(cfg, progress=progress)
    with timer("replies after training"):
        fcfg = ModelConfig(name_or_path=str(result.final_dir))
        model = load_model(fcfg, device=torch.device("cpu"), for_training=False)
        after_replies = _replies(model, tok, [i.messages() for i in heldout], progress, "held-out (after)")
        plain_after = _replies(model, tok, [i.plain_messages() for i in plain], progress, "no instruction (after)")

    before, after = _score(heldout, before_replies), _score(heldout, after_replies)
    unasked = {
        "before": sum(map(demo_task.adds_unasked, plain_before)) / len(plain),
        "after": sum(map(demo_task.adds_unasked, plain_after)) / len(plain),
    }
    ci = paired_bootstrap(before["passed"], after["passed"], seed=seed)
    report = {
        "metric": "instruction_following",
        "model": DEFAULT_MODEL,
        "heldout_n": ci.n,
        "before": ci.before,
        "after": ci.after,
        "diff": ci.diff,
        "ci95": [ci.lo, ci.hi],
        "improved": ci.improved,
        "worsened": ci.worsened,
        "by_constraint": {"before": before["by_constraint"], "after": after["by_constraint"]},
        "mentions_topic": {"before": before["mentions_topic"], "after": after["mentions_topic"]},
        "unasked_formatting": unasked,
        "pairs": n_pairs,
        "train_steps": result.steps,
        "seed": seed,
        "overrides": overrides,
        "times_s": timer.times,
        "total_s": round(time.perf_counter() - start, 1),
        "aligned_model": str(result.final_dir),
        "before_after": before_after_section(heldout, before, after, unasked, len(plain), seed),
    }
    report_path = write_results(out, Path(result.run_dir), report)
    _write_samples(out / "samples.md", heldout, before_replies, after_replies)
    _print_report(report, out, report_path)
    return report


def _row(label: str, before: list, after: list, seed: int, **extra) -> dict:
    ci = paired_bootstrap(before, after, seed=seed)
    return {
        "label": label,
        "before": ci.before,
        "after": ci.after,
        "diff": ci.diff,
        "ci95": [ci.lo, ci.hi],
        "n": ci.n,
        "improved": ci.improved,
        "worsened": ci.worsened,
        **extra,
    }


def before_after_section(items: list, before: dict, after: dict, unasked: dict, n_plain: int, seed: int) -> dict:
    """The held-out measurement as the report's before/after section (`alignkit.report.inputs`):
    per constraint and overall, the pass rate before and after with a 95% paired bootstrap interval
    of the change, and the side checks."""
    rows = []
    for c in demo_task.CONSTRAINTS:
        idx = [k for k, item in enumerate(items) if item.constraint == c]
        if idx:
            rows.append(
                _row(
                    CONSTRAINT_LABELS.get(c, c),
                    [before["passed"][k] for k in idx],
                    [after["passed"][k] for k in idx],
                    seed,
                )
            )
    rows.append(_row("all", before["passed"], after["passed"], seed, overall=True))
    return {
        "alignkit_before_after": 1,
        "title": "Held-out instruction following",
        "description": f"Pass rate on {len(items)} held-out prompts whose topics, words and phrases never appear "
        "in training, each reply judged by code (`alignkit.demo_task.judge`); greedy decoding "
        "before and after; 95% paired bootstrap intervals over prompts.",
        "rows": rows,
        "side_checks": [
            {
                "label": "reply mentions its topic",
                "before": before["mentions_topic"],
                "after": after["mentions_topic"],
                "n": len(items),
            },
            {
                "label": "unasked reformatting (requests without an instruction)",
                "before": unasked["before"],
                "after": unasked["after"],
                "n": n_plain,
            },
        ],
    }


def write_results(out: Path, run_dir: Path, report: dict) -> Path:
    """Write results.json and the run's before_after.json (the same section), and rebuild the run's
    report so that it shows the before/after table; returns the report's path."""
    jsonfile.write_atomic(out / "results.json", report)
    write_before_after(run_dir, report["before_after"])
    return build_report(run_dir)


def _write_samples(path: Path, items: list, before: list, after: list, n: int = 24) -> None:
    lines = ["# Held-out replies before and after alignment", ""]
    for item, b, a in list(zip(items, before, after))[:n]:
        lines += [
            f"**{item.text}**",
            "",
            f"- before ({'pass' if demo_task.judge(item, b) else 'fail'}): {b}",
            f"- after ({'pass' if demo_task.judge(item, a) else 'fail'}): {a}",
            "",
        ]
    path.write_text("\n".join(lines))


def _print_report(r: dict, out: Path, report_path: Path) -> None:
    print()
    print(f"Held-out instruction following (n={r['heldout_n']} prompts, topics never seen in training):")
    print(f"  {'constraint':<12} {'before':>7} {'after':>7}")
    for c in demo_task.CONSTRAINTS:
        print(f"  {c:<12} {r['by_constraint']['before'][c]:>7.2f} {r['by_constraint']['after'][c]:>7.2f}")
    print(
        f"  {'all':<12} {r['before']:>7.3f} {r['after']:>7.3f}   change {r['diff']:+.3f}, "
        f"95% CI [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]; {r['improved']} prompts improved, {r['worsened']} worsened"
    )
    print(
        f"  side checks: reply mentions its topic {r['mentions_topic']['before']:.2f} -> "
        f"{r['mentions_topic']['after']:.2f}; "
        f"unasked reformatting {r['unasked_formatting']['before']:.2f} -> {r['unasked_formatting']['after']:.2f}"
    )
    print(f"  time: {r['total_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in r['times_s'].items())})")
    print(f"  results: {out / 'results.json'}; examples: {out / 'samples.md'}; aligned model: {r['aligned_model']}")
    print(f"  report with the before/after table: {report_path}")
    print(f"demo: {r['metric']} before={r['before']:.3f} after={r['after']:.3f} heldout_n={r['heldout_n']}")
