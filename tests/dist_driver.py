"""Runs `alignkit` commands inside one torchrun job, for tests/test_distributed.py.

    torchrun ... tests/dist_driver.py RUNS.json

RUNS.json is a list of {"argv": [...], "kill_rank": R, "kill_after_save": S, "kill_in_write": W}:
each argv goes through `alignkit.cli.main` in turn (one process start for several runs: importing
torch and transformers is most of a tiny run's time). With `kill_rank`, that process SIGKILLs
itself right after checkpoint S is written, or (`kill_in_write`) while it writes its shards of
checkpoint W, as a crash would (no cleanup, no exception handlers). Exits with the first non-zero
status.
"""

import json
import os
import signal
import sys

from alignkit.cli import main
from alignkit.distributed import Dist, leave_group
from alignkit.train import checkpoint as ckpt

runs = json.loads(open(sys.argv[1]).read())
real_save = ckpt.save_checkpoint
real_sharded = Dist.save_sharded
for run in runs:
    kill_rank, kill_after = run.get("kill_rank"), run.get("kill_after_save")

    def save(run_dir, step, *a, _kill=(kill_rank, kill_after), **k):
        path = real_save(run_dir, step, *a, **k)
        if _kill[0] is not None and step == _kill[1] and int(os.environ.get("RANK", "0")) == _kill[0]:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def save_sharded(self, state, path, _kill=(kill_rank, run.get("kill_in_write"))):
        if _kill[1] is not None and f".checkpoint-{_kill[1]}.tmp-" in str(path) and self.rank == _kill[0]:
            os.kill(os.getpid(), signal.SIGKILL)  # this process dies before writing its shards
        return real_sharded(self, state, path)

    ckpt.save_checkpoint = save
    Dist.save_sharded = save_sharded
    status = main(run["argv"])
    if status:
        sys.exit(status)
leave_group(True)  # as the `alignkit` command does after a run that succeeded
