"""`alignkit train`: one run from a config, on one process or several (torchrun)."""

from __future__ import annotations

import sys

from alignkit.commands.common import add_config_args, load_run_config
from alignkit.errors import AlignkitError


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a config: SFT, the DPO family, reward models, online RL (GRPO, RLOO, online DPO, "
        "RAFT)",
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        help="continue from this checkpoint (e.g. checkpoint-40, or a path) instead of the latest",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="on resume, accept settings that differ from "
        "the checkpoint's: they apply from there on and are recorded in config_changes.jsonl",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="train with N processes on this machine (starts torchrun; train.batch_size is per process)",
    )
    p.set_defaults(fn=run)


def launch_torchrun(nproc: int, argv: list) -> int:
    """Run this same `alignkit train` command under torchrun with `nproc` processes on this machine
    (`--standalone`: a local rendezvous on a free port). Several machines: call torchrun yourself
    (docs/scaling.md)."""
    import shutil
    import subprocess

    from alignkit import scratch

    # torchrun makes a log directory for every job in the temporary directory and never removes it
    logs = scratch.scratch_dir("torchrun")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--log-dir={logs}",
        "-m",
        "alignkit",
        *argv,
    ]
    print("alignkit: " + " ".join(cmd[1:]), flush=True)
    try:
        return subprocess.call(cmd)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _without_nproc(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def run(args) -> int:
    from alignkit.api import train

    if args.nproc_per_node and args.nproc_per_node > 1:
        from alignkit.distributed import under_torchrun

        if under_torchrun():
            raise AlignkitError("--nproc-per-node starts torchrun itself; under torchrun, leave it out.")
        return launch_torchrun(args.nproc_per_node, _without_nproc(args.argv))
    cfg = load_run_config(args)
    result = train(cfg, resume=args.resume, resume_from=args.resume_from, allow_config_change=args.allow_config_change)
    if result.eval_metrics:
        shown = {k: round(v, 4) for k, v in result.eval_metrics.items()}
        print(f"eval: {shown}")
    return 0
