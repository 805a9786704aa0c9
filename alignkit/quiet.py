"""Log records of the libraries alignkit loads that tell its users nothing, dropped by narrow filters:
the records, not the loggers, so anything else those loggers say still shows.

transformers imports torchao whenever it is installed (`alignkit[qlora]`, `make install`), in every
run, QLoRA or not. On a machine without CUDA, torchao's import logs one warning per CUDA kernel
library it cannot load (NF4 and int8 weight-only need none of them), and torch one deprecation per
enum torchao registers the old way: four lines of alarm above a run's first line, none of which
the user can act on. `alignkit/__init__.py` installs the filters, so every entry point has them.
"""

from __future__ import annotations

import logging
import sys


def _cpu_only() -> bool:
    torch = sys.modules.get("torch")  # imported by then: torchao imports it first
    return torch is not None and not torch.cuda.is_available()


def _torchao_kernel_library(record: logging.LogRecord) -> bool:
    """torchao/__init__.py: `Failed to load <torchao>/_C....so: ...`, on a machine with no CUDA
    (where a failure to load them could matter, a GPU machine, it still shows)."""
    message = record.getMessage()
    return message.startswith("Failed to load ") and "torchao/_C" in message and _cpu_only()


def _torchao_enum(record: logging.LogRecord) -> bool:
    """torch/utils/_pytree.py: `<enum ...> is an Enum subclass and is now natively supported ...`,
    for torchao's own enums only."""
    cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return "is an Enum subclass" in str(record.msg) and getattr(cls, "__module__", "").startswith("torchao")


_NOISE = {"torchao": _torchao_kernel_library, "torch.utils._pytree": _torchao_enum}


class _Drop(logging.Filter):
    def __init__(self, noise) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.noise(record)


def install() -> None:
    """Add the filters (once: importing alignkit again adds none)."""
    for name, noise in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(noise))
