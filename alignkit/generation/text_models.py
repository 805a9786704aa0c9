"""One generator/judge interface for the data tools (`alignkit data ...`) and the judge reward: a
local model (alignkit's KV-cache sampler over a transformers model) or any OpenAI-compatible
endpoint (a vLLM or llama.cpp server, a hosted API) through the `openai` client.

    lm = text_model(model="runs/sft/final")                                  # local
    lm = text_model(endpoint="http://127.0.0.1:8000/v1", model="smollm2")   # a server
    lm.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=32))  -> [["Hello!"]]
    lm.complete(["<|im_start|>user\\n"], params)   # raw text continuation (Magpie's pre-query template)
    lm.option_logprobs(conversations, ["Yes", "No"])  # a judge's choice as log-probs, not parsed text

Endpoint requests run `concurrency` at a time; a transient failure (connection error, timeout,
HTTP 408/409/429/5xx) is retried `retries` times with exponential backoff (0.5 s, 1 s, 2 s, ...
plus jitter); what still fails raises `EndpointError` naming the endpoint and the cause. Requests
already answered are returned to the caller's resume logic through `on_result` before an error is
raised, so nothing finished is lost.
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Protocol

import torch

from alignkit.errors import AlignkitError
from alignkit.generation.decode import SamplingParams


class EndpointError(AlignkitError):
    """An OpenAI-compatible endpoint could not answer (after retries)."""


class TextModel(Protocol):
    name: str

    def chat(self, conversations: list, params: SamplingParams, seed: int = 0, on_result: Callable | None = None,
             progress: bool = False) -> list:
        """For each conversation (a message list), `params.n` assistant replies (strings)."""

    def complete(self, prompts: list, params: SamplingParams, seed: int = 0, on_result: Callable | None = None,
                 progress: bool = False) -> list:
        """For each raw text prompt, `params.n` continuations (no chat template applied)."""

    def option_logprobs(self, conversations: list, options: list) -> list:
        """For each conversation, the log-probability of each option string as the assistant's reply start."""


def text_model(model: str | None = None, endpoint: str | None = None, *, cache_dir: str | None = None,
               device: str = "auto", batch_size: int = 16, concurrency: int = 8, retries: int = 4,
               timeout_s: float = 120.0, api_key: str | None = None) -> "TextModel":
    """A local model (`model`: a directory or hub id; None: the bundled SmolLM2-135M-Instruct) or,
    with `endpoint`, the server's model named `model`."""
    if endpoint:
        if not model:
            raise AlignkitError(f"--endpoint {endpoint} needs --model NAME: the model name the server serves.")
        return EndpointModel(endpoint, model, concurrency=concurrency, retries=retries, timeout_s=timeout_s,
                             api_key=api_key)
    from alignkit.config import ModelConfig
    from alignkit.models import default_model_dir, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=model or str(default_model_dir(cache_dir)), device=device)
    tokenizer = load_tokenizer(cfg, cache_dir)
    return LocalModel(load_model(cfg, for_training=False, cache_dir=cache_dir), tokenizer, batch_size=batch_size,
                      name=cfg.name_or_path)


class LocalModel:
    """A transformers causal LM sampled by alignkit's KV-cache sampler."""

    def __init__(self, model, tokenizer, batch_size: int = 16, name: str = "local"):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name

    def _run(self, prompts: list, params, seed, on_result, progress, desc):
        from alignkit.generation.hf import generate

        out = []
        step = max(self.batch_size, 1)
        for start in range(0, len(prompts), step):  # in batches, so a caller can save as it goes
            chunk = generate(self.model, self.tokenizer, prompts[start: start + step], params, self.batch_size,
                             seed=seed, progress=progress, desc=desc,
                             prompt_seeds=[seed * 1_000_003 + start + i for i in range(len(prompts[start:start + step]))])
            for i, replies in enumerate(chunk):
                if on_result is not None:
                    on_result(start + i, replies)
            out += chunk
        return out

    def chat(self, conversations, params, seed=0, on_result=None, progress=False):
        return self._run([list(c) for c in conversations], params, seed, on_result, progress, "chat")

    def complete(self, prompts, params, seed=0, on_result=None, progress=False):
        return self._run([str(p) for p in prompts], params, seed, on_result, progress, "complete")

    @torch.no_grad()
    def option_logprobs(self, conversations, options):
        from alignkit.generation.hf import encode_prompts

        device = next(self.model.parameters()).device
        prompts = encode_prompts(self.tokenizer, [list(c) for c in conversations])
        opts = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        out: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        per = max(1, self.batch_size // max(len(opts), 1))
        for start in range(0, len(order), per):
            idx = order[start: start + per]
            rows = [prompts[i] + o for i in idx for o in opts]
            width = max(len(r) for r in rows)
            batch = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for r, row in enumerate(rows):  # right-padded: every real token sees what it would see alone
                batch[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
            logp = torch.log_softmax(self.model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            for j, i in enumerate(idx):
                n = len(prompts[i])
                out[i] = [float(sum(logp[j * len(opts) + k, n + t - 1, tok] for t, tok in enumerate(o)))
                          for k, o in enumerate(opts)]
        return out


_TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointModel:
    """An OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`) through the `openai` client."""

    def __init__(self, endpoint: str, model: str, *, concurrency: int = 8, retries: int = 4, timeout_s: float = 120.0,
                 api_key: str | None = None):
        try:
            import openai
        except ImportError:
            raise AlignkitError("--endpoint needs the openai client: pip install openai") from None
        self.openai, self.endpoint, self.name = openai, endpoint.rstrip("/"), model
        self.concurrency, self.retries = max(1, concurrency), max(0, retries)
        # our own retries (below) so that every failure is counted and named; the client's are off
        self.client = openai.OpenAI(base_url=self.endpoint, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout_s)

    def _transient(self, e: Exception) -> bool:
        o = self.openai
        if isinstance(e, (o.APIConnectionError, o.APITimeoutError)):
            return True
        return isinstance(e, o.APIStatusError) and e.status_code in _TRANSIENT_STATUS

    def _call(self, fn: Callable):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001  (classified below; anything else is not ours to retry)
                if not isinstance(e, self.openai.OpenAIError):
                    raise
                if not self._transient(e) or attempt == self.retries:
                    what = "unreachable" if isinstance(e, self.openai.APIConnectionError) else "failed"
                    raise EndpointError(f"endpoint {self.endpoint} (model {self.name}) {what} after {attempt + 1} "
                                        f"attempt(s): {type(e).__name__}: {e}") from None
                time.sleep(0.5 * 2 ** attempt * (1 + 0.25 * random.random()))

    def _map(self, items: list, request: Callable, on_result, progress: bool, desc: str) -> list:
        from tqdm.auto import tqdm

        out: list = [None] * len(items)
        error = None
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(items), desc=desc, disable=not progress,
                                                                 leave=False) as bar:
            futures = {pool.submit(self._call, lambda i=i, it=it: request(i, it)): i for i, it in enumerate(items)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    out[i] = fut.result()
                except EndpointError as e:
                    error = error or e
                    continue
                if on_result is not None:
                    on_result(i, out[i])
                bar.update(1)
        if error is not None:
            done = sum(o is not None for o in out)
            raise EndpointError(f"{error} ({done} of {len(items)} requests were answered and kept)")
        return out

    @staticmethod
    def _args(params: SamplingParams, seed: int) -> dict:
        args = dict(n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                    seed=seed)
        if params.stop:
            args["stop"] = list(params.stop)
        return args

    # Each request gets its own seed (seed, index), as LocalModel gives each prompt its own: n
    # identical requests (Magpie's) must not come back identical.
    def chat(self, conversations, params, seed=0, on_result=None, progress=False):
        def request(i, conv):
            r = self.client.chat.completions.create(model=self.name, messages=list(conv),
                                                    **self._args(params, seed * 1_000_003 + i))
            return [c.message.content or "" for c in sorted(r.choices, key=lambda c: c.index)]
        return self._map(list(conversations), request, on_result, progress, "chat")

    def complete(self, prompts, params, seed=0, on_result=None, progress=False):
        def request(i, prompt):
            r = self.client.completions.create(model=self.name, prompt=prompt, **self._args(params, seed * 1_000_003 + i))
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        return self._map(list(prompts), request, on_result, progress, "complete")

    def option_logprobs(self, conversations, options):
        """From the first reply token's top log-probs (the servers' `top_logprobs`, at most 20): an
        option whose first token is not among them gets -inf. Options should differ in their first
        token ("Yes"/"No", "A"/"B")."""
        def request(i, conv):
            r = self.client.chat.completions.create(model=self.name, messages=list(conv), max_tokens=1, temperature=0.0,
                                                    logprobs=True, top_logprobs=20)
            content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
            top = {t.token.strip(): t.logprob for t in (content[0].top_logprobs if content else [])}
            return [max((lp for tok, lp in top.items() if tok and o.strip().startswith(tok)), default=-math.inf)
                    for o in options]
        return self._map(list(conversations), request, None, False, "judge")
