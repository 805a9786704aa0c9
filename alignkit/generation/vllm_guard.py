"""The gate of `alignkit vllm-serve`: an ASGI middleware vLLM loads (`--middleware`) in front of its
OpenAI-compatible server, so that only the trainer that holds the server's secret gets in, and only
to what training needs.

vLLM's dev mode, which weight updates need, also serves routes that run any worker method
(`/collective_rpc`: `save_sharded_state` writes files, `update_environment_variables` and
`__setattr__` change workers) and describe the server (`/server_info`); vLLM's own `--api-key`
guards only `/v1/...`. This gate refuses every request without `Authorization: Bearer <secret>`
(401), serves an allow-list of routes (403 for the rest, dev routes and docs included), and lets
`/collective_rpc` through only as alignkit's weight reload from a directory inside the sync
directory the server was started with (and, on a server that takes LoRA adapters, as alignkit's
in-place adapter reload from there and the listing of the workers' adapter ids).

Read once in the server process: ALIGNKIT_SERVE_TOKEN_FILE (the secret, one line),
ALIGNKIT_SERVE_SYNC_DIR (where updates may come from), ALIGNKIT_SERVE_LOGPROBS (the kind of
log-probs the server returns, `raw` or `processed`, which the gate itself answers at
`GET /alignkit/logprobs` so that a trainer can check it samples what it scores) and
ALIGNKIT_SERVE_TRANSPORT (`nccl`: vLLM's weight-transfer routes are served too, `NCCL_ROUTES`). Standard library
and Starlette only (the server's own dependency).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

RELOAD = "alignkit_reload_weights"
# a LoRA run's adapter: the ids the workers hold (to learn the one vLLM gave it) and a new version
# read in place under that id (partial rollouts for LoRA runs); served with --max-lora-rank only
LORA_IDS, RELOAD_LORA = "alignkit_lora_ids", "alignkit_reload_lora"
LOGPROBS_ROUTE = "/alignkit/logprobs"  # answered by the gate: {"logprobs": "raw" | "processed", "lora_rank": r}
LORA_ROUTE = "/v1/load_lora_adapter"
ROUTES = {
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/health"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/collective_rpc"),
    ("POST", "/inference/v1/generate"),  # token ids in and out, with each token's weight version
    ("POST", "/pause"),  # generations frozen while the weights change (mode keep) ...
    ("POST", "/update_weight_version"),  # ... labelled with the new version ...
    ("POST", "/resume"),  # ... and resumed
    ("GET", "/weight_info"),  # the version label it holds (a request waits for the one it names)
}
# vLLM's weight-transfer routes (`vllm/entrypoints/rl/online/api_router.py`), served only by a server
# started with `--weight-transport nccl`: the trainer opens the NCCL group and broadcasts through them
NCCL_ROUTES = {
    ("GET", "/get_world_size"),
    ("POST", "/init_weight_transfer_engine"),
    ("POST", "/start_weight_update"),
    ("POST", "/update_weights"),
    ("POST", "/finish_weight_update"),
    ("POST", "/shutdown_weight_transfer_engine"),
}
MAX_RPC_BODY = 64 << 10


def read_token(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if len(token) < 16:
        raise ValueError(f"the server secret in {path} is shorter than 16 characters")
    return token


def update_allowed(body: bytes, sync_dir: str, lora: bool = False) -> str | None:
    """None if `body` is one of alignkit's worker calls (`lora`: the LoRA ones too) and reads only
    from inside `sync_dir`; else why it is refused."""
    try:
        req = json.loads(body)
    except ValueError:
        return "the body is not JSON"
    served = {RELOAD: {"weights_path"}} | ({LORA_IDS: set(), RELOAD_LORA: {"lora_int_id", "lora_path"}} if lora else {})
    if not isinstance(req, dict) or req.get("method") not in served or set(req) - {"method", "kwargs", "timeout"}:
        return f"only {', '.join(served)} {'is' if len(served) == 1 else 'are'} served"
    method, kwargs = req["method"], req.get("kwargs", {})
    if not isinstance(kwargs, dict) or set(kwargs) != served[method]:
        return f"kwargs must be exactly {{{', '.join(sorted(served[method]))}}}"
    if method == LORA_IDS:
        return None
    if method == RELOAD_LORA:
        lora_id = kwargs["lora_int_id"]
        if isinstance(lora_id, bool) or not isinstance(lora_id, int) or lora_id < 1:
            return "lora_int_id must be a positive integer"
    path = kwargs["lora_path" if method == RELOAD_LORA else "weights_path"]
    if not isinstance(path, str):
        return "the path must be a string"
    return _inside(path, sync_dir)


def _inside(path: str, sync_dir: str) -> str | None:
    root = os.path.realpath(sync_dir)
    if not os.path.realpath(path).startswith(root + os.sep):
        return f"weights are taken only from inside the sync directory {root}"
    return None


def lora_allowed(body: bytes, sync_dir: str) -> str | None:
    """None if `body` loads a LoRA adapter from inside `sync_dir`; else why it is refused."""
    try:
        req = json.loads(body)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(req, dict) or set(req) - {"lora_name", "lora_path"}:
        return "only lora_name and lora_path are accepted"
    if not isinstance(req.get("lora_name"), str) or not isinstance(req.get("lora_path"), str):
        return "lora_name and lora_path must be strings"
    return _inside(req["lora_path"], sync_dir)


class Guard:
    """Pure ASGI middleware (vLLM adds it with `app.add_middleware`)."""

    def __init__(self, app):
        self.app = app
        self.token_hash = hashlib.sha256(read_token(os.environ["ALIGNKIT_SERVE_TOKEN_FILE"]).encode()).digest()
        self.sync_dir = os.environ["ALIGNKIT_SERVE_SYNC_DIR"]
        self.logprobs = os.environ["ALIGNKIT_SERVE_LOGPROBS"]
        nccl = os.environ.get("ALIGNKIT_SERVE_TRANSPORT", "directory") == "nccl"
        self.routes = ROUTES | NCCL_ROUTES if nccl else ROUTES
        self.lora_rank = int(os.environ.get("ALIGNKIT_SERVE_LORA_RANK") or 0) or None
        # a LoRA run's adapter, loaded once from inside the sync directory (new versions: RELOAD_LORA)
        if self.lora_rank:
            self.routes = self.routes | {("POST", LORA_ROUTE)}

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        given = hashlib.sha256(value.strip().encode()).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(given, self.token_hash)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets and anything else: not served
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        if not self._authorized(scope):
            return await _answer(
                send,
                401,
                "unauthorized: send the server's secret as `Authorization: Bearer "
                "<secret>` (alignkit clients read it from the token file `alignkit vllm-serve` printed)",
            )
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if (method, path) == ("GET", LOGPROBS_ROUTE):
            return await _send_json(send, 200, {"logprobs": self.logprobs, "lora_rank": self.lora_rank})
        if (method, path) not in self.routes:
            return await _answer(send, 403, f"{method} {path} is not served by alignkit vllm-serve")
        if path not in ("/collective_rpc", LORA_ROUTE):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_RPC_BODY:
                return await _answer(send, 413, "request too large")
        if path == "/collective_rpc":
            why = update_allowed(body, self.sync_dir, lora=bool(self.lora_rank))
        else:
            why = lora_allowed(body, self.sync_dir)
        if why is not None:
            return await _answer(send, 403, f"weight update refused: {why}")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _answer(send, status: int, message: str) -> None:
    await _send_json(send, status, {"error": message})


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
