"""Read data sources into raw records, each tagged with the location a user can open.

Locations: `file.jsonl:12` (1-based line, as editors number them), `file.csv:line 5` (the physical
line where the row starts, header included), `file.json:record 3`, `file.parquet:row 7`,
`DIR:row 7`, `DIR[test]:row 7` (a DatasetDict split) and `org/name[train]:row 7` (hub). Record and
row numbers are 0-based, the way `data[3]`, `df.iloc[7]` and `dataset[7]` index them.

A record that cannot even be read (bad UTF-8, a JSON syntax error on one line, a CSV row with the
wrong number of fields) comes through as `Unreadable`, so that the loader decides whether to stop
or to skip it; problems with the whole source (not found, not valid JSON, no records) raise.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator

from alignkit.errors import DataError

SUPPORTED = (
    ".jsonl, .json, .csv (each optionally .gz), .parquet, a directory written by "
    "datasets' save_to_disk, or a Hugging Face hub dataset id"
)
# The readers serve data.train, data.eval and the CLI's file arguments alike and are not told which
# of them named the path, so a hint names them all.
_PATH_HINT = "check the path given in data.train or data.eval (or on the command line)"
_LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz")


class RecordError(DataError):
    """One record is invalid; `location` and `reason` are kept apart so a loader can skip it."""

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a record that could not be read at all."""

    reason: str


def read_records(path: str, *, split: str | None = None) -> Iterator[tuple[str, object]]:
    """Yield (location, record) for each record of `path`; raise `DataError` at the first problem."""
    for location, record in iter_raw(path, split=split):
        if isinstance(record, Unreadable):
            raise RecordError(location, record.reason)
        yield location, record


def iter_raw(path: str, *, split: str | None = None) -> Iterator[tuple[str, object]]:
    """Like `read_records`, but unreadable records come through as `Unreadable`."""
    count = 0
    for item in _dispatch(str(path), split):
        count += 1
        yield item
    if count == 0:
        where = f"{path}[{split}]" if split else str(path)
        raise DataError(f"{where}: no records found (the source is empty or holds only blank lines)")


def _dispatch(name: str, split: str | None) -> Iterator[tuple[str, object]]:
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return _read_saved_dataset(name, local, split)
    if os.path.isfile(local):
        if split is not None:
            raise DataError(
                f"{name}: split={split!r} was given, but a single file has no splits; remove "
                "data.split (it applies to DatasetDict directories and hub datasets)"
            )
        return _FILE_READERS[_file_kind(name)](name, local)
    if os.path.exists(local):
        raise DataError(f"{name}: exists but is neither a regular file nor a directory")
    if looks_local(local):
        raise DataError(
            f"{name}: file not found (looked for {os.path.abspath(local)}); {_PATH_HINT}; "
            "relative paths are resolved from the current directory"
        )
    return _read_hub(name, split)


def looks_local(path: str) -> bool:
    # A hub id is "name" or "org/name"; anything with a file suffix, a leading ./ ../ / ~,
    # or more than one "/" is a local path the user mistyped, not a hub dataset to download.
    return (
        path.lower().endswith(_LOCAL_SUFFIXES)
        or path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
    )


def _file_kind(name: str) -> str:
    lower = name.lower()
    stem = lower[: -len(".gz")] if lower.endswith(".gz") else lower
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv")):
        if stem.endswith(suffix):
            return kind
    if lower.endswith(".parquet"):
        return "parquet"
    raise DataError(f"{name}: unsupported file type; supported: {SUPPORTED}")


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(name: str, path: str) -> bytes:
    try:
        with _open_bytes(path) as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{name}: cannot read the file: {e}") from e


def _decode(name: str, data: bytes, line_label: str = "") -> str:
    """Decode a whole file as UTF-8; on failure name the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{name}:{line_label}{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8"
        ) from e


def _read_jsonl(name: str, path: str) -> Iterator[tuple[str, object]]:
    # Binary, line by line, decoding each line ourselves: a bad byte is then reported with its
    # line number instead of as an offset into the whole file.
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                yield from _jsonl_line(f"{name}:{lineno}", raw, lineno == 1)
    except (OSError, EOFError) as e:
        raise DataError(f"{name}: cannot read the file: {e}") from e


def _jsonl_line(location: str, raw: bytes, first: bool) -> Iterator[tuple[str, object]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield (
            location,
            Unreadable(
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                "re-save the file as UTF-8"
            ),
        )
        return
    if first:
        text = text.lstrip("\ufeff")  # byte order mark written by some Windows editors
    if not text.strip():
        return
    # The terminator is not part of the record: parsed with it, an error after the last character
    # is reported as column 1 of a "line 2", and an unterminated string as a control character.
    text = text.rstrip("\r\n")
    try:
        yield location, json.loads(text)
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" + (" (end of line)" if e.pos >= len(text) else "")
        yield (
            location,
            Unreadable(f"JSON syntax error at {where}: {e.msg}; each line must hold one complete JSON object"),
        )


def _read_json(name: str, path: str) -> Iterator[tuple[str, object]]:
    text = _decode(name, _read_bytes(name, path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # JSON Lines under a .json name (datasets' `to_json` writes exactly that by default):
            # read it as such, the way `datasets.load_dataset("json", ...)` does.
            yield from _read_jsonl(name, path)
            return
        raise DataError(f"{name}:{e.lineno}: JSON syntax error at column {e.colno}: {e.msg}") from e
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        records = doc["data"]
    elif isinstance(doc, list):
        records = doc
    else:
        found = f"an object with keys {sorted(doc)[:10]}" if isinstance(doc, dict) else type(doc).__name__
        raise DataError(f'{name}: expected a JSON list of records or an object {{"data": [...]}}, found {found}')
    for i, record in enumerate(records):
        yield f"{name}:record {i}", record


def _read_csv(name: str, path: str) -> Iterator[tuple[str, object]]:
    rows = _csv_rows(name, _decode(name, _read_bytes(name, path), "line "))
    if not rows:
        return
    header_line, header = rows[0]
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DataError(f"{name}:line {header_line}: duplicate column name(s) {duplicates} in the header")
    for line, fields in rows[1:]:
        location = f"{name}:line {line}"
        if len(fields) != len(header):
            yield (
                location,
                Unreadable(
                    f"has {len(fields)} fields but the header (line {header_line}) has {len(header)}; "
                    "quote fields that contain commas or newlines"
                ),
            )
        else:
            yield location, dict(zip(header, fields))


def _csv_rows(name: str, text: str) -> list[tuple[int, list[str]]]:
    """Parse all rows as (physical line where the row starts, fields), skipping blank lines."""
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long completions exceed the 128 KiB default field limit
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        rows = []
        while True:
            start = reader.line_num + 1  # line_num counts lines consumed so far
            try:
                fields = next(reader)
            except StopIteration:
                return rows
            except csv.Error as e:
                raise DataError(f"{name}:line {start}: CSV syntax error: {e}") from e
            if fields:
                rows.append((start, fields))
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(name: str, path: str) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file: {e}") from e
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{name}:row {row}", record
            row += 1


def _read_saved_dataset(name: str, path: str, split: str | None) -> Iterator[tuple[str, object]]:
    is_dict = os.path.isfile(os.path.join(path, "dataset_dict.json"))
    if not is_dict and not os.path.isfile(os.path.join(path, "state.json")):
        raise DataError(
            f"{name}: is a directory, but not one written by datasets' save_to_disk (it has no "
            f"dataset_dict.json or state.json); point data.train or data.eval (or the command line) at a file or "
            "such a directory "
            f"(supported: {SUPPORTED})"
        )
    import datasets

    loaded = datasets.load_from_disk(path)
    if is_dict:
        split = split or "train"
        if split not in loaded:
            raise DataError(
                f"{name}: has no split {split!r}; available splits: {', '.join(loaded)}; set data.split to one of them"
            )
        yield from _iter_dataset(loaded[split], f"{name}[{split}]")
    else:
        if split is not None:
            raise DataError(
                f"{name}: split={split!r} was given, but this directory holds a single Dataset "
                "with no splits; remove data.split"
            )
        yield from _iter_dataset(loaded, name)


def _read_hub(name: str, split: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    split = split or "train"
    try:
        dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # not found, offline (ConnectionError), unknown split
        raise DataError(
            f"{name}: not a local file or directory, and loading it as a Hugging Face hub dataset "
            f"(split {split!r}) failed: {e}; {_PATH_HINT}, or the dataset id and data.split"
        ) from e
    yield from _iter_dataset(dataset, f"{name}[{split}]")


def _iter_dataset(dataset, prefix: str) -> Iterator[tuple[str, object]]:
    row = 0
    # Batched column reads are much faster than dataset[i] one row at a time.
    for batch in dataset.with_format(None).iter(batch_size=1024):
        for values in zip(*batch.values()):
            yield f"{prefix}:row {row}", dict(zip(batch.keys(), values))
            row += 1


_FILE_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
