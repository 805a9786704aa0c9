"""The `python` tool: run model-written code in a separate process, sandbox-light.

This is not a security boundary against a determined attacker; it stops the accidents and the
easy abuses a policy stumbles into while it learns, on a machine you control:
  - a fresh process (`python -I`: no user site, no environment variables) in a new scratch
    directory (its working directory and $HOME), removed afterwards;
  - a wall-clock limit (the whole process group is killed), a CPU-time limit and an address-space
    limit (`resource.RLIMIT_AS`: a large allocation raises MemoryError);
  - no new processes: RLIMIT_NPROC is 0 where it applies (not for root), and an audit hook
    (PEP 578, installed before the code runs and not removable from Python) refuses os.fork,
    os.system, os.exec*, os.posix_spawn, subprocess and pty;
  - no network: the hook refuses socket connect/bind/getaddrinfo;
  - no files outside the scratch directory: the hook refuses opening any path outside it for
    writing, and for reading anything but Python's own installation (imports must work);
  - ctypes is refused (it could step around the hook).
Every refusal and limit ends with a clear tool error the model reads. For real isolation run the
policy's tools in a container or a VM.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_GUARD = r'''
import os, sys
_SCRATCH = os.path.realpath(sys.argv[1])
_PYTHON = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__)})
_NO = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
       "pty.spawn", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen",
       "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg")
def _inside(path, roots):
    return any(path == r or path.startswith(r + os.sep) for r in roots)
def _hook(event, args):
    if event.startswith(_NO):
        raise PermissionError(f"the python tool does not allow {event}")
    if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes"):
        raise PermissionError("the python tool does not allow ctypes")
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = os.path.realpath(os.fsdecode(args[0]))
        writing = isinstance(args[1], str) and any(c in args[1] for c in "wax+")
        if not _inside(path, (_SCRATCH,)) and (writing or not _inside(path, _PYTHON)):
            raise PermissionError(f"the python tool cannot open {path}: only files in its scratch directory")
sys.addaudithook(_hook)
del _hook
_code = open(os.path.join(_SCRATCH, "main.py")).read()
sys.argv = ["main.py"]
exec(compile(_code, "main.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class PythonResult:
    stdout: str
    stderr: str
    error: str | None  # None: the code ran to the end; else why it did not (timeout, memory, refused, exit code)

    def message(self, max_chars: int = 2000) -> str:
        """What the model reads back."""
        parts = [self.stdout.strip()]
        if self.error:
            parts.append(f"error: {self.error}")
        text = "\n".join(p for p in parts if p) or "(no output)"
        return text if len(text) <= max_chars else text[:max_chars] + " ..."


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        os.setsid()  # its own process group: a timeout kills everything it started
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        if os.geteuid() != 0:  # root ignores it; the audit hook covers that case
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return apply


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output: int = 10_000) -> PythonResult:
    """Run `code` as described in the module docstring; returns its output and what stopped it."""
    scratch = tempfile.mkdtemp(prefix="alignkit-python-")
    try:
        with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _GUARD, scratch], cwd=scratch, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                preexec_fn=_limits(memory_mb, max(1, int(timeout_s) + 1)))
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return PythonResult(out.decode(errors="replace")[:max_output], err.decode(errors="replace")[-max_output:],
                                f"timed out after {timeout_s:g} s (the tool's wall-clock limit)")
        out_s, err_s = out.decode(errors="replace")[:max_output], err.decode(errors="replace")[-max_output:]
        if proc.returncode == 0:
            return PythonResult(out_s, err_s, None)
        last = err_s.strip().splitlines()[-1] if err_s.strip() else ""
        if "MemoryError" in err_s:
            why = f"out of memory (the tool's limit is {memory_mb} MiB)"
        elif proc.returncode < 0:
            why = f"stopped by signal {signal.Signals(-proc.returncode).name} (a limit of the tool)"
        else:
            why = last or f"exit code {proc.returncode}"
        return PythonResult(out_s, err_s, why)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
