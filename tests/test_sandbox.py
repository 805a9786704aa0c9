"""Model-written code behind the operating-system sandbox (`alignkit.envs.sandbox`, bubblewrap).

Every escape a review found against the old in-interpreter audit hook is tried here through a real
episode step (`PythonEnvironment.step` with a `<tool_call>`), and each must fail to reach outside:
no host file read, created or changed, no packet out, no process left, the caller unharmed and its
memory bounded. Legitimate programs still work."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from alignkit.envs import load_environment_class
from alignkit.envs.sandbox import Limits, SandboxUnavailable, make_executor

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap is not installed (apt-get install bubblewrap; `make test` does it)",
)


def step(code: str, **limits) -> str:
    """What the model reads after calling the python tool with `code`."""
    env = load_environment_class("python")(**limits)
    call = "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>"
    result = env.step({"role": "assistant", "content": call})
    assert not result.done and len(result.messages) == 1 and result.messages[0]["role"] == "tool"
    return result.messages[0]["content"]


@pytest.fixture
def outside(tmp_path):
    """A directory of the host with a canary file the sandboxed code must not see or change."""
    (tmp_path / "canary.txt").write_text("canary")
    os.chmod(tmp_path / "canary.txt", 0o644)
    return tmp_path


@pytest.fixture
def visible_canary():
    """A canary inside the interpreter's installation: visible in the sandbox, read-only there."""
    path = Path(sys.prefix) / f"alignkit-canary-{uuid.uuid4().hex}.txt"
    path.write_text("canary")
    os.chmod(path, 0o644)
    yield path
    path.unlink(missing_ok=True)


def unchanged(directory: Path, names: set):
    assert {p.name for p in directory.iterdir()} == names
    canary = directory / "canary.txt"
    if canary.exists():
        assert canary.read_text() == "canary" and (canary.stat().st_mode & 0o777) == 0o644


def test_patching_the_old_guard_then_starting_a_process_runs_as_nobody_inside(outside):
    out = step(
        "import __main__\n__main__._NO = ()\nimport subprocess\n"
        "print(subprocess.run(['id', '-u'], capture_output=True, text=True).stdout.strip())\n"
        f"subprocess.run(['touch', {str(outside / 'made')!r}])\n"
        f"print(subprocess.run(['cat', {str(outside / 'canary.txt')!r}], capture_output=True).returncode)\n"
    )
    assert out.split()[:2] == ["65534", "1"], out  # an unprivileged uid; the host file is not there to read
    unchanged(outside, {"canary.txt"})


def test_a_hard_link_to_the_shadow_file_reads_nothing():
    out = step("import os\nos.link('/etc/shadow', 's')\nprint(open('s').read())\n")
    assert "error:" in out and "FileNotFoundError" in out, out
    if os.access("/etc/shadow", os.R_OK):
        first = open("/etc/shadow").read().splitlines()[0]
        assert first not in out


def test_a_pth_file_cannot_be_planted_in_site_packages():
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    target = site / f"alignkit_escape_{uuid.uuid4().hex}.pth"
    try:
        out = step(
            f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n"
            "os.write(fd, b'import os; os.system(\"id\")')\n"
        )
        assert "Read-only file system" in out, out
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "op",
    [
        "os.rename(T, T + '.moved')",
        "os.remove(T)",
        "os.truncate(T, 0)",
        "os.chmod(T, 0o777)",
        "os.mkdir(T + '.dir')",
        "os.symlink('/', T + '.link')",
        "open(T, 'w').write('x')",
    ],
)
def test_files_outside_scratch_cannot_be_changed(op, outside, visible_canary):
    before = {p.name for p in visible_canary.parent.iterdir()}
    for target in (outside / "canary.txt", visible_canary):  # one the sandbox cannot see, one it sees read-only
        out = step(f"import os\nT = {str(target)!r}\n{op}\nprint('changed')\n")
        assert "changed" not in out and "error:" in out, out
    unchanged(outside, {"canary.txt"})
    assert visible_canary.read_text() == "canary" and (visible_canary.stat().st_mode & 0o777) == 0o644
    assert {p.name for p in visible_canary.parent.iterdir()} == before


def test_posixsubprocess_fork_exec_and_posix_spawn_stay_inside(outside):
    # subprocess.Popen is _posixsubprocess.fork_exec; os.posix_spawn is the other way to a new program
    out = step(
        "import os, subprocess, _posixsubprocess\n"
        f"subprocess.Popen(['touch', {str(outside / 'a')!r}]).wait()\n"
        f"pid = os.posix_spawn('/usr/bin/touch', ['touch', {str(outside / 'b')!r}], {{}})\n"
        "print(os.waitpid(pid, 0)[1] != 0)\n"
    )
    assert out.strip() == "True", out
    unchanged(outside, {"canary.txt"})


def test_multiprocessing_stays_inside(outside):
    out = step(
        "import multiprocessing as mp\n"
        "def f(p):\n    open(p, 'w').write('x')\n"
        "if __name__ == '__main__':\n"
        f"    p = mp.Process(target=f, args=({str(outside / 'mp')!r},))\n    p.start(); p.join()\n"
        "    print('exit', p.exitcode)\n"
    )
    assert "exit 1" in out, out
    unchanged(outside, {"canary.txt"})


def test_no_udp_packet_leaves():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.5)
    port = rx.getsockname()[1]
    out = step(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"print(s.sendmsg([b'escape'], [], 0, ('127.0.0.1', {port})))\n"
        f"s.sendto(b'escape', ('10.0.0.1', {port}))\n"
    )
    with pytest.raises(socket.timeout):
        rx.recvfrom(100)  # the loopback the sandbox sent to is its own
    rx.close()
    assert "Network is unreachable" in out, out  # and there is no route anywhere else


def test_a_listening_socket_inside_is_not_reachable_from_outside():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = {}
    code = (
        "import socket, time\ns = socket.socket()\n"
        f"s.bind(('127.0.0.1', {port}))\ns.listen()\nprint('listening')\ntime.sleep(2)\n"
    )
    t = threading.Thread(target=lambda: result.setdefault("out", step(code)))
    t.start()
    refused, deadline = 0, time.monotonic() + 1.5
    while time.monotonic() < deadline:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        refused += 1
        time.sleep(0.1)
    t.join()
    assert refused > 5 and result["out"].strip() == "listening", result


def test_signals_cannot_reach_the_caller():
    """Run in a child process so that a failure kills the child, not the test session."""
    script = (
        "import json, os, signal\n"
        "from tests.test_sandbox import step\n"
        "code = ('import os, signal\\n'\n"
        "        'print(os.getppid())\\n'\n"
        "        'signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\\n'\n"
        "        f'os.kill({os.getpid()}, signal.SIGKILL)\\n')\n"
        "print(json.dumps(step(code)))\nprint('caller alive')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("caller alive"), proc.stderr[-2000:]
    seen = json.loads(proc.stdout.splitlines()[0])
    assert "ProcessLookupError" in seen or "PermissionError" in seen, seen


def _processes_with(marker: str) -> list:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def test_no_process_outlives_the_call_not_even_a_new_session():
    marker = f"alignkit-marker-{uuid.uuid4().hex}"
    out = step(
        "import subprocess, sys, os\n"
        f"subprocess.Popen(['setsid', sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        f"if os.fork() == 0:\n    os.setsid()\n    os.execv(sys.executable, [sys.executable, '-c', "
        f"'import time; time.sleep(60)', {marker!r}])\n"
        "while True:\n    pass\n",
        timeout_s=1.5,
    )
    assert "timed out after 1.5 s" in out, out
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


def test_replacing_functions_found_through_gc_changes_nothing_outside(outside):
    out = step(
        "import gc, types\n"
        "for f in [o for o in gc.get_objects() if isinstance(o, types.FunctionType)]:\n"
        "    try:\n        f.__code__ = (lambda *a, **k: None).__code__\n    except Exception:\n        pass\n"
        f"open({str(outside / 'gc')!r}, 'w').write('x')\n"
    )
    assert "error:" in out, out
    unchanged(outside, {"canary.txt"})


def test_unbounded_output_is_cut_without_filling_the_callers_memory():
    script = (
        "import resource, time, json\nfrom tests.test_sandbox import step\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nt = time.monotonic()\n"
        "out = step('while True:\\n    print(\"x\" * 100000)\\n', timeout_s=3)\n"
        "print(json.dumps([time.monotonic() - t, len(out), out[-120:], "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, length, tail, grew_kib = json.loads(proc.stdout.splitlines()[-1])
    assert "output cut at 10000 bytes" in tail
    assert seconds < 3 and length <= 2000 + 200  # stopped at the cap, not at the timeout
    assert grew_kib < 20 * 1024, grew_kib


def test_limits_time_memory_and_processes_end_with_clear_errors():
    assert "timed out after 1 s" in step("while True:\n    pass\n", timeout_s=1)
    assert "out of memory (the tool's limit is 256 MiB)" in step("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256)
    assert "Resource temporarily unavailable" in step("import os\nfor _ in range(100):\n    os.fork()\n")
    assert "No space left on device" in step("open('big', 'wb').write(b'x' * (80 << 20))\n", scratch_mb=8, file_mb=64)


def test_ordinary_programs_work_as_before():
    out = step(
        "import math, os, json\nopen('notes.txt', 'w').write('ok')\n"
        "print(round(math.sqrt(2), 4), open('notes.txt').read(), sorted(os.listdir('.')))\n"
    )
    assert out == "1.4142 ok ['main.py', 'notes.txt']"
    assert step("pass") == "(no output)"
    assert step("raise ValueError('bad input')").endswith("error: ValueError: bad input")
    try:
        import numpy  # noqa: F401
    except ImportError:
        return
    assert step("import numpy as np\nprint(int(np.arange(10).sum()))") == "45"


def test_without_bubblewrap_a_code_tool_refuses_and_says_how_to_install(monkeypatch, tmp_path):
    from alignkit.envs.sandbox import BwrapExecutor

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on the PATH
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*env.sandbox=none"):
        BwrapExecutor().check()


def test_env_sandbox_none_is_loud_and_a_plugin_executor_is_used(tmp_path, capsys):
    from alignkit.envs.builtin import bind_executor

    none = make_executor("none")
    out = none.run("import os\nprint(os.getuid() == 65534)", Limits())
    assert out.stdout.strip() == str(os.getuid() == 65534)  # runs as this user: no isolation at all
    (tmp_path / "remote.py").write_text(
        "from alignkit.envs.sandbox import CodeResult\n"
        "class Echo:\n    name = 'echo'\n    calls = []\n"
        "    def check(self):\n        pass\n"
        "    def run(self, code, limits):\n        Echo.calls.append((code, limits.timeout_s))\n"
        "        return CodeResult('ran ' + code, '', None)\n"
    )
    executor = make_executor(f"{tmp_path / 'remote.py'}:Echo")
    env = load_environment_class("python")(timeout_s=7)
    env.tools = bind_executor(env.tools, executor)
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>'
    assert env.step({"role": "assistant", "content": call}).messages[0]["content"] == "ran print(1)"
    assert type(executor).calls == [("print(1)", 7)]
    (tmp_path / "bad.py").write_text("class NotOne:\n    pass\n")
    with pytest.raises(Exception, match="is not a code executor"):
        make_executor(f"{tmp_path / 'bad.py'}:NotOne")


def test_a_run_with_env_sandbox_none_says_so_at_start(tiny_model_dir, tmp_path, capfd):
    from conftest import write_jsonl

    from alignkit.config import load_config
    from alignkit.models import load_tokenizer
    from alignkit.train.episodes import EpisodeSampler

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is 1 plus 2 ?", "answer": "3"}])
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"data.train={data}",
            "recipe=grpo",
            "env.name=python",
            "env.sandbox=none",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    EpisodeSampler(cfg, load_tokenizer(cfg.model))
    assert "env.sandbox=none: model-written code runs WITHOUT isolation" in capfd.readouterr().err
    with pytest.raises(Exception, match="env.sandbox"):
        load_config(
            None,
            [
                f"model.name_or_path={tiny_model_dir}",
                f"data.train={data}",
                "recipe=grpo",
                "env.name=python",
                "env.sandbox=docker",
            ],
        )


def test_a_failure_is_named_by_its_exception_line_when_tracebacks_interleave():
    """Forked children that fail together write their tracebacks at once: the message is the
    exception's line, not whichever line came last."""
    from alignkit.envs.sandbox import _describe

    stderr = (
        "Traceback (most recent call last):\n"
        '  File "/scratch/main.py", line 3, in <module>\n'
        "BlockingIOError: [Errno 11] Resource temporarily unavailable\n"
        "Traceback (most recent call last):\n"
        '  File "/scratch/main.py", line 3, in <module>\n'
    )
    assert _describe(1, stderr, Limits()) == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert _describe(1, "something went wrong\n", Limits()) == "something went wrong"
    assert _describe(3, "", Limits()) == "exit code 3"
