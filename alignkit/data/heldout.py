"""The record of which examples a training run held out for evaluation: `RUN/heldout.json`.

`alignkit train` writes it; `alignkit eval --run` loads the data with the settings recorded here
and evaluates exactly the listed examples. Re-deriving the split at eval time instead goes wrong
as soon as anything that shapes the list of examples is not repeated exactly (`data.limit`,
`data.columns`, `data.split`, `data.on_bad_record`, the seed, or an edit to the file): training
pairs then get evaluated as held out. Examples are named by their `source` ("pairs.jsonl:17"),
the same location strings that data errors print, so a user can open each one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from alignkit import jsonfile
from alignkit.errors import ConfigError, DataError

FILENAME = "heldout.json"
VERSION = 1


@dataclass
class HeldoutRecord:
    data: str  # the file the held-out examples come from: data.eval, or data.train when split off
    recipe: str  # the run's recipe (which loader reads `data`)
    split: str | None = None  # data.split
    columns: dict = field(default_factory=dict)  # data.columns
    on_bad_record: str = "error"  # data.on_bad_record
    max_length: int = 1024  # data.max_length
    max_prompt_length: int | None = None  # data.max_prompt_length
    limit: int | None = None  # data.limit (applies to data.train only)
    eval_fraction: float = 0.0  # data.eval_fraction (0 or unused when data.eval is set)
    seed: int = 0
    num_train: int | None = None  # training examples after limit and split
    sources: list | None = None  # the held-out examples' sources, in order; None: the recipe did not record them
    alignkit_heldout: int = VERSION


def write_heldout(run_dir, record: HeldoutRecord) -> Path:
    """Write `run_dir/heldout.json` atomically (a reader never sees half a list)."""
    return jsonfile.write_atomic(Path(run_dir) / FILENAME, asdict(record))


def read_heldout(run_dir) -> HeldoutRecord:
    """The run's record; a clear error when it is missing or unreadable."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise ConfigError(
            f"{path} not found, so it is unknown which examples the run held out for evaluation (runs made "
            "before alignkit recorded them have none). Give --data with the pairs to evaluate, or train the run "
            "again to record its held-out pairs."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); train the run again or give --data.") from None
    known = {f.name for f in fields(HeldoutRecord)}
    if not isinstance(raw, dict) or not {"data", "recipe", "sources"} <= set(raw):
        raise ConfigError(
            f"{path}: not a held-out record (needs `data`, `recipe` and `sources`); train the run again or give --data."
        )
    if raw.get("alignkit_heldout") != VERSION:
        raise ConfigError(
            f"{path}: record version {raw.get('alignkit_heldout')!r}, this alignkit reads "
            f"version {VERSION}; give --data or evaluate with the alignkit that trained the run."
        )
    return HeldoutRecord(**{k: v for k, v in raw.items() if k in known})


def select_sources(examples: list, sources: list, data: str, record_path) -> list:
    """The examples whose `source` is listed, in the listed order; an error naming the data file and
    the first sources it no longer holds (the file changed since training)."""
    by_source = {e.source: e for e in examples}
    missing = [s for s in sources if s not in by_source]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(
            f"{data}: {len(missing)} of the {len(sources)} held-out examples listed in {record_path} are no "
            f"longer there ({shown}): the data changed since training. Restore the file the run trained on, "
            "or give --data with the pairs to evaluate."
        )
    return [by_source[s] for s in sources]


def write_record(d, seed: int, recipe: str, data, run_dir) -> Path:
    """Write RUN/heldout.json for a run of `recipe` with `data` settings `d` (a DataConfig), seed
    `seed` and its `PreparedData`."""
    record = HeldoutRecord(
        data=d.eval or d.train,
        recipe=recipe,
        split=d.split,
        columns=dict(d.columns or {}),
        on_bad_record=d.on_bad_record,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        limit=d.limit,
        eval_fraction=0.0 if d.eval else d.eval_fraction,
        seed=seed,
        num_train=data.num_train,
        sources=data.heldout_sources,
    )
    return write_heldout(run_dir, record)
