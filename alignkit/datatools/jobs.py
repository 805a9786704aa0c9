"""What every data command shares: a resumable record log, the final JSONL written atomically, and
a summary (markdown and HTML, with counts and plots) beside it.

A command works item by item (a prompt to answer, a pair to judge, ...). Each finished item is
appended to `OUT.partial.jsonl` at once, keyed by its `id`; an interrupted command run again with
`--resume` reads that log, skips the ids it holds and does only the rest. When every item is done
the command writes OUT (a temporary file renamed into place, so a reader never sees half of it)
and removes the log. The settings of the first run are kept in `OUT.partial.json`; resuming with
different settings is refused, naming what changed (the records would mix two runs).
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from alignkit.errors import AlignkitError
from alignkit.jsonfile import write_atomic


class RecordLog:
    def __init__(self, out: str | Path, settings: dict, resume: bool):
        self.out = Path(out)
        self.log = self.out.with_name(self.out.name + ".partial.jsonl")
        self.meta = self.out.with_name(self.out.name + ".partial.json")
        self.done: dict = {}
        self.torn = 0  # a last line cut by the interruption: dropped and done again
        if self.out.exists() and not resume:
            raise AlignkitError(f"{self.out} exists; choose another --out, or delete it to write it again.")
        if self.log.exists():
            if not resume:
                raise AlignkitError(f"{self.log} holds the records of an interrupted run: add --resume to finish it "
                                    f"(or delete {self.log} and {self.meta} to start over).")
            saved = json.loads(self.meta.read_text()) if self.meta.exists() else {}
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if changed:
                raise AlignkitError(f"--resume with other settings than the interrupted run ({', '.join(changed)}); "
                                    f"use the same ones, or delete {self.log} to start over.")
            lines = self.log.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines):
                        self.torn += 1
                        continue
                    raise AlignkitError(f"{self.log}:{n}: not JSON; the log is damaged (delete it to start over).")
                self.done[rec["id"]] = rec
            if self.torn:  # rewrite without the torn line, so appends start on a fresh line
                self.log.write_text("".join(json.dumps(r) + "\n" for r in self.done.values()), encoding="utf-8")
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.meta, settings)
        self._f = open(self.log, "a", encoding="utf-8")

    def todo(self, ids: list) -> list:
        return [i for i in ids if i not in self.done]

    def add(self, record: dict) -> None:
        """Append one finished record (it must carry its `id`) and make it durable."""
        self.done[record["id"]] = record
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def finish(self, records: list) -> Path:
        """Write the final records to OUT atomically, then drop the log."""
        self._f.close()
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
    md.write_text(f"# {title}\n\n| what | count |\n| --- | --- |\n{rows}\n" + "".join(f"- {n}\n" for n in notes)
                  + "".join(f"\n![{name}]({out.name}.{name}.svg)\n" for name, _ in plots), encoding="utf-8")
    for name, svg in plots:
        out.with_name(f"{out.name}.{name}.svg").write_text(svg, encoding="utf-8")
    body = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in counts.items())
    html.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head><body>"
                    f"<h1>{escape(title)}</h1><table border='1' cellpadding='4'>{body}</table>"
                    + "".join(f"<p>{escape(n)}</p>" for n in notes)
                    + "".join(f"<figure>{svg}<figcaption>{escape(name)}</figcaption></figure>" for name, svg in plots)
                    + "</body></html>", encoding="utf-8")
    return md, html
