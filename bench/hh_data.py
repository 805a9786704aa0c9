"""The shared HH-RLHF harmless file (../shared/data, not shipped): locate it, split it by rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_rlhf_harmless" / "dev.jsonl"


def require_hh() -> Path:
    if not HH.is_file():
        sys.exit(f"skipped: {HH} not found (the benchmark needs the shared HH-RLHF data)")
    return HH


def usable_rows() -> tuple[list[tuple[int, dict]], list]:
    """(1-based line, record) of every row alignkit accepts, and the skipped (location, reason)s."""
    from alignkit.data.formats import load_preference_examples

    result = load_preference_examples(str(require_hh()), on_bad_record="skip")
    good = {int(ex.source.rsplit(":", 1)[1]) for ex in result.examples}
    rows = [json.loads(line) for line in HH.read_text().splitlines() if line.strip()]
    return [(i, r) for i, r in enumerate(rows, start=1) if i in good], result.skipped


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
