"""Where model-written code runs: behind an operating-system sandbox, never in the trainer.

A policy under RL is an optimiser that searches for whatever raises its reward, escapes included,
so code it writes is treated as hostile. Checks inside the same interpreter (audit hooks, patched
modules) are not a boundary: the code can reach and undo them. The boundary here is the kernel's,
through bubblewrap (`bwrap`, https://github.com/containers/bubblewrap; Debian's `bubblewrap`),
the sandbox Flatpak builds on:

- namespaces: a new PID namespace (every process the code starts dies with it: `--die-with-parent`,
  and the namespace is killed at the timeout), a network namespace with no interfaces but a
  loopback nobody else shares (no packet leaves), and new IPC, UTS and cgroup namespaces;
- files: a read-only view of only what the interpreter needs (`/usr` and the Python installation,
  bound read-only; no `/etc`, `/home`, `/tmp` or working tree), a fresh `/proc` and a minimal
  `/dev`, and one writable scratch directory on a size-limited tmpfs that vanishes afterwards;
- an unprivileged uid (65534, "nobody"): run as root, alignkit starts `bwrap` without a user
  namespace, so that `setpriv` drops to the real uid 65534 (no capabilities, empty bounding set,
  no new privileges) before the code runs; run as a normal user, the user namespace maps the
  sandbox's uid 65534 onto that user, who holds no privileges to begin with;
- limits (inherited rlimits): CPU seconds, address space per process, file size, and processes of
  that uid (a fork bomb stops at the cap);
- output read incrementally from pipes and cut at `max_output` bytes: the caller never holds more
  (the sandbox is killed once standard output passes the cap).

`env.sandbox: none` runs the code as a plain child process with the same limits and no isolation:
only for code you trust, recorded in the run's config and warned about at start. Other executors
(a remote code-execution service) plug in as `file.py:Class` with the `CodeExecutor` protocol.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from alignkit.errors import ConfigError

NOBODY = 65534
SCRATCH = "/scratch"


class SandboxUnavailable(ConfigError):
    """No sandbox can be started here; the message says why and how to install one."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    """Wall-clock seconds; then every process of the call is killed."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS): a larger allocation raises MemoryError."""
    max_output: int = 10_000
    """Bytes of standard output kept (and of standard error's tail); more ends the call."""
    max_processes: int = 16
    """Processes of the sandbox's uid at once (RLIMIT_NPROC), the interpreter included."""
    scratch_mb: int = 64
    """Size of the writable scratch directory (tmpfs)."""
    file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE)."""


@dataclass
class CodeResult:
    stdout: str
    stderr: str
    error: str | None  # None: the code ran to the end; else why it did not (timeout, memory, output, exit code)

    def message(self, max_chars: int = 2000) -> str:
        """What the model reads back: the output, cut to fit `max_chars` with the error (if any) kept whole."""
        out, err = self.stdout.strip(), f"error: {self.error}" if self.error else ""
        room = max_chars - len(err) - 1
        if len(out) > room:
            out = out[: max(0, room - 4)] + " ..."
        return "\n".join(p for p in (out, err) if p) or "(no output)"


@runtime_checkable
class CodeExecutor(Protocol):
    """Runs a Python program somewhere it cannot reach the caller. `check` is called once before
    training (raise `SandboxUnavailable` saying what is missing); `run` once per tool call. `name`
    is shown at start."""

    name: str

    def check(self) -> None: ...

    def run(self, code: str, limits: Limits) -> CodeResult: ...


# -- running a child with bounded output ------------------------------------------------------------


def _rlimits(limits: Limits, drop_to: int | None = None):
    cpu = max(1, int(limits.timeout_s) + 1)

    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20, limits.memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb << 20, limits.file_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))

    return apply


def run_bounded(
    argv: list,
    limits: Limits,
    *,
    env: dict | None = None,
    cwd: str | None = None,
    pass_fds: tuple = (),
    preexec=None,
    describe=None,
) -> CodeResult:
    """Run `argv` in a new session, reading its output as it comes: standard output up to
    `limits.max_output` bytes (past that the whole session is killed), the last `max_output` bytes
    of standard error. At `limits.timeout_s` the session is killed. `describe(returncode, stderr)`
    names a failure (default: the last line of standard error)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        pass_fds=pass_fds,
        preexec_fn=preexec,
        start_new_session=True,
    )
    out, err = bytearray(), bytearray()
    error = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    deadline = time.monotonic() + limits.timeout_s
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                error = f"timed out after {limits.timeout_s:g} s (the tool's wall-clock limit)"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "out":
                    out += chunk[: limits.max_output + 1 - len(out)]
                else:
                    err += chunk
                    del err[: max(0, len(err) - limits.max_output)]
            if len(out) > limits.max_output:
                del out[limits.max_output :]
                error = f"output cut at {limits.max_output} bytes (the tool's output limit); the program was stopped"
                break
    finally:
        sel.close()
        if proc.poll() is None:
            _kill_session(proc)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    out_s, err_s = out.decode(errors="replace"), err.decode(errors="replace")
    if error is None and proc.returncode != 0:
        error = (describe or _describe)(proc.returncode, err_s, limits)
    return CodeResult(out_s, err_s, error)


def _kill_session(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Warning|Interrupt|Exit)\b.*")


def _describe(returncode: int, stderr: str, limits: Limits) -> str:
    lines = stderr.strip().splitlines()
    # the exception's own line, not the last line: children that fail together (a fork past the
    # process limit) interleave their tracebacks
    raised = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    last = raised[-1] if raised else (lines[-1] if lines else "")
    if "MemoryError" in stderr:
        return f"out of memory (the tool's limit is {limits.memory_mb} MiB)"
    if returncode < 0 or returncode >= 128:
        sig = -returncode if returncode < 0 else returncode - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return f"stopped by signal {name} (a limit of the tool)"
    return last or f"exit code {returncode}"


# -- bubblewrap -------------------------------------------------------------------------------------


INSTALL_HINT = (
    "Install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: `sudo dnf install "
    "bubblewrap`), or run model-written code elsewhere with env.sandbox=file.py:Executor. To run it "
    "WITHOUT isolation (only code you trust), set env.sandbox=none."
)


def _python_roots() -> list:
    """The directories the interpreter needs, outermost first, without ones inside others."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    out = []
    for r in sorted(roots, key=len):
        if r != "/" and not any(r == o or r.startswith(o + os.sep) for o in out + ["/usr"]):
            out.append(r)
    return out


class BwrapExecutor:
    """Code in a bubblewrap sandbox (see the module docstring)."""

    name = "bwrap"

    def __init__(self):
        self._checked = False

    def _argv(self, limits: Limits, code_fd: int) -> list:
        bwrap = shutil.which("bwrap")
        root = os.geteuid() == 0
        a = [
            bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
        ]
        if root:  # no user namespace: setpriv below drops to the real uid 65534 (see the module docstring)
            a += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            a += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns"]
        a += ["--ro-bind", "/usr", "/usr"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = "/" + top
            if os.path.islink(path):
                a += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                a += ["--ro-bind", path, path]
        a += ["--perms", "0755", "--dir", "/etc"]
        for f in ("/etc/ld.so.cache", "/etc/localtime"):
            a += ["--ro-bind-try", f, f]
        made = set()
        for r in _python_roots():
            parts = r.strip("/").split("/")
            for i in range(1, len(parts)):  # mount points readable by the sandbox's uid (bwrap makes them 0700)
                d = "/" + "/".join(parts[:i])
                if d not in made and not d.startswith("/usr"):
                    a += ["--perms", "0755", "--dir", d]
                    made.add(d)
            a += ["--ro-bind", r, r]
        a += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--perms",
            "1777",
            "--size",
            str(limits.scratch_mb << 20),
            "--tmpfs",
            SCRATCH,
            "--perms",
            "0644",
            "--file",
            str(code_fd),
            f"{SCRATCH}/main.py",
            "--remount-ro",
            "/",
            "--remount-ro",
            "/dev",  # only the scratch tmpfs is writable
            "--chdir",
            SCRATCH,
            "--clearenv",
            "--setenv",
            "HOME",
            SCRATCH,
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "LANG",
            "C.UTF-8",
            "--setenv",
            "PYTHONDONTWRITEBYTECODE",
            "1",
        ]
        if root:
            a += [
                "/usr/bin/setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ]
        return a + [sys.executable, "-I", "main.py"]

    def check(self) -> None:
        """Start one sandbox and run a program in it; raise `SandboxUnavailable` with the cause."""
        if self._checked:
            return
        if shutil.which("bwrap") is None:
            raise SandboxUnavailable(
                "model-written code runs inside bubblewrap (`bwrap`), which is not installed. " + INSTALL_HINT
            )
        if os.geteuid() == 0 and not os.path.exists("/usr/bin/setpriv"):
            raise SandboxUnavailable(
                "running as root, alignkit drops model-written code to uid 65534 with "
                "/usr/bin/setpriv (util-linux), which is missing: install util-linux."
            )
        res = self.run("import os\nprint(os.getuid(), os.getpid())", Limits(timeout_s=30))
        if res.error is not None or res.stdout.split() != [str(NOBODY), "2"]:
            raise SandboxUnavailable(
                f"bubblewrap is installed but a sandbox did not start ({res.error or res.stdout}; "
                f"{res.stderr.strip()[-400:]}). Unprivileged user namespaces may be disabled "
                "(sysctl kernel.unprivileged_userns_clone=1, or run in a container that allows "
                "them). " + INSTALL_HINT
            )
        self._checked = True

    def run(self, code: str, limits: Limits) -> CodeResult:
        fd = os.memfd_create("alignkit-code")
        try:
            os.write(fd, code.encode("utf-8", errors="replace"))
            os.lseek(fd, 0, os.SEEK_SET)
            return run_bounded(
                self._argv(limits, fd),
                limits,
                env={"PATH": "/usr/bin:/bin"},
                pass_fds=(fd,),
                preexec=_rlimits(limits),
                describe=_describe,
            )
        finally:
            os.close(fd)


class UnsandboxedExecutor:
    """`env.sandbox: none`: a plain child process with the limits and no isolation. The code can
    read and write whatever this user can, and reach the network."""

    name = "none"

    def check(self) -> None:
        pass

    def run(self, code: str, limits: Limits) -> CodeResult:
        import tempfile

        scratch = tempfile.mkdtemp(prefix="alignkit-python-")
        try:
            with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
            return run_bounded(
                [sys.executable, "-I", "main.py"], limits, env=env, cwd=scratch, preexec=_rlimits(limits)
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


UNSAFE_WARNING = (
    "WARNING: env.sandbox=none: model-written code runs WITHOUT isolation, as this user, with this "
    "machine's files and network. Use it only for code you trust."
)

_DEFAULT: dict = {}


def make_executor(spec: str | None) -> CodeExecutor:
    """`env.sandbox`: `bwrap` (the default), `none`, or `file.py:Class` / `module:Class` (a
    `CodeExecutor` made with no arguments)."""
    spec = spec or "bwrap"
    if spec == "bwrap":
        return _DEFAULT.setdefault("bwrap", BwrapExecutor())  # one probe per process
    if spec == "none":
        return UnsandboxedExecutor()
    from alignkit.plugins import load_module

    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"`env.sandbox`: {spec!r} is not `bwrap`, `none` or `file.py:Class`.")
    cls = getattr(load_module(target, f"`env.sandbox` {spec!r}: file"), name, None)
    if cls is None:
        raise ConfigError(f"`env.sandbox` {spec!r}: {target} has no {name}.")
    executor = cls()
    if not isinstance(executor, CodeExecutor):
        raise ConfigError(
            f"`env.sandbox` {spec!r}: {name} is not a code executor (it needs `name`, `check()` and "
            "`run(code, limits) -> CodeResult`; see alignkit.envs.sandbox.CodeExecutor)."
        )
    return executor
