"""One generator/judge interface for the data tools (`alignkit data ...`) and the judge reward: a
local model (alignkit's KV-cache sampler over a transformers model) or any OpenAI-compatible
endpoint (a vLLM or llama.cpp server, a hosted API) through the `openai` client.

    lm = text_model(model="runs/sft/final")                                  # local
    lm = text_model(endpoint="http://127.0.0.1:8000/v1", model="smollm2")   # a server
    lm.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=32))  -> [["Hello!"]]
    lm.complete(["<|im_start|>user\\n"], params)   # raw text continuation (Magpie's pre-query template)
    lm.option_logprobs(conversations, ["Yes", "No"])  # a judge's choice as log-probs, not parsed text

An endpoint reads exact option log-probs only with a local copy of the served model's tokenizer
(`tokenizer=`; `--tokenizer` in the data tools): see `EndpointModel.option_logprobs`. Its key
(`Authorization: Bearer ...`) is `api_key`, else the environment variable OPENAI_API_KEY; for
`alignkit vllm-serve` it is the secret in the token file the server prints at start.

Endpoint requests run `concurrency` at a time; a transient failure (connection error, timeout,
HTTP 408/409/429/5xx) is retried `retries` times with exponential backoff (0.5 s, 1 s, 2 s, ...
plus jitter); what still fails raises `EndpointError` naming the endpoint and the cause. Requests
already answered are returned to the caller's resume logic through `on_result` before an error is
raised, so nothing finished is lost.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Protocol

import torch

from alignkit.errors import AlignkitError
from alignkit.generation.decode import SamplingParams


class EndpointError(AlignkitError):
    """An OpenAI-compatible endpoint could not answer (after retries). `status`: the HTTP status of
    the last answer, None when there was none (unreachable, timed out) or the answer was unusable."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _NoEcho(EndpointError):
    """The server answered an echo request without the prompt's log-probs."""


class TextModel(Protocol):
    name: str

    def chat(
        self,
        conversations: list,
        params: SamplingParams,
        seed: int = 0,
        on_result: Callable | None = None,
        progress: bool = False,
    ) -> list:
        """For each conversation (a message list), `params.n` assistant replies (strings)."""

    def complete(
        self,
        prompts: list,
        params: SamplingParams,
        seed: int = 0,
        on_result: Callable | None = None,
        progress: bool = False,
    ) -> list:
        """For each raw text prompt, `params.n` continuations (no chat template applied)."""

    def option_logprobs(self, conversations: list, options: list) -> list:
        """For each conversation, the log-probability of each option string as the assistant's reply start."""


def text_model(
    model: str | None = None,
    endpoint: str | None = None,
    *,
    cache_dir: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
    concurrency: int = 8,
    retries: int = 4,
    timeout_s: float = 120.0,
    api_key: str | None = None,
    tokenizer: str | None = None,
) -> "TextModel":
    """A local model (`model`: a directory or hub id; None: the bundled SmolLM2-135M-Instruct) or,
    with `endpoint`, the server's model named `model`. `tokenizer` (endpoint only): a directory or
    hub id of the served model's tokenizer, for exact option log-probs (`EndpointModel`)."""
    if endpoint:
        if not model:
            raise AlignkitError(f"--endpoint {endpoint} needs --model NAME: the model name the server serves.")
        tok = None
        if tokenizer:
            from alignkit.config import ModelConfig
            from alignkit.models import load_tokenizer

            tok = load_tokenizer(ModelConfig(name_or_path=tokenizer), cache_dir)
        return EndpointModel(
            endpoint,
            model,
            concurrency=concurrency,
            retries=retries,
            timeout_s=timeout_s,
            api_key=api_key,
            tokenizer=tok,
        )
    if tokenizer:
        raise AlignkitError(
            f"tokenizer {tokenizer!r} is for an endpoint (a local copy of the served model's "
            "tokenizer); a local model uses its own: leave it out."
        )
    from alignkit.config import ModelConfig
    from alignkit.models import default_model_dir, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=model or str(default_model_dir(cache_dir)), device=device)
    tokenizer = load_tokenizer(cfg, cache_dir)
    return LocalModel(
        load_model(cfg, for_training=False, cache_dir=cache_dir),
        tokenizer,
        batch_size=batch_size,
        name=cfg.name_or_path,
    )


class LocalModel:
    """A transformers causal LM sampled by alignkit's KV-cache sampler."""

    def __init__(self, model, tokenizer, batch_size: int = 16, name: str = "local"):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name

    def _run(self, prompts: list, params, seed, on_result, progress, desc):
        from alignkit.generation.hf import generate

        out = []
        step = max(self.batch_size, 1)
        for start in range(0, len(prompts), step):  # in batches, so a caller can save as it goes
            chunk = generate(
                self.model,
                self.tokenizer,
                prompts[start : start + step],
                params,
                self.batch_size,
                seed=seed,
                progress=progress,
                desc=desc,
                prompt_seeds=[seed * 1_000_003 + start + i for i in range(len(prompts[start : start + step]))],
            )
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
            idx = order[start : start + per]
            rows = [prompts[i] + o for i in idx for o in opts]
            width = max(len(r) for r in rows)
            batch = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for r, row in enumerate(rows):  # right-padded: every real token sees what it would see alone
                batch[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
            logp = torch.log_softmax(
                self.model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float(), -1
            )
            for j, i in enumerate(idx):
                n = len(prompts[i])
                out[i] = [
                    float(sum(logp[j * len(opts) + k, n + t - 1, tok] for t, tok in enumerate(o)))
                    for k, o in enumerate(opts)
                ]
        return out


_TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointModel:
    """An OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`) through the `openai` client.

    `api_key`: sent as `Authorization: Bearer <key>`; None: the environment variable OPENAI_API_KEY,
    else none (a dummy, as local servers without a key expect). `tokenizer`: a local copy of the
    served model's tokenizer, which `option_logprobs` needs to read exact log-probs."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        concurrency: int = 8,
        retries: int = 4,
        timeout_s: float = 120.0,
        api_key: str | None = None,
        tokenizer=None,
    ):
        try:
            import openai
        except ImportError:
            raise AlignkitError("--endpoint needs the openai client: pip install openai") from None
        self.openai, self.endpoint, self.name, self.tokenizer = openai, endpoint.rstrip("/"), model, tokenizer
        self.concurrency, self.retries = max(1, concurrency), max(0, retries)
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        # our own retries (below) so that every failure is counted and named; the client's are off
        self.client = openai.OpenAI(base_url=self.endpoint, api_key=key, max_retries=0, timeout=timeout_s)
        self._echo_max_tokens: int | None = None  # what the server took with echo (0, or 1), once probed
        self._fallback: str | None = None  # why option log-probs come from the top 20 first tokens
        self.logprob_source: str | None = None  # how option log-probs were read (for summaries), once known

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
                    status = getattr(e, "status_code", None)
                    hint = (
                        (
                            " The server wants its key: set OPENAI_API_KEY, or give --api-key-file FILE (for "
                            "`alignkit vllm-serve`, the token file it printed at start)."
                        )
                        if status == 401
                        else ""
                    )
                    raise EndpointError(
                        f"endpoint {self.endpoint} (model {self.name}) {what} after {attempt + 1} "
                        f"attempt(s): {type(e).__name__}: {e}{hint}",
                        status,
                    ) from None
                time.sleep(0.5 * 2**attempt * (1 + 0.25 * random.random()))

    def _map(self, items: list, request: Callable, on_result, progress: bool, desc: str) -> list:
        from tqdm.auto import tqdm

        out: list = [None] * len(items)
        error = None
        with (
            ThreadPoolExecutor(self.concurrency) as pool,
            tqdm(total=len(items), desc=desc, disable=not progress, leave=False) as bar,
        ):
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
            raise EndpointError(f"{error} ({done} of {len(items)} requests were answered and kept)", error.status)
        return out

    @staticmethod
    def _args(params: SamplingParams, seed: int) -> dict:
        args = dict(
            n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, seed=seed
        )
        if params.stop:
            args["stop"] = list(params.stop)
        return args

    # Each request gets its own seed (seed, index), as LocalModel gives each prompt its own: n
    # identical requests (Magpie's) must not come back identical.
    def chat(self, conversations, params, seed=0, on_result=None, progress=False):
        def request(i, conv):
            r = self.client.chat.completions.create(
                model=self.name, messages=list(conv), **self._args(params, seed * 1_000_003 + i)
            )
            return [c.message.content or "" for c in sorted(r.choices, key=lambda c: c.index)]

        return self._map(list(conversations), request, on_result, progress, "chat")

    def complete(self, prompts, params, seed=0, on_result=None, progress=False):
        def request(i, prompt):
            r = self.client.completions.create(
                model=self.name, prompt=prompt, **self._args(params, seed * 1_000_003 + i)
            )
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

        return self._map(list(prompts), request, on_result, progress, "complete")

    def option_logprobs(self, conversations, options):
        """For each conversation, the log-probability of each option as the start of the assistant's reply.

        Exact, as `LocalModel.option_logprobs` computes it, where the server scores given text: the
        conversation rendered with `self.tokenizer`'s chat template, followed by the option's
        tokens, is sent as token ids to `/v1/completions` with `echo: true`, `logprobs: 1` and
        `max_tokens: 0` (1 where the server refuses 0); the answer's `logprobs.token_logprobs` holds
        the log-prob of every prompt token given the ones before it, and the option's tokens' are
        summed. Options may have several tokens. One request per (conversation, option); vLLM,
        llama.cpp-style and OpenAI's legacy completions take this form (vLLM computes it as
        `prompt_logprobs`).

        Without a tokenizer, or from a server that does not echo log-probs, the fallback (said once,
        on stderr): the first reply token's top log-probs from `/v1/chat/completions`
        (`top_logprobs`, at most 20). An option whose first token is not among them gets -inf (the
        judge bounds and counts such answers: `PrincipleJudge.clipped`); a multi-token option is
        read from its first token alone."""
        conversations = [list(c) for c in conversations]
        if not conversations:
            return []
        if self.tokenizer is None:
            self._fall_back("no tokenizer was given (--tokenizer: a local copy of the served model's tokenizer)")
        elif self._echo_max_tokens is None and self._fallback is None:
            self._probe(conversations[0], options[0])
        if self._fallback is not None:
            return self._top_logprobs(conversations, options)
        return self._exact(conversations, options)

    def _option_ids(self, options: list) -> list:
        ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        for o, t in zip(options, ids):
            if not t:
                raise AlignkitError(
                    f"option {o!r} has no tokens in the tokenizer of {self.name}; give a non-empty option."
                )
        return ids

    def _echo(self, ids: list, start: int, max_tokens: int) -> float:
        """The sum of the log-probs the server gives ids[start:] (see `option_logprobs`)."""
        r = self.client.completions.create(
            model=self.name, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0.0
        )
        lp = r.choices[0].logprobs if r.choices else None
        values = list(getattr(lp, "token_logprobs", None) or [])
        picked = values[start : len(ids)]
        if len(values) < len(ids) or any(v is None for v in picked):
            raise _NoEcho(
                f"endpoint {self.endpoint} (model {self.name}) answered an echo request for {len(ids)} "
                f"tokens with log-probs for {len(values)} of them"
            )
        return float(sum(float(v) for v in picked))

    def _probe(self, conversation: list, option: str) -> None:
        """Find whether the server echoes log-probs, and with which max_tokens; else fall back."""
        from alignkit.generation.hf import encode_prompts

        prompt = encode_prompts(self.tokenizer, [conversation])[0]
        ids = prompt + self._option_ids([option])[0]
        why = ""
        for max_tokens in (0, 1):
            try:
                self._call(lambda: self._echo(ids, len(prompt), max_tokens))
            except _NoEcho as e:
                why = str(e)
                break
            except EndpointError as e:
                # no answer, a key problem or a busy server say nothing of what the server can do
                if e.status is None or e.status in (401, 403) or e.status in _TRANSIENT_STATUS:
                    raise
                why = str(e)
                continue
            self._echo_max_tokens = max_tokens
            self.logprob_source = (
                f"exact option log-probs (prompt log-probs echoed by /v1/completions, max_tokens {max_tokens})"
            )
            return
        self._fall_back(f"it does not return the log-probs of given text ({why})")

    def _fall_back(self, why: str) -> None:
        if self._fallback is None:
            self._fallback = why
            self.logprob_source = (
                f"the first reply token's top-20 log-probs (fallback: {why}); an option outside "
                "them is -inf and its judge score is bounded"
            )
            print(
                f"alignkit: endpoint {self.endpoint} (model {self.name}): {why}. Option log-probs come from the "
                "first reply token's top 20 instead: an option outside them gets -inf, and a judge bounds and "
                "counts those scores.",
                file=sys.stderr,
                flush=True,
            )

    def _exact(self, conversations: list, options: list) -> list:
        from alignkit.generation.hf import encode_prompts

        prompts = encode_prompts(self.tokenizer, conversations)
        opts = self._option_ids(options)
        items = [(i, k) for i in range(len(prompts)) for k in range(len(opts))]
        values = self._map(
            items,
            lambda _, it: self._echo(prompts[it[0]] + opts[it[1]], len(prompts[it[0]]), self._echo_max_tokens),
            None,
            False,
            "judge",
        )
        return [values[i * len(opts) : (i + 1) * len(opts)] for i in range(len(prompts))]

    def _top_logprobs(self, conversations: list, options: list) -> list:
        def request(i, conv):
            r = self.client.chat.completions.create(
                model=self.name, messages=list(conv), max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20
            )
            content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
            top = {t.token.strip(): t.logprob for t in (content[0].top_logprobs if content else [])}
            return [
                max((lp for tok, lp in top.items() if tok and o.strip().startswith(tok)), default=-math.inf)
                for o in options
            ]

        return self._map(conversations, request, None, False, "judge")
