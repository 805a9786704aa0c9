"""Scratch directories (`alignkit.scratch`): a killed process's are removed by the next one made in
the same place, a live process's never."""

import os
import signal
import subprocess
import sys
import textwrap

from alignkit import scratch


def test_a_killed_process_leaves_its_scratch_to_the_next_one(tmp_path, monkeypatch):
    monkeypatch.setattr(scratch.tempfile, "tempdir", str(tmp_path))  # gettempdir() is tmp_path here
    code = textwrap.dedent(
        """
        import os, signal, sys
        from alignkit import scratch
        class Owner: ...
        owner = Owner()  # lives as long as the program
        path, _ = scratch.owned(owner, "test-kind")
        (path / "weights").write_bytes(b"x" * 1000)
        print(path, flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.read()  # "wait": alive until the test closes stdin
        """
    )
    env = dict(os.environ, TMPDIR=str(tmp_path))
    killed = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True, env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    dead = tmp_path / os.path.basename(killed.stdout.strip())
    assert dead.is_dir() and dead.name.startswith("alignkit-test-kind-")  # no finalizer ran
    live = subprocess.Popen(
        [sys.executable, "-c", code, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        alive = tmp_path / os.path.basename(live.stdout.readline().strip())
        other = tmp_path / "alignkit-other-kind-1-x"  # another kind, whatever its process, is not this one's
        other.mkdir()
        # the dead process's number in another PID namespace (another container sharing /dev/shm) is
        # another process, which may be alive
        pid = dead.name.split("-")[3]
        elsewhere = tmp_path / f"alignkit-test-kind-{pid}-1-x"
        elsewhere.mkdir()
        mine = scratch.scratch_dir("test-kind")
        assert mine.parent == tmp_path and mine.name.startswith(f"alignkit-test-kind-{os.getpid()}-")
        assert not dead.exists() and alive.is_dir() and other.is_dir() and elsewhere.is_dir()
        assert scratch.sweep("test-kind", tmp_path) == []  # this process's own directory stays too
        assert mine.is_dir()
    finally:
        live.stdin.close()
        live.wait(timeout=60)
    assert not alive.exists()  # its finalizer removed it at exit
