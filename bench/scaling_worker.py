"""One `alignkit` command, then this process's peak resident memory in OUT/rss-<rank>.json (for
bench/scaling.py; torchrun starts it once per process)."""

import json
import os
import resource
import sys
from pathlib import Path

from alignkit.cli import main

out, argv = Path(sys.argv[1]), sys.argv[2:]
status = main(argv)
rank = int(os.environ.get("RANK", "0"))
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
(out / f"rss-{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": peak_kib / 1024}))
sys.exit(status)
