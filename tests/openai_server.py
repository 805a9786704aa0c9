"""A small OpenAI-compatible HTTP server for the endpoint tests: `/v1/chat/completions` and
`/v1/completions` answered by a local model through alignkit (`LocalModel`), on 127.0.0.1 and a
free port. `fail_first=N` answers the first N requests with HTTP 503 (a transient failure the
client must retry); `requests` counts what arrived, `bodies` keeps each request's JSON.

`/v1/completions` with `echo: true` and `logprobs` returns the log-prob of every prompt token (a
prompt given as token ids or as text), computed with the local model in one forward pass, then
`max_tokens` greedy tokens with theirs, in the OpenAI layout (`tokens`, `token_logprobs` with None
first, `top_logprobs`, `text_offset`). To play other servers: `echo_logprobs=False` refuses that
(HTTP 400, as hosted APIs that dropped it do), `min_tokens=1` refuses `max_tokens: 0`, and
`api_key` answers 401 to a request without `Authorization: Bearer <api_key>`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from alignkit.generation.decode import SamplingParams


class OpenAIServer:
    def __init__(
        self,
        lm,
        name: str = "tiny",
        fail_first: int = 0,
        down_after: int | None = None,
        *,
        echo_logprobs: bool = True,
        min_tokens: int = 0,
        api_key: str | None = None,
    ):
        """`down_after`: answer that many requests, then fail every later one (503)."""
        self.lm, self.name, self.fail_left, self.requests = lm, name, fail_first, 0
        self.down_after, self.answered, self.bodies = down_after, 0, []
        self.echo_logprobs, self.min_tokens, self.api_key = echo_logprobs, min_tokens, api_key
        self.lock = threading.Lock()  # one forward at a time: the model is not thread-safe
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "wrong or no API key", "type": "invalid_api_key"}})
                with server.lock:
                    server.requests += 1
                    server.bodies.append(body)
                    down = server.down_after is not None and server.answered >= server.down_after
                    if server.fail_left > 0 or down:
                        server.fail_left = max(0, server.fail_left - 1)
                        return self._send(503, {"error": {"message": "busy, try again", "type": "server_error"}})
                    server.answered += 1
                    try:
                        payload = server.answer(self.path, body)
                    except KeyError as e:
                        return self._send(400, {"error": {"message": f"missing {e}", "type": "invalid_request"}})
                    except ValueError as e:
                        return self._send(400, {"error": {"message": str(e), "type": "invalid_request"}})
                self._send(200, payload)

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str, body: dict) -> dict:
        params = SamplingParams(
            max_new_tokens=body.get("max_tokens") or 16,
            temperature=body.get("temperature", 1.0),
            top_p=body.get("top_p", 1.0),
            n=body.get("n", 1),
            stop=tuple(body.get("stop") or ()),
        )
        seed = body.get("seed") or 0
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if path.endswith("/chat/completions"):
            messages = body["messages"]
            if body.get("logprobs"):
                return self._logprobs(messages, body.get("top_logprobs", 5), usage)
            replies = self.lm.chat([messages], params, seed)[0]
            choices = [
                {"index": i, "message": {"role": "assistant", "content": r}, "finish_reason": "stop"}
                for i, r in enumerate(replies)
            ]
            return {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": self.name,
                "choices": choices,
                "usage": usage,
            }
        if body.get("echo") and body.get("logprobs") is not None:
            return self._echo(body, usage)
        replies = self.lm.complete([body["prompt"]], params, seed)[0]
        choices = [{"index": i, "text": r, "finish_reason": "stop", "logprobs": None} for i, r in enumerate(replies)]
        return {
            "id": "t",
            "object": "text_completion",
            "created": 0,
            "model": self.name,
            "choices": choices,
            "usage": usage,
        }

    @torch.no_grad()
    def _logprobs(self, messages, k: int, usage) -> dict:
        """The first reply token's top-k log-probs, as vLLM's server reports them."""
        from alignkit.generation.hf import encode_prompts

        tok, model = self.lm.tokenizer, self.lm.model
        ids = torch.tensor([encode_prompts(tok, [messages])[0]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        top = torch.topk(logp, k)
        entries = [
            {"token": tok.decode([int(t)]), "logprob": float(v), "bytes": None} for v, t in zip(top.values, top.indices)
        ]
        first = entries[0]
        content = [{"token": first["token"], "logprob": first["logprob"], "bytes": None, "top_logprobs": entries}]
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": self.name,
            "usage": usage,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": first["token"]},
                    "finish_reason": "length",
                    "logprobs": {"content": content},
                }
            ],
        }

    @torch.no_grad()
    def _echo(self, body: dict, usage) -> dict:
        """The prompt's tokens and their log-probs (the first has none), then `max_tokens` greedy ones."""
        if not self.echo_logprobs:
            raise ValueError("echo with logprobs is not supported for this model")
        max_tokens = body.get("max_tokens", 16)
        if max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens must be at least {self.min_tokens}, got {max_tokens}")
        tok, model, k = self.lm.tokenizer, self.lm.model, int(body["logprobs"])
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else tok(prompt)["input_ids"]
        if not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError("give one prompt: text or a list of token ids")
        for _ in range(max_tokens):  # greedy continuation
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # [T, V]
        tokens = [tok.decode([t]) for t in ids]
        token_logprobs, top = [None], [None]
        for pos in range(1, len(ids)):
            row = logp[pos - 1]
            best = torch.topk(row, k) if k > 0 else None
            entries = {tok.decode([int(t)]): float(v) for v, t in zip(best.values, best.indices)} if best else {}
            entries[tokens[pos]] = float(row[ids[pos]])
            token_logprobs.append(float(row[ids[pos]]))
            top.append(entries)
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        logprobs = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
        return {
            "id": "t",
            "object": "text_completion",
            "created": 0,
            "model": self.name,
            "usage": usage,
            "choices": [{"index": 0, "text": "".join(tokens), "finish_reason": "length", "logprobs": logprobs}],
        }
