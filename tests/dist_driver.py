"""Runs `alignkit` commands inside one torchrun job, for tests/test_distributed.py.

    torchrun ... tests/dist_driver.py RUNS.json

RUNS.json is a list of {"argv": [...], "kill_rank": R, "kill_after_save": S}: each argv goes through
`alignkit.cli.main` in turn (one process start for several runs: importing torch and transformers
is most of a tiny run's time). With `kill_rank`, that process SIGKILLs itself right after
checkpoint S is written, as a crash would (no cleanup, no exception handlers). Exits with the
first non-zero status.
"""

import json
import os
import signal
import sys

from alignkit.cli import main
from alignkit.train import checkpoint as ckpt

runs = json.loads(open(sys.argv[1]).read())
real_save = ckpt.save_checkpoint
for run in runs:
    kill_rank, kill_after = run.get("kill_rank"), run.get("kill_after_save")

    def save(run_dir, step, *a, _kill=(kill_rank, kill_after), **k):
        path = real_save(run_dir, step, *a, **k)
        if _kill[0] is not None and step == _kill[1] and int(os.environ.get("RANK", "0")) == _kill[0]:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    ckpt.save_checkpoint = save
    status = main(run["argv"])
    if status:
        sys.exit(status)
