"""What every data command shares: a resumable record log, the final JSONL written atomically, and
a summary (markdown and HTML, with counts and plots) beside it.

A command works item by item (a prompt to answer, a pair to judge, ...). Each finished item is
appended to `OUT.partial.jsonl` at once, keyed by its `id`; an interrupted command run again with
`--resume` reads that log, skips the ids it holds and does only the rest. When every item is done
the command writes OUT (a temporary file renamed into place, so a reader never sees half of it)
and removes the log. The settings of the first run are kept in `OUT.partial.json`, with the sha256
of each input file's bytes; resuming with different settings, or after an input file changed, is
refused, naming what changed (the records would mix two runs, or two versions of the data).

The log and its settings are created when the first item finishes, not before: a command that
stops earlier (a bad option, a model that does not load) leaves nothing behind, so the corrected
command does not ask for --resume. A log left by an older version that holds no finished item is
removed (and said so) for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from html import escape
from pathlib import Path

from alignkit.errors import AlignkitError
from alignkit.jsonfile import write_atomic

INPUTS_KEY = "input_sha256"  # in OUT.partial.json: {option: {"path", "sha256"}} beside the settings


def fingerprint(path) -> str | None:
    """sha256 of a local input's bytes; of a directory (a dataset saved with `save_to_disk`), of each
    file's relative path and bytes in sorted order. None for a name that is no local path (a hub
    dataset id), whose contents cannot be read here without downloading them."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if f is not p:
            h.update(str(f.relative_to(p)).encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class RecordLog:
    """The finished items of one command (see the module docstring).

    `settings`: the options the records depend on (compared on --resume). `inputs`: {option: path}
    of the files the records are made from (e.g. {"--data": "x.jsonl"}); the sha256 of their
    contents is kept with the settings and compared on --resume, so editing a file between an
    interrupted run and --resume is refused rather than mixing records of both versions."""

    def __init__(self, out: str | Path, settings: dict, resume: bool, inputs: dict | None = None):
        self.out = Path(out)
        self.log = self.out.with_name(self.out.name + ".partial.jsonl")
        self.meta = self.out.with_name(self.out.name + ".partial.json")
        self.settings = dict(settings)
        self.inputs = {
            opt: {"path": str(path), "sha256": fingerprint(path)}
            for opt, path in (inputs or {}).items()
            if path is not None
        }
        self.done: dict = {}
        self.torn = 0  # a last line cut by the interruption: dropped and done again
        self._f = None
        if self.log.exists():
            self._read_log()
            if not self.done:  # nothing finished: nothing to resume, so no reason to ask for --resume
                print(
                    f"alignkit: removed {self.log}: it held no finished record (its run stopped before finishing "
                    "any item)"
                )
                self.log.unlink()
                self.meta.unlink(missing_ok=True)
                self.torn = 0
        if self.out.exists():
            if not resume:
                raise AlignkitError(f"{self.out} exists; choose another --out, or delete it to write it again.")
            if not self.log.exists():
                # Exit 2 (an error), not 0: the user asked to finish work, and there is none to
                # finish; silently redoing it all would cost the whole run and replace the file.
                raise AlignkitError(
                    f"--resume: {self.out} is already finished (no {self.log.name} of an interrupted "
                    "run is beside it), so there is nothing to resume and nothing was redone; this "
                    "is exit code 2 because the work asked for cannot be done. To make it again, "
                    f"delete {self.out} (or choose another --out) and run without --resume."
                )
        if self.log.exists():
            if not resume:
                raise AlignkitError(
                    f"{self.log} holds the records of an interrupted run: add --resume to finish it "
                    f"(or delete {self.log} and {self.meta} to start over)."
                )
            self._check_same_run()
            if self.torn:  # rewrite without the torn line, so appends start on a fresh line
                self.log.write_text("".join(json.dumps(r) + "\n" for r in self.done.values()), encoding="utf-8")
        elif resume:
            print(
                f"alignkit: --resume: no interrupted run to finish ({self.log} does not exist); starting from the "
                "beginning"
            )

    def _read_log(self) -> None:
        lines = self.log.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    self.torn += 1
                    continue
                raise AlignkitError(
                    f"{self.log}:{n}: not JSON; the log is damaged (delete it and {self.meta} to start over)."
                ) from None
            if not isinstance(rec, dict) or "id" not in rec:
                raise AlignkitError(
                    f"{self.log}:{n}: a record without an `id`; the log is damaged or not alignkit's "
                    f"(delete it and {self.meta} to start over)."
                )
            self.done[rec["id"]] = rec

    def _check_same_run(self) -> None:
        """Refuse --resume when the settings or an input's contents differ from the interrupted run's."""
        start_over = f"delete {self.log} and {self.meta} and run without --resume"
        try:
            saved = json.loads(self.meta.read_text(encoding="utf-8")) if self.meta.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AlignkitError(
                f"{self.meta}: not valid JSON ({e}); the settings of the interrupted run are lost, so "
                f"its records cannot be checked against this run: {start_over}."
            ) from None
        if not isinstance(saved, dict):
            raise AlignkitError(f"{self.meta}: not the settings of an alignkit run (a JSON object); {start_over}.")
        saved_inputs = saved.pop(INPUTS_KEY, {}) or {}
        changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if changed:
            raise AlignkitError(
                f"--resume with other settings than the interrupted run ({', '.join(changed)}); "
                f"use the same ones, or {start_over}."
            )
        for opt, now in self.inputs.items():
            before = saved_inputs.get(opt)
            if before is None:
                raise AlignkitError(
                    f"--resume: the interrupted run did not record the contents of {now['path']} "
                    f"({opt}), so whether it changed since cannot be checked; {start_over}."
                )
            if before.get("sha256") != now["sha256"]:
                raise AlignkitError(
                    f"--resume: {now['path']} ({opt}) changed since the interrupted run started (sha256 "
                    f"{str(before.get('sha256'))[:12]}... then, {str(now['sha256'])[:12]}... now): its "
                    f"{len(self.done)} finished records came from the old contents and would be mixed with records "
                    f"of the new ones. Restore the file and run again with --resume, or, to start again on the new "
                    f"contents, {start_over}."
                )
            if now["sha256"] is None:  # a hub dataset: said, not silently assumed unchanged
                print(
                    f"alignkit: --resume: {now['path']} ({opt}) is not a local file; its contents were not checked "
                    "for changes since the interrupted run"
                )

    def todo(self, ids: list) -> list:
        return [i for i in ids if i not in self.done]

    def add(self, record: dict) -> None:
        """Append one finished record (it must carry its `id`) and make it durable."""
        if self._f is None:
            self._open()
        self.done[record["id"]] = record
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def _open(self) -> None:
        """Create the log (and its settings, first) when the first item finishes; see the module docstring."""
        if not self.log.exists():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.meta, {**self.settings, INPUTS_KEY: self.inputs})
        self._f = open(self.log, "a", encoding="utf-8")

    def finish(self, records: list) -> Path:
        """Write the final records to OUT atomically, then drop the log."""
        if self._f is not None:
            self._f.close()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out)
        self.log.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        return self.out


def write_summary(out: str | Path, title: str, counts: dict, notes: list = (), plots: list = ()) -> tuple[Path, Path]:
    """OUT.summary.md and OUT.summary.html: the counts as a table, notes, and plots (name, svg text)."""
    out = Path(out)
    md = out.with_name(out.name + ".summary.md")
    html = out.with_name(out.name + ".summary.html")
    rows = "".join(f"| {k} | {v} |\n" for k, v in counts.items())
    md.write_text(
        f"# {title}\n\n| what | count |\n| --- | --- |\n{rows}\n"
        + "".join(f"- {n}\n" for n in notes)
        + "".join(f"\n![{name}]({out.name}.{name}.svg)\n" for name, _ in plots),
        encoding="utf-8",
    )
    for name, svg in plots:
        out.with_name(f"{out.name}.{name}.svg").write_text(svg, encoding="utf-8")
    body = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in counts.items())
    html.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head><body>"
        f"<h1>{escape(title)}</h1><table border='1' cellpadding='4'>{body}</table>"
        + "".join(f"<p>{escape(n)}</p>" for n in notes)
        + "".join(f"<figure>{svg}<figcaption>{escape(name)}</figcaption></figure>" for name, svg in plots)
        + "</body></html>",
        encoding="utf-8",
    )
    return md, html
