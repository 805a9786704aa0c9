"""The `alignkit` command: assembles the commands of `alignkit.commands` (each module registers its
parser and handler) and maps errors to exit codes (a user's mistake: a message and exit 2).

    alignkit train --config run.yaml [key=value ...] [--resume]
    alignkit data show --config run.yaml [--index N] [--episode]
    alignkit data synth|judge|pairs|rewrite|select|principles ... --out FILE   (alignkit.datatools)
    alignkit iterate [key=value ...] --prompts P --heldout H --reward R --out DIR
    alignkit losses | demo | report RUN_DIR | export CHECKPOINT OUT | average MODEL MODEL --output OUT
    alignkit eval --model M [--reference R] [--data PAIRS] [--reward R] [--strategy S --prompts P]
    alignkit generate --model M --prompts P --reward R --strategy S
    alignkit steer fit | fit-value | vllm-serve ...
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from alignkit.errors import AlignkitError
from alignkit.version import __version__

# Each module has `register(sub)`, which adds its subcommand(s) and sets `fn` to the handler.
COMMANDS = (
    "train",
    "data",
    "losses",
    "eval",
    "generate",
    "steer",
    "fit_value",
    "vllm_serve",
    "sample_serve",
    "export",
    "average",
    "report",
    "demo",
    "w2s",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models with human preferences.")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"alignkit.commands.{name}").register(sub)
    return parser


def _rank() -> int:
    from alignkit.distributed import env_rank

    return env_rank()


def _quiet_unless_main(rank: int) -> None:
    """Under torchrun, processes other than the main one print nothing (their progress bars and
    library chatter go to a buffer); an error still reaches the terminal (see `main`)."""
    if rank > 0:
        import io

        sys.stdout = open(os.devnull, "w")
        sys.stderr = io.StringIO()


def main(argv: list[str] | None = None) -> int:
    rank = _rank()
    _quiet_unless_main(rank)
    try:
        return _main(argv, rank)
    except BaseException as e:
        if rank > 0 and not isinstance(e, SystemExit):
            import traceback

            sys.__stderr__.write(f"alignkit: process {rank} failed:\n{traceback.format_exc()}")
            sys.__stderr__.flush()
        raise


def entry() -> int:
    """The `alignkit` command (console script and `python -m alignkit`): `main`, then, under
    torchrun, leave the process group together with the other processes (distributed.leave_group).
    `main` itself stays reusable in one process (the tests run several commands in one)."""
    ok = False
    try:
        code = main()
        ok = code == 0
        return code
    finally:
        from alignkit.distributed import leave_group, under_torchrun

        if under_torchrun():
            leave_group(ok)


def _main(argv: list[str] | None, rank: int) -> int:
    parser = build_parser()
    # `key=value` overrides may come anywhere, also after an option (`train -c x.yaml --resume
    # lr=1`); argparse's positional list stops at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "help_config", False):
        from alignkit.config import format_help

        print(format_help())
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except AlignkitError as e:
        from alignkit.distributed import env_world_size

        where = f" (process {rank})" if env_world_size() > 1 else ""
        print(f"alignkit: error{where}: {e}", file=sys.__stderr__ if where else sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
