"""`alignkit sample-serve`: alignkit's own sampler (`decode.sample`) in a process of its own, so
that sampling and training overlap on CPUs (`online.async`), behind the protocol the trainer
already speaks to `alignkit vllm-serve` (`vllm_engine.VLLMServer` is the client of both).

Routes (every request needs `Authorization: Bearer <secret>`, the secret in the server's token
file, as `vllm_guard` requires of a vLLM server; anything else is 403):
- `GET /v1/models`: the model, `owned_by: alignkit` (how a client tells this server from vLLM);
- `GET /health`: the policy version the server samples with;
- `POST /v1/completions`: token-id prompts (one, or a list with a seed each: `seeds`), OpenAI's
  sampling fields, and alignkit's: `min_version` (wait until the server holds at least this policy
  version: every training process then samples with the weights the writer published) and
  `logprobs_mode` (`raw` / `processed`, `decode.SamplingParams.logprobs`). Each choice carries
  the sampled token ids, their log-probs and `policy_versions`, the version that produced each token;
- `POST /collective_rpc`: alignkit's weight reload from a directory inside the sync directory
  (`vllm_guard.update_allowed`), with the policy `version` it holds;
- `POST /reset_prefix_cache`: accepted (this sampler keeps no cache between requests).

A reload that arrives while a batch is being sampled does not wait for it (partial rollouts, as in
PipelineRL's in-flight weight updates, Piché et al. 2025): the new weights are read at once and
swapped in between two tokens; the keys and values the old weights computed stay in the cache,
and each token records the version that sampled it. One batch is sampled at a time, in the order
the requests came.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from alignkit.generation.adapters import ADAPTERS_FILE, AdapterBase, AdapterUpdate, is_adapter_update
from alignkit.generation.backends import load_weights
from alignkit.generation.decode import BAN_BIAS, SamplingParams, sample
from alignkit.generation.vllm_guard import read_token, update_allowed


class SamplerService:
    """The model, its policy version, and weights waiting to be swapped in."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16, checkpoint: str | None = None):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        self.version = 0
        self.run: str | None = None  # the training run whose weights these are (`min_version` is per run)
        # LoRA updates: the base weights they are merged into, read from the served checkpoint
        self.adapters = AdapterBase(model, checkpoint=checkpoint)
        self._pending: tuple | None = None  # (weights or adapters, version, run) not yet in the model
        self._generating = False
        self._state = threading.Condition()  # guards version, _pending, _generating
        self._one_batch = threading.Lock()  # one batch at a time

    # -- weights ---------------------------------------------------------------------------------

    def reload(self, directory: str, version: int | None, run: str | None = None) -> int:
        """Read the update now (the trainer removes the directory once answered); it reaches the
        model at once, or between two tokens of the batch being sampled."""
        from safetensors.torch import load_file

        with self._state:
            new = self.version + 1 if version is None else int(version)
        if (Path(directory) / ADAPTERS_FILE).exists():  # a LoRA run: its adapters, merged here
            weights = AdapterUpdate.load(Path(directory))
            self.adapters.check(weights, f"{self.name}, version {new}")  # refused now, not mid-batch
        else:
            weights = load_file(str(Path(directory) / "model.safetensors"))
        with self._state:
            self._pending = (weights, new, run)
            if not self._generating:
                self._apply()
            return new

    def _apply(self) -> None:
        """Swap pending weights in (holding `_state`)."""
        if self._pending is None:
            return
        weights, version, run = self._pending
        if is_adapter_update(weights):
            self.adapters.apply(weights, f"{self.name}, version {version}")
        else:
            load_weights(self.model, weights, f"{self.name}, version {version}")
            self.adapters.took_full_weights()
        self._pending, self.version, self.run = None, version, run
        self._state.notify_all()

    def between_tokens(self) -> int:
        """`decode.sample`'s hook between two tokens: swap in what arrived; the version now sampling."""
        with self._state:
            self._apply()
            return self.version

    # -- sampling --------------------------------------------------------------------------------

    def sample(
        self, prompts: list, params: SamplingParams, seeds: list, min_version: int, timeout: float, run=None
    ) -> list:
        """`min_version` of run `run` (None: any run's weights): a request waits for them; another
        run's weights (a crashed run's later versions, before a resumed one publishes) do not count."""

        def ready() -> bool:
            return (run is None or self.run == run) and self.version >= min_version

        with self._one_batch:
            with self._state:
                if not self._state.wait_for(ready, timeout=timeout):
                    raise TimeoutError(
                        f"no weights of version {min_version} arrived within {timeout:.0f} s (holding "
                        f"version {self.version}): the training process that publishes them stopped?"
                    )
                self._generating = True
            try:
                return sample(
                    self.model,
                    prompts,
                    params,
                    eos_ids=self.tokenizer.eos_token_id,
                    pad_id=self.tokenizer.pad_token_id,
                    batch_size=self.batch_size,
                    tokenizer=self.tokenizer,
                    prompt_seeds=seeds,
                    version_hook=self.between_tokens,
                )
            finally:
                with self._state:
                    self._generating = False
                    self._apply()


def completion_choices(groups: list) -> list:
    """OpenAI completion choices (index = prompt x n + sample), with alignkit's per-token versions."""
    out = []
    for i, group in enumerate(groups):
        for k, s in enumerate(group):
            out.append(
                {
                    "index": i * len(group) + k,
                    "text": s.text,
                    "finish_reason": s.finish_reason,
                    "logprobs": {
                        "tokens": [f"token_id:{t}" for t in s.token_ids],
                        "token_logprobs": list(s.logprobs),
                    },
                    "policy_versions": list(s.versions or []),
                }
            )
    return out


def request_params(body: dict) -> SamplingParams:
    top_k = int(body.get("top_k", -1) or -1)
    bias = body.get("logit_bias") or {}
    if any(float(b) != BAN_BIAS for b in bias.values()):  # alignkit's clients send bans only
        raise ValueError(f"logit_bias: this server takes only bans ({BAN_BIAS}), not {sorted(set(bias.values()))}")
    return SamplingParams(
        banned=tuple(sorted(int(t) for t in bias)),
        max_new_tokens=int(body.get("max_tokens", 16)),
        temperature=float(body.get("temperature", 1.0)),
        top_p=float(body.get("top_p", 1.0)),
        top_k=max(top_k, 0),
        n=int(body.get("n", 1)),
        stop=tuple(body.get("stop") or ()),
        logprobs=str(body.get("logprobs_mode", "raw")),
    )


def make_handler(service: SamplerService, token: str, sync_dir: str, wait_timeout: float):
    secret = token.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002  (the base class's name)
            pass  # one line per request would drown the trainer's output

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "")
            ok = given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), secret)
            if not ok:
                self._answer(401, {"error": "missing or wrong secret (Authorization: Bearer <token file>)"})
            return ok

        def do_GET(self):  # noqa: N802  (http.server's name)
            if not self._authorized():
                return
            if self.path == "/v1/models":
                self._answer(200, {"data": [{"id": service.name, "owned_by": "alignkit"}]})
            elif self.path == "/health":
                self._answer(200, {"version": service.version})
            else:
                self._answer(403, {"error": f"{self.path} is not served"})

        def do_POST(self):  # noqa: N802
            if not self._authorized():
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except ValueError:
                return self._answer(400, {"error": "the body is not JSON"})
            try:
                if self.path == "/v1/completions":
                    return self._answer(200, self._complete(body))
                if self.path == "/collective_rpc":
                    kwargs = dict(body.get("kwargs") or {})
                    version, run = kwargs.pop("version", None), kwargs.pop("run", None)
                    refused = update_allowed(json.dumps({**body, "kwargs": kwargs}).encode(), sync_dir)
                    if refused:
                        return self._answer(403, {"error": refused})
                    return self._answer(200, {"version": service.reload(kwargs["weights_path"], version, run)})
                if self.path == "/reset_prefix_cache":
                    return self._answer(200, {})
                return self._answer(403, {"error": f"{self.path} is not served"})
            except (ValueError, KeyError, TypeError, OSError, TimeoutError) as e:
                return self._answer(400, {"error": f"{type(e).__name__}: {e}"})

        def _complete(self, body: dict) -> dict:
            prompt = body["prompt"]
            prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt]
            seeds = body.get("seeds") or [int(body.get("seed", 0))] * len(prompts)
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            groups = service.sample(
                prompts, request_params(body), seeds, int(body.get("min_version", 0)), wait_timeout, body.get("run")
            )
            return {"model": service.name, "choices": completion_choices(groups), "version": service.version}

    return Handler


def serve(
    model_path: str,
    host: str,
    port: int,
    token_file: Path,
    sync_dir: Path,
    *,
    threads: int,
    batch_size: int,
    device: str = "cpu",
) -> None:
    """Load the model and answer until stopped (Ctrl-C, SIGTERM)."""
    from transformers import AutoModelForCausalLM

    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer, resolve_device

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=model_path))  # the trainer's (its pad token too)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(resolve_device(device))
    model.eval()
    service = SamplerService(
        model, tokenizer, os.path.basename(os.path.normpath(model_path)), batch_size, checkpoint=model_path
    )
    handler = make_handler(service, read_token(str(token_file)), str(sync_dir), wait_timeout=600.0)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    print(f"alignkit: sampler ready at http://{host}:{server.server_port} ({time.strftime('%H:%M:%S')})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
