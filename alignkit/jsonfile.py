"""JSON that strict parsers accept, written atomically.

Python's `json` writes NaN and Infinity as bare `NaN` / `Infinity`, which is not JSON: `jq`,
JavaScript's `JSON.parse` and most trackers reject the whole file. A non-finite number becomes
`null` here; whoever logs one also records what happened (e.g. `"nonfinite": 1`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def finite(obj):
    """`obj` with every NaN or infinite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write_atomic(path: str | Path, obj, indent: int | None = 2) -> Path:
    """Write `obj` as strict JSON to a temporary file beside `path`, then rename it into place.

    A reader (or the next run, after a crash or power loss) sees the old file or the new one, never
    a torn one: the temporary file is in the same directory, so the rename is atomic, and it is
    fsynced first, since a rename can otherwise reach the disk before the data and leave an empty file."""
    return _write_text(Path(path), dumps(obj, indent=indent, default=str))


def write_lines_atomic(path: str | Path, rows: list) -> Path:
    """`rows` as JSON Lines (strict JSON, one object a line), written atomically like `write_atomic`;
    several processes writing the same rows at once leave one whole file."""
    return _write_text(Path(path), "".join(dumps(r) + "\n" for r in rows))


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
