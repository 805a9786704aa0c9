"""Asynchronous online RL (`online.async`, issue 28) against a real `alignkit sample-serve` process.

- sync (the default) trains exactly what it trained before the asynchronous modes came (pinned);
- one_step_off: rollout t is sampled by the weights of step t-1; a SIGKILL and --resume reproduce
  the uninterrupted run within 1e-6;
- stream: partial rollouts record each token's policy version; after a crash and --resume every
  prompt of the epoch is trained exactly once;
- a server that dies or stops answering ends the run within `generation.request_timeout_s` with a
  message naming it; the checkpoint before is intact and --resume continues once a server is back.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, count_sent, crash_after, torchrun, toy_pairs, write_jsonl
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

REWARD = """
def yes_share(prompts, completions, **columns):
    return [c.split().count("yes") / max(1, len(c.split())) for c in completions]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An `alignkit sample-serve` in a process of its own (one thread)."""

    def __init__(self, model_dir: Path, sync_dir: Path, port: int | None = None):
        self.port, self.sync_dir = port or free_port(), sync_dir
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "alignkit", "sample-serve", "--model", str(model_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd + ["--sync-dir", str(sync_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        raise AssertionError("sample-serve did not start within 120 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from alignkit.testing import save_tiny_model_dir

    r = tmp_path_factory.mktemp("async")
    save_tiny_model_dir(r / "llama")
    write_jsonl(r / "prompts.jsonl", [{"prompt": p["prompt"], "answer": "#### 1"} for p in toy_pairs(48)])
    (r / "rewards.py").write_text(REWARD)
    return r


@pytest.fixture(scope="module")
def server(root):
    s = Server(root / "llama", root / "sync")
    yield s
    s.stop()


def _args(root: Path, out: str, *extra) -> list:
    return base_overrides(root / "llama", root / "prompts.jsonl", root / out, root / "cache") + [
        "recipe=grpo",
        f"online.rewards={root / 'rewards.py'}:yes_share",
        "generation.num_samples=4",
        "generation.max_new_tokens=8",
        "generation.temperature=1.0",
        "train.batch_size=4",
        "train.warmup_ratio=0",
        "train.learning_rate=3e-2",
        "train.lr_schedule=constant",
        "data.eval_fraction=0.25",
        "train.eval_every=0",
        *extra,
    ]


def _served(server: Server, mode: str, *extra) -> list:
    return [
        f"online.async.mode={mode}",
        f"generation.sampler_server={server.url}",
        f"generation.vllm_sync_dir={server.sync_dir}",
        *extra,
    ]


def _params(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# The final weights of this 4-step GRPO run at commit dfa2edd, before the asynchronous modes existed
# (sum of |w| and of w^2 in float64; identical with 1 and 2 threads). Pinned to 1e-6 relative, not
# closer: float32 matmul kernels accumulate in a different order on different CPUs (AVX2 against
# AVX-512), which moved the sum by 1.6e-9 relative between two machines of this workplace at the
# same commit; any change in what trains moves it by far more. Bit for bit is checked on one
# machine instead: the default run and the explicit `sync` run give identical weights.
PINNED_ABS, PINNED_SQ = 1744.6889334346633, 292.67622314006917


def test_sync_mode_trains_what_it_trained_before(root):
    runs = {}
    for explicit in (False, True):
        extra = ["online.async.mode=sync", "online.async.max_staleness=0"] if explicit else []
        args = _args(root, f"sync_{explicit}", "generation.num_samples=4", "train.max_steps=4", *extra)
        result = loop.train(load_config(None, args), progress=False)
        runs[explicit] = _params(result.final_dir)
        assert not any(k.startswith("async/") for k in read_metrics(result.run_dir, "train")[-1])
    assert _max_diff(runs[False], runs[True]) == 0.0
    params = runs[True]
    assert sum(float(v.double().abs().sum()) for v in params.values()) == pytest.approx(PINNED_ABS, rel=1e-6)
    assert sum(float((v.double() ** 2).sum()) for v in params.values()) == pytest.approx(PINNED_SQ, rel=1e-6)


def test_one_step_off_samples_with_the_weights_one_step_behind(root, server):
    result = loop.train(load_config(None, _args(root, "osf", "train.max_steps=4", *_served(server, "one_step_off"))))
    rows = read_metrics(result.run_dir, "train")
    # step 1 trains on samples of its own weights: the server's log-probs are the trainer's (same code, float32)
    assert rows[0]["async/staleness_max"] == 0 and rows[0]["logprob_mismatch_max"] < 1e-5
    for r in rows[1:]:  # later steps: every token one version behind, so the log-probs differ
        assert r["async/staleness_mean"] == 1 and r["async/staleness_max"] == 1
        assert r["logprob_mismatch_max"] > 1e-3
    for key in ("async/trainer_idle_fraction", "async/sampler_idle_fraction", "async/buffer_fill"):
        assert 0 <= rows[-1][key] <= 1, key
    logged = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["version"] for r in logged] == [0, 0, 1, 2]  # rollout t asked for with the weights of step t-1


_KILL = r"""
import os, signal, sys
from alignkit.cli import main
from alignkit.train import modules

kill_after, steps = int(sys.argv[1]), {"n": 0}
real_step = modules.TrainedModule.step

def step(self, apply):
    real_step(self, apply)
    steps["n"] += 1
    if steps["n"] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler runs

modules.TrainedModule.step = step
sys.exit(main(["train", *sys.argv[2:]]))
"""


def _killed_run(args: list, kill_after: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL, str(kill_after), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_one_step_off_sigkill_and_resume_equals_the_uninterrupted_run(root, server):
    common = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3", *_served(server, "one_step_off")]
    full = loop.train(load_config(None, _args(root, "osf_full", *common)), progress=False)
    args = _args(root, "osf_killed", *common)
    _killed_run(args, kill_after=5)  # step 5 applied in memory, nothing of it saved: resumes from step 4
    resumed = loop.train(load_config(None, args), resume=True, progress=False)
    assert _max_diff(_params(full.final_dir), _params(resumed.final_dir)) < 1e-6
    full_rows = read_metrics(full.run_dir, "train")
    resumed_rows = read_metrics(resumed.run_dir, "train")
    assert [r["reward"] for r in resumed_rows] == [r["reward"] for r in full_rows]


def test_stream_crash_and_resume_trains_every_prompt_once(root, server, monkeypatch):
    # 36 training prompts, 4 per step: one epoch is 9 steps
    args = _args(root, "stream", "train.max_steps=9", "train.save_every=3", *_served(server, "stream"))
    crash_after(monkeypatch, at_step=3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_config(None, args), progress=False)
    monkeypatch.undo()
    result = loop.train(load_config(None, args), resume=True, progress=False)
    logged = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 10))
    trained = sorted(i for r in logged for i in r["examples"])
    assert trained == sorted(set(trained)) and len(trained) == 36  # each prompt exactly once
    rows = read_metrics(result.run_dir, "train")
    assert max(r["async/staleness_max"] for r in rows) <= 2  # online.async.max_staleness (stream default)
    assert all(r["async/dropped_stale"] >= 0 for r in rows)


def test_partial_rollouts_swap_weights_between_tokens(root):
    """A reload that arrives mid-batch reaches the model at the next token; each token says which
    version sampled it."""
    from transformers import AutoModelForCausalLM

    from alignkit.config import ModelConfig
    from alignkit.generation.decode import SamplingParams
    from alignkit.generation.sampler_server import SamplerService
    from alignkit.generation.vllm_engine import write_weights
    from alignkit.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "llama", dtype=torch.float32)
    tok = load_tokenizer(ModelConfig(name_or_path=str(root / "llama")))
    service = SamplerService(model, tok, "tiny")
    update = root / "partial"
    update.mkdir(exist_ok=True)
    new = {k: v + 0.01 for k, v in model.state_dict().items()}
    write_weights(new, update)
    calls = {"n": 0}
    real = service.between_tokens

    def hook():
        calls["n"] += 1
        if calls["n"] == 4:  # three tokens sampled: an update arrives while the batch is in flight
            assert service.reload(str(update), 7) == 7
            assert service.version == 0  # not yet: the batch is generating
        return real()

    service.between_tokens = hook
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, logprobs="processed")
    tok_ids = tok("what is 2 plus 3 ?")["input_ids"]
    groups = service.sample([tok_ids], params, [11], min_version=0, timeout=5)
    for s in groups[0]:
        n = len(s.token_ids)
        assert s.versions == ([0, 0, 0] + [7] * (n - 3))[:n]
    assert service.version == 7
    assert torch.equal(model.state_dict()["model.norm.weight"], new["model.norm.weight"])


def _server_fault(root, out: str, where: str, sig: int):
    """Run one_step_off until the sampler is asked for rollout 4 (where="generation") or sent the
    weights of step 3 (where="sync"), send the server `sig` right then, and return (the error, the
    seconds from the fault to the error, the run's args, the server)."""
    from alignkit.generation.vllm_engine import VLLMServer
    from alignkit.train.async_rollouts import RolloutPipeline

    srv = Server(root / "llama", root / f"sync_{out}")
    args = _args(
        root,
        out,
        "train.max_steps=6",
        "train.save_every=2",
        "generation.request_timeout_s=4",
        *_served(srv, "one_step_off"),
    )
    state: dict = {"at": None}

    def fault():
        if state["at"] is None:
            state["at"] = time.perf_counter()
            os.kill(srv.proc.pid, sig)

    if where == "generation":
        cls, name = RolloutPipeline, "_generate"
        real = cls._generate

        def patched(self, key, version):
            if key == 4:
                fault()
            return real(self, key, version)
    else:
        cls, name = VLLMServer, "load_state"
        real = cls.load_state

        def patched(self, weights, version=None):
            if version == 3:
                fault()
            return real(self, weights, version)

    setattr(cls, name, patched)
    try:
        with pytest.raises(ConfigError) as err:
            loop.train(load_config(None, args), progress=False)
    finally:
        setattr(cls, name, real)
    return err.value, time.perf_counter() - state["at"], args, srv


@pytest.mark.parametrize(
    "where,sig", [("generation", signal.SIGKILL), ("generation", signal.SIGSTOP), ("sync", signal.SIGKILL)]
)
def test_a_dead_or_silent_server_stops_the_run_with_a_message_then_resume(root, where, sig):
    out = f"fault_{where}_{int(sig)}"
    error, seconds, args, srv = _server_fault(root, out, where, sig)
    try:
        assert srv.url in str(error), error
        assert ("did not answer" in str(error)) == (sig == signal.SIGSTOP), error
        assert "--resume" in str(error)
        assert seconds < 4 + 10  # within the request timeout (4 s): no hang
        assert (root / out / "checkpoint-2" / "model.safetensors").is_file()  # the last checkpoint is intact
    finally:
        if sig == signal.SIGSTOP:
            os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()
    back = Server(root / "llama", srv.sync_dir, port=srv.port)  # a server is back at the same address
    try:
        result = loop.train(load_config(None, args), resume=True, progress=False)
        assert result.steps == 6 and (result.final_dir / "model.safetensors").is_file()
    finally:
        back.stop()


def test_prompts_spread_across_two_servers_train_what_one_server_trains(root, server):
    import urllib.request

    from alignkit.generation.vllm_engine import default_token_file

    second = Server(root / "llama", root / "sync")  # the same sync directory: one update serves both
    try:
        one = loop.train(
            load_config(None, _args(root, "one_server", "train.max_steps=3", *_served(server, "one_step_off")))
        )
        both = [
            "online.async.mode=one_step_off",
            f"generation.sampler_server=[{server.url}, {second.url}]",
            f"generation.vllm_sync_dir={server.sync_dir}",
        ]
        two = loop.train(load_config(None, _args(root, "two_servers", "train.max_steps=3", *both)), progress=False)
        # each prompt has its own seed: which server sampled it does not change the samples
        assert _max_diff(_params(one.final_dir), _params(two.final_dir)) < 1e-6
        for s in (server, second):  # both hold the last weights published (version 3: the final evaluation's)
            token = default_token_file(str(s.sync_dir), s.port).read_text().strip()
            req = urllib.request.Request(s.url + "/health", headers={"Authorization": f"Bearer {token}"})
            assert json.loads(urllib.request.urlopen(req, timeout=10).read())["version"] == 3
    finally:
        second.stop()


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("rloo", []),
        ("reinforce_pp", ["online.kl_coef=0.05"]),
        ("ppo", ["ppo.epochs=2", "ppo.minibatches=2", "train.max_steps=9"]),  # 4 updates per rollout
        ("online_dpo", []),
        ("raft", []),
        ("grpo", ["loss.name=gspo", "online.iterations=2", "train.max_steps=5"]),
        ("grpo", ["loss.name=cispo", "online.tis_cap=2", "online.is_mask_low=0.5", "online.is_mask_high=2"]),
        ("distill", ["teacher.name_or_path={model}"]),
    ],
)
def test_every_online_recipe_trains_one_step_off(root, server, recipe, extra):
    extra = [e.format(model=root / "llama") for e in extra]
    args = _args(root, f"recipe_{recipe}_{len(extra)}", "train.max_steps=3", *extra, *_served(server, "one_step_off"))
    steps = int([a for a in args if a.startswith("train.max_steps=")][-1].split("=")[1])
    args[args.index("recipe=grpo")] = f"recipe={recipe}"
    if recipe == "distill":  # learns from the teacher, not from a reward
        args = [a for a in args if not a.startswith("online.rewards=")]
    result = loop.train(load_config(None, args), progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert len(rows) == steps and rows[0]["async/staleness_max"] == 0
    # the last rollout was sampled a rollout cycle behind: `iterations` optimizer steps (versions)
    assert rows[-1]["async/staleness_mean"] >= 1


def test_two_training_processes_one_step_off_equal_one_process(root, server):
    """torchrun, 2 processes with 2 prompts each against 1 process with 4: the first process
    publishes each update, and the server samples every request once it holds the version the
    request names, so both processes sample what the single process samples."""
    single = loop.train(
        load_config(None, _args(root, "dist_one", "train.max_steps=3", *_served(server, "one_step_off"))),
        progress=False,
    )
    args = _args(root, "dist_two", "train.max_steps=3", *_served(server, "one_step_off"))
    args[args.index("train.batch_size=4")] = "train.batch_size=2"
    proc = torchrun([{"argv": ["train", *args]}], root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(root / "dist_two", "train")
    assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1]
    assert _max_diff(_params(single.final_dir), _params(root / "dist_two" / "final")) < 1e-5


@pytest.mark.parametrize("mode", ["sync", "one_step_off"])
def test_lora_with_a_server_under_two_processes_equals_one_process(root, server, mode):
    """LoRA against a sampling server under torchrun (issue 32; refused before): every process
    gathers the adapters from their FSDP shards and the first sends them, so 2 processes with 2
    prompts each train what 1 process with 4 trains."""
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.max_steps=2"]
    single = loop.train(
        load_config(None, _args(root, f"lora_one_{mode}", *lora, *_served(server, mode))), progress=False
    )
    args = _args(root, f"lora_two_{mode}", *lora, *_served(server, mode))
    args[args.index("train.batch_size=4")] = "train.batch_size=2"
    proc = torchrun([{"argv": ["train", *args]}], root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(root / f"lora_two_{mode}", "train")
    assert rows[0]["logprob_mismatch_max"] < 1e-5  # the server sampled with the trainer's adapters
    assert _max_diff(_params(single.final_dir), _params(root / f"lora_two_{mode}" / "final")) < 1e-5


@pytest.mark.parametrize("dynamic", [False, True])
def test_one_step_off_in_one_process_samples_what_the_server_samples(root, server, dynamic):
    """Without a server, a copy of the policy samples in a thread of the training process; the
    schedule and the seeds are the same, so it trains what the run against the server trains.
    With DAPO's dynamic sampling the extra prompts of a step are sampled by the pipeline's sampler
    too, after what is queued for it, with the weights the trainer holds (on either placement)."""
    extra = ["online.dynamic_sampling=true", "online.dynamic_sampling_rounds=2"] if dynamic else []
    served = loop.train(
        load_config(
            None, _args(root, f"local_ref_{dynamic}", "train.max_steps=3", *extra, *_served(server, "one_step_off"))
        )
    )
    local = loop.train(
        load_config(
            None, _args(root, f"local_{dynamic}", "train.max_steps=3", *extra, "online.async.mode=one_step_off")
        ),
        progress=False,
    )
    rows = read_metrics(local.run_dir, "train")
    assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1]
    assert _max_diff(_params(served.final_dir), _params(local.final_dir)) < 1e-6
    if dynamic:  # the tiny model rarely says "yes": groups of equal rewards were dropped and refilled
        assert sum(r["dynamic_sampling/extra_prompts"] for r in rows) > 0
        assert [r["dynamic_sampling/extra_prompts"] for r in rows] == [
            r["dynamic_sampling/extra_prompts"] for r in read_metrics(served.run_dir, "train")
        ]


def test_lora_runs_publish_adapters_only(root, server, monkeypatch):
    """A LoRA run sends the sampler its adapters (a few percent of the weights), in one_step_off to
    the server and to the copy in the training process alike; both merge them into what the trainer
    holds, so the two runs train the same weights, and step 1's log-probs are the trainer's."""
    sent = count_sent(monkeypatch, adapters_as="save")
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.max_steps=3"]
    served = loop.train(load_config(None, _args(root, "lora_served", *lora, *_served(server, "one_step_off"))))
    assert sent == {"adapters": 3, "weights": 0}  # versions 0, 1, 2 (rollouts 0-1, 2, 3)
    local = loop.train(load_config(None, _args(root, "lora_local", *lora, "online.async.mode=one_step_off")))
    rows = read_metrics(served.run_dir, "train")
    assert rows[0]["logprob_mismatch_max"] < 1e-5 and [r["async/staleness_mean"] for r in rows] == [0, 1, 1]
    assert _max_diff(_params(served.final_dir), _params(local.final_dir)) < 1e-6
    # sync mode against the server: adapters before every rollout, the run of the policy itself
    sync_served = loop.train(load_config(None, _args(root, "lora_sync_served", *lora, *_served(server, "sync"))))
    assert sent["adapters"] >= 3 + 3 and sent["weights"] == 0  # each rollout's, and the held-out samples'
    sync_local = loop.train(load_config(None, _args(root, "lora_sync_local", *lora)))
    assert _max_diff(_params(sync_served.final_dir), _params(sync_local.final_dir)) < 1e-6


def test_episodes_on_a_sampling_server(root, server):
    """Multi-turn episodes turn by turn on `alignkit sample-serve` (refused before): tokens in,
    tokens out, the trainer's log-probs of the model's tokens the server's (1e-5, same code and
    weights at step 1); the tool replies are context."""
    from test_episodes import ENV

    (root / "quiz.py").write_text(ENV)
    args = _args(root, "episodes_served", "train.max_steps=2", f"generation.sampler_server={server.url}")
    args = [a for a in args if not a.startswith("online.rewards=")] + [
        f"env.name={root / 'quiz.py'}:Quiz",
        f"generation.vllm_sync_dir={server.sync_dir}",
    ]
    result = loop.train(load_config(None, args), progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert len(rows) == 2 and rows[0]["logprob_mismatch_max"] < 1e-5 and all(r["episode/turns"] > 1 for r in rows)
    episodes = [json.loads(line) for line in (result.run_dir / "episodes.jsonl").read_text().splitlines()]
    assert all(not m for e in episodes for t, m in e["spans"] if "yes no yes" in t)


def _episodes(root: Path, out: str, *extra) -> list:
    """`_args` for multi-turn episodes in test_episodes' quiz environment (it rewards them itself)."""
    from test_episodes import ENV

    (root / "quiz.py").write_text(ENV)
    args = [a for a in _args(root, out, *extra) if not a.startswith("online.rewards=")]
    return args + [f"env.name={root / 'quiz.py'}:Quiz"]


def test_episodes_one_step_off_on_a_server_two_processes_equal_one_process(root, server):
    """Multi-turn episodes sampled ahead on `sample-serve` (refused before): every turn of rollout
    t names the version of step t-1 and the server waits for it, so the run is deterministic and
    2 processes with 2 prompts each train what 1 process with 4 trains."""
    common = ["train.max_steps=3", *_served(server, "one_step_off")]
    single = loop.train(load_config(None, _episodes(root, "ep_osf_one", *common)), progress=False)
    rows = read_metrics(single.run_dir, "train")
    assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1] and all(r["episode/turns"] > 1 for r in rows)
    # rollout 0 sampled by the trainer's own weights; rollout 1 by the weights one update behind
    assert rows[0]["logprob_mismatch_max"] < 1e-5 and rows[1]["logprob_mismatch_max"] > 1e-3
    args = _episodes(root, "ep_osf_two", *common)
    args[args.index("train.batch_size=4")] = "train.batch_size=2"
    proc = torchrun([{"argv": ["train", *args]}], root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = read_metrics(root / "ep_osf_two", "train")
    assert [r["async/staleness_mean"] for r in two] == [0, 1, 1]
    assert [r["reward"] for r in two] == pytest.approx([r["reward"] for r in rows], abs=1e-6)  # the same episodes
    # the same tokens; the two processes add their gradients in another order (float32), and Adam at
    # lr 3e-2 turns that into up to 2.4e-5 on weights whose gradient is near zero (measured)
    assert _max_diff(_params(single.final_dir), _params(root / "ep_osf_two" / "final")) < 1e-4


def test_episodes_one_step_off_sigkill_and_resume_equals_the_uninterrupted_run(root, server):
    """A checkpoint stores the episodes of the cycle in flight (turns, rewards, masks, versions):
    the resumed run trains on exactly them."""
    common = ["train.max_steps=5", "train.save_every=2", "train.keep_checkpoints=3", *_served(server, "one_step_off")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run's process: float32 sums in the same order
    try:
        full = loop.train(load_config(None, _episodes(root, "ep_osf_full", *common)), progress=False)
    finally:
        torch.set_num_threads(threads)
    args = _episodes(root, "ep_osf_killed", *common)
    _killed_run(args, kill_after=3)  # resumes from step 2, whose checkpoint holds rollout 2's episodes
    resumed = loop.train(load_config(None, args), resume=True, progress=False)
    assert _max_diff(_params(full.final_dir), _params(resumed.final_dir)) < 1e-6
    full_rows, resumed_rows = (read_metrics(r.run_dir, "train") for r in (full, resumed))
    assert [r["reward"] for r in resumed_rows] == [r["reward"] for r in full_rows]
    assert [r["episode/turns"] for r in resumed_rows] == [r["episode/turns"] for r in full_rows]


def test_episodes_stream_on_a_server(root, server):
    """stream with episodes: the producer runs episodes turn by turn while the trainer trains, each
    model token labelled with the version that sampled it; nothing older than max_staleness trains
    and every prompt of the epoch trains once."""
    args = _episodes(root, "ep_stream", "train.max_steps=9", *_served(server, "stream"))
    result = loop.train(load_config(None, args), progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert len(rows) == 9 and all(r["episode/turns"] > 1 for r in rows)
    assert max(r["async/staleness_max"] for r in rows) <= 2 and max(r["async/staleness_mean"] for r in rows) > 0
    logged = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    trained = sorted(i for r in logged for i in r["examples"])
    assert trained == sorted(set(trained)) and len(trained) == 36


@pytest.mark.parametrize("mode", ["sync", "one_step_off"])
def test_a_thinking_budget_on_a_sampling_server(root, server, mode):
    """The budget on a server (`generation.budget.BudgetedBackend`, in lockstep and one step off):
    the template opens the block (two of the tiny vocabulary's words stand for the tags), every
    sample is cut at the budget, and the inserted tag is context: the trainer's log-probs equal the
    server's (1e-5) at step 1; one step off, every phase of rollout t names step t-1's version."""
    from alignkit.testing import CHATML_TEMPLATE

    template = root / "opens_cat.jinja"
    template.write_text(CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\ncat'"))
    extra = [
        "train.max_steps=2",
        *_served(server, mode),
        f"model.chat_template={template}",
        "data.thinking_tags=[cat, dog]",
        "generation.max_thinking_tokens=3",
    ]
    rows = read_metrics(
        loop.train(load_config(None, _args(root, f"budget_served_{mode}", *extra)), progress=False).run_dir, "train"
    )
    assert len(rows) == 2 and rows[0]["logprob_mismatch_max"] < 1e-5
    if mode == "one_step_off":  # rollout 1's phases all named (and were sampled by) version 0
        assert [r["async/staleness_mean"] for r in rows] == [0, 1]
    assert all(r["thinking_cut"] > 0.5 and r["reasoning_length"] >= 3.0 for r in rows)  # 3 sampled + the tag
