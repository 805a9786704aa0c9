"""The shared data files (../shared/data, not shipped): locate them, split the HH-RLHF harmless file
by rows; and their synthetic stand-ins for smoke runs (`--smoke`, examples/smoke.py)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = DATA / "hh_rlhf_harmless" / "dev.jsonl"
GSM8K = DATA / "gsm8k" / "test.jsonl"


def require_hh() -> Path:
    if not HH.is_file():
        sys.exit(f"skipped: {HH} not found (the benchmark needs the shared HH-RLHF data)")
    return HH


def require_gsm8k() -> Path:
    if not GSM8K.is_file():
        sys.exit(f"skipped: {GSM8K} not found (the benchmark needs the shared GSM8K data)")
    return GSM8K


def usable_rows(path: Path | None = None) -> tuple[list[tuple[int, dict]], list]:
    """(1-based line, record) of every row of the HH file (or `path`, a file in its format) that
    alignkit accepts, and the skipped (location, reason)s."""
    from alignkit.data.formats import load_preference_examples

    path = path or require_hh()
    result = load_preference_examples(str(path), on_bad_record="skip")
    good = {int(ex.source.rsplit(":", 1)[1]) for ex in result.examples}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(i, r) for i, r in enumerate(rows, start=1) if i in good], result.skipped


def write_split(out: Path, train_rows: int, path: Path | None = None) -> tuple[Path, Path, int, int, list]:
    """The usable rows 1..train_rows of the HH file (or `path`) into OUT/data/train.jsonl, the later
    ones into OUT/data/heldout.jsonl; returns the two files, their row counts and the skipped
    (location, reason)s."""
    rows, skipped = usable_rows(path)
    train = [r for i, r in rows if i <= train_rows]
    held = [r for i, r in rows if i > train_rows]
    out = Path(out) / "data"
    return (
        write_rows(out / "train.jsonl", train),
        write_rows(out / "heldout.jsonl", held),
        len(train),
        len(held),
        skipped,
    )


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def smoke_hh(out: Path, n: int = 1040) -> Path:
    """A synthetic stand-in for the HH file: n transcripts in its format (every third one two turns
    long), in the words of `alignkit.testing`'s tiny tokenizer; row 5 has a blank chosen reply, a
    malformed row as the real file has some. n=1040: bench/inference_strategies.py takes its
    prompts from row 1001 on."""
    rng = random.Random(0)
    rows = []
    for i in range(1, n + 1):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = (
            "\n\nHuman: hello\n\nAssistant: hello , what is your question ?" if i % 3 == 0 else ""
        ) + f"\n\nHuman: what is {a} plus {b} ?\n\nAssistant: "
        chosen = "" if i == 5 else f"the answer is {a + b} ."
        rows.append({"chosen": prompt + chosen, "rejected": prompt + "sorry i cannot help ."})
    return write_rows(Path(out) / "smoke_data" / "hh_rlhf_harmless.jsonl", rows)


def gsm8k_steps(answer: str) -> list[str]:
    """A GSM8K worked answer as its steps: its lines, calculator notes (`48/2 = <<48/2=24>>24`) removed."""
    import re

    return [line.strip() for line in re.sub(r"<<[^>]*>>", "", answer).splitlines() if line.strip()]


def smoke_gsm8k(out: Path, n: int = 64) -> Path:
    """A synthetic stand-in for the GSM8K file: question / worked answer ending in `#### <number>`."""
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"question": f"what is {a} plus {b} ?", "answer": f"{a} plus {b} equals {a + b} .\n#### {a + b}"})
    return write_rows(Path(out) / "smoke_data" / "gsm8k.jsonl", rows)
