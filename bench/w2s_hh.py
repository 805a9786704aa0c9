"""Weak-to-strong on HH-RLHF harmless: a few blocks of SmolLM2-135M-Instruct supervise the whole
model (`alignkit w2s`): accuracies of the weak supervisor, the two students (plain, and with the
auxiliary confidence loss) and the strong ceiling, PGR with bootstrap intervals, and the
deception splits.

    python bench/w2s_hh.py [--weak-blocks 4] [--epochs 10] [--lr 3e-4] [--max-length 256]

The weak model is SmolLM2's embeddings, first `--weak-blocks` of its 30 blocks and final norm (saved
once to OUT/weak_model); the strong one is the whole model. Both are reward models trained head
only (every block frozen: a linear probe on the trunk's last hidden state, as in reward_model_hh.py,
and the setting Burns et al. also report, arXiv 2312.09390), `--epochs` epochs at `--lr`. The pairs
are the usable rows of ../shared/data/hh_rlhf_harmless/dev.jsonl, split 0.4 / 0.4 / 0.2 into weak
training, transfer and test, each pair's replies in random order. Last line: `weak=<a> student=<b>
student_conf=<c> ceiling=<d> pgr=<e> pgr_conf=<f> n=<n>`. `--smoke` (examples/smoke.py): the same
run in seconds, a tiny model (1 of its 2 blocks for the weak one) and synthetic pairs.
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


def truncated(model: str, blocks: int, out: Path) -> Path:
    """`model` with only its first `blocks` transformer blocks (embeddings, norm and head kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models import resolve_model_path

    if (out / "config.json").is_file():
        return out
    path = resolve_model_path(model)
    lm = AutoModelForCausalLM.from_pretrained(path)
    lm.model.layers = lm.model.layers[:blocks]
    lm.config.num_hidden_layers = blocks
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:blocks]
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weak-blocks", type=int, default=4)
    ap.add_argument("--strong-blocks", type=int, default=30, help="the strong model's blocks (all frozen)")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_w2s_hh")
    args = smoke.parse_args(ap, weak_blocks=1, strong_blocks=2, epochs=1.0, max_length=64)
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out, n=60) if args.smoke else hh_data.require_hh()

    from alignkit.models import DEFAULT_MODEL
    from alignkit.w2s import W2SConfig, run_w2s, summary_lines

    strong = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    weak = truncated(strong, args.weak_blocks, out / "weak_model")
    common = [
        f"data.max_length={args.max_length}",
        f"train.epochs={args.epochs}",
        f"train.learning_rate={args.lr}",
        "train.batch_size=16",
        "train.eval_batch_size=16",
        "train.report_to=[]",
    ]
    start = time.perf_counter()
    s = run_w2s(
        W2SConfig(
            weak=str(weak),
            strong=str(strong),
            data=str(hh),
            output_dir=str(out / "w2s"),
            overrides=common,
            weak_overrides=[f"model.freeze_layers={args.weak_blocks}"],
            strong_overrides=[f"model.freeze_layers={args.strong_blocks}"],
            progress=False,
        )
    )
    print(f"{time.perf_counter() - start:.0f} s; pairs {s['pairs']}, {s['skipped_records']} malformed rows skipped")
    for line in summary_lines(s):
        print(line)
    fmt = lambda x: "nan" if x is None else f"{x:.3f}"  # noqa: E731
    for stage in ("student", "student_conf"):
        d = s["deception"][stage]
        cell = lambda k: f"{fmt(d[k]['value'])} [{fmt(d[k]['lo'])}, {fmt(d[k]['hi'])}] (n={d[k]['n']})"  # noqa: E731
        print(
            f"{stage}: copies weak errors {cell('copies_weak_errors')}; error where the ceiling is right: "
            f"weak right {cell('error_where_strong_knows_weak_right')}, "
            f"weak wrong {cell('error_where_strong_knows_weak_wrong')}"
        )
    a, p = s["accuracy"], s["pgr"]
    print(
        f"weak={fmt(a['weak']['value'])} student={fmt(a['student']['value'])} "
        f"student_conf={fmt(a['student_conf']['value'])} ceiling={fmt(a['ceiling']['value'])} "
        f"pgr={fmt(p['student']['value'])} pgr_conf={fmt(p['student_conf']['value'])} n={a['weak']['n']}"
    )


if __name__ == "__main__":
    main()
