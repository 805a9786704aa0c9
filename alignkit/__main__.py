"""`python -m alignkit ...` is the `alignkit` command (torchrun starts it so: `-m alignkit train ...`)."""

import sys

from alignkit.cli import entry

sys.exit(entry())
