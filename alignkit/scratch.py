"""Scratch directories that do not outlive their process: named
`alignkit-<kind>-<pid>-<pid namespace>-<random>`, so that the next one made in the same place
removes those whose process has ended without removing them (killed, or out of memory). Only those
of its own PID namespace: containers that share /dev/shm (Docker's `--ipc=host`, which vLLM's
docs advise) see other process numbers, and a live process of another one looks ended.

What goes there is large or many: a vLLM engine's weights and adapters in /dev/shm (memory, until
removed) and its processes' temporary files (vLLM leaves 7 sockets an engine in the temporary
directory otherwise)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

MEMORY = "/dev/shm"  # a RAM-backed file system: writing there costs no disk


def _namespace() -> str:
    """This process's PID namespace (its inode; 0 where /proc does not say)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean up
        return True
    return True


def sweep(kind: str, parent: str | Path) -> list[Path]:
    """Remove the `kind` directories in `parent` whose process has ended; returns them."""
    pattern = re.compile(rf"alignkit-{re.escape(kind)}-(\d+)-{_namespace()}-")
    removed = []
    for path in Path(parent).glob(f"alignkit-{kind}-*"):
        m = pattern.match(path.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def scratch_dir(kind: str, memory: bool = False) -> Path:
    """A new directory for this process's `kind` files, in /dev/shm with `memory` (where the machine
    has it) or else the temporary directory, after sweeping the ones left by ended processes. The
    caller removes it (see `owned`)."""
    parent = MEMORY if memory and Path(MEMORY).is_dir() else tempfile.gettempdir()
    sweep(kind, parent)
    return Path(tempfile.mkdtemp(prefix=f"alignkit-{kind}-{os.getpid()}-{_namespace()}-", dir=parent))


def owned(owner: object, kind: str, memory: bool = False) -> tuple[Path, weakref.finalize]:
    """`scratch_dir` removed when `owner` is collected or the program ends, or earlier by calling
    the returned finalizer (`close` methods)."""
    path = scratch_dir(kind, memory)
    return path, weakref.finalize(owner, shutil.rmtree, path, ignore_errors=True)
