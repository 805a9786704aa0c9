"""`alignkit report`: the HTML report of a run and its evaluation."""

from __future__ import annotations

from alignkit.commands.common import write_report


def register(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html: plots and key numbers of a run and its eval")
    p.add_argument("run_dir")
    p.set_defaults(fn=run)


def run(args) -> int:
    write_report(args.run_dir)
    return 0
