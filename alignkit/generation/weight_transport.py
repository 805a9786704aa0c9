"""How a trainer's weights reach a vLLM server (`generation.weight_transport`).

- `directory` (the default, CPU and GPU): the trainer writes safetensors into the sync directory
  both can read and asks the server to reload from it (`VLLMServer.load_state`).
- `nccl` (CUDA GPUs on both sides): a collective broadcast from the trainer (NCCL rank 0) to every
  vLLM worker, through vLLM's own weight-transfer API (`vllm.distributed.weight_transfer`: the
  trainer-side `NCCLTrainerWeightTransferEngine` and the server's `/init_weight_transfer_engine`,
  `/start_weight_update`, `/update_weights` and `/finish_weight_update` routes, which
  `alignkit vllm-serve --weight-transport nccl` starts vLLM with and lets through its gate). No
  file is written and nothing is read from disk: the tensors go GPU to GPU, packed into buffers.

Both go through one call, `send(state, version)`; every HTTP request of the NCCL path carries the
server's secret and the request timeout (`generation.request_timeout_s`), so a server that dies
mid-broadcast ends the run with the server's URL in the message (vLLM's engine itself never waits
for a peer that has gone: the trainer thread answers with the HTTP error first).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import torch

from alignkit.errors import ConfigError


def local_address_towards(url: str) -> str:
    """The address of this machine that the host of `url` reaches it on (where the NCCL group's
    store listens): the source address of a route to that host (no packet is sent)."""
    host = urlparse(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class StateSource:
    """vLLM's `WeightSource` protocol over a {name: tensor} dict (the gathered, tied-deduplicated
    state the trainer publishes): metadata and iteration in the same order, tensors contiguous on
    the trainer's GPU."""

    def __init__(self, state: dict, device: torch.device):
        self.state, self.device = state, device

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.state.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self.state.items():
            yield name, t.to(self.device, non_blocking=True).contiguous()

    def groups(self) -> list:
        from vllm.distributed.weight_transfer.base import layerwise_groups

        return layerwise_groups(list(self.state))


class ServerSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over alignkit's authenticated, time-limited requests
    (`VLLMServer._request`); vLLM's own HTTP client sends no secret, which the gate refuses."""

    def __init__(self, server):
        self.server = server

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.server._request("/init_weight_transfer_engine", {"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.server._request("/shutdown_weight_transfer_engine", {})

    def start_weight_update(self) -> None:
        self.server._request("/start_weight_update", {})

    def update_weights(self, update_info) -> None:
        self.server._request("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.server._request("/finish_weight_update", {"weight_version": weight_version})


class NCCLTransport:
    """Weights broadcast from this process (NCCL rank 0) to the server's workers (ranks 1..W). The
    group is opened at the first `send` and kept for the run."""

    def __init__(self, server):
        if not torch.cuda.is_available():
            raise ConfigError(
                "generation.weight_transport=nccl broadcasts from the trainer's GPU to vLLM's GPUs; this "
                "process has no CUDA device. Use generation.weight_transport=directory (the default)."
            )
        self.server, self.device = server, torch.device("cuda", torch.cuda.current_device())
        self.source = StateSource({}, self.device)
        self.engine = None
        try:  # the server must serve vLLM's weight-transfer routes: refused here, before training
            self.workers = int(server._get("/get_world_size")["world_size"])
        except ConfigError as e:
            raise ConfigError(
                f"{e}\ngeneration.weight_transport=nccl needs the server started with "
                "`alignkit vllm-serve --weight-transport nccl`."
            ) from None

    def _open(self) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        info = NCCLTrainerInitInfo(
            master_address=local_address_towards(self.server.url), master_port=free_port(), world_size=1 + self.workers
        )
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=ServerSyncClient(self.server), source=self.source
        )

    def send(self, state: dict, version: int) -> None:
        torch.cuda.set_device(self.device)  # the publishing thread may not be the one that opened it
        if self.engine is None:
            self._open()
        assert self.engine is not None
        self.source.state = state
        self.engine.send_weights()
        self.server._request("/reset_prefix_cache", {})

    def close(self) -> None:
        if self.engine is not None:
            try:
                self.engine.shutdown()
            finally:
                self.engine = None
