"""Scratch directories (`alignkit.scratch`): a killed process's are removed by the next one made in
the same place, a live process's never."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_an_engines_temporary_directory_keeps_torchs_compile_cache_where_torch_keeps_it(tmp_path, monkeypatch):
    """vLLM compiles a CPU kernel for the log-probs alignkit asks for, and torch builds a 150 MB
    precompiled header for it under the temporary directory. The engine's processes get a temporary
    directory of their own, which links to the cache of this process: the processes find the cache
    every engine before them built (docs/vllm.md: a later engine's first sample 2.2 s instead of 7.7 s),
    and removing the directory leaves the cache."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from alignkit.generation.vllm_engine import temp_files_in

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # this process's temporary directory
    cache, engine = Path(default_cache_dir()), tmp_path / "engine"
    assert cache.parent == tmp_path / "tmp"
    engine.mkdir()
    env = {"VLLM_RPC_BASE_PATH": "/run/sockets"}
    temp_files_in(env, engine)
    assert env == {"TMPDIR": str(engine), "VLLM_RPC_BASE_PATH": "/run/sockets"}  # the user's socket place kept
    # what torch computes in a process started with that environment
    seen = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from torch._inductor.runtime.cache_dir_utils import default_cache_dir as d; "
            "print(os.path.realpath(os.path.join(d(), 'precompiled_headers')))",
        ],
        env=dict(os.environ, TMPDIR=str(engine)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert seen == os.path.realpath(cache / "precompiled_headers")
    (cache / "kept").write_text("x")
    shutil.rmtree(engine)
    assert (cache / "kept").is_file()
