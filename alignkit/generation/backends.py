"""Generation backends behind one small protocol, so online training and inference-time search do
not care who samples.

    backend.sample(prompts: list[list[int]], params, seed, prompt_seeds=None) -> list[list[Sample]]   # n per prompt
    backend.sync(model)                                                           # after each update

`TransformersBackend` (the default) samples with the policy module itself through
`alignkit.generation.decode`, so there is nothing to sync. The vLLM backends
(`alignkit.generation.vllm_engine`) run a vLLM engine in the process or talk to a vLLM server,
and load the policy's weights into it before each rollout.
"""

from __future__ import annotations

from typing import Protocol

from alignkit.errors import ConfigError
from alignkit.generation.adapters import AdapterBase, base_weights, is_adapter_update
from alignkit.generation.decode import Sample, SamplingParams, sample


class GenerationBackend(Protocol):
    def sample(
        self, prompts: list, params: SamplingParams, seed: int, prompt_seeds: list | None = None, min_version: int = 0
    ) -> list[list[Sample]]: ...  # min_version: a server samples once it holds that policy version

    def sync(self, model) -> None: ...

    def close(self) -> None: ...  # stop what the backend started (an engine process), not a server


def load_weights(model, state: dict, where: str) -> None:
    """Load `state` (the base model's names; a tied alias such as `lm_head.weight` may be left
    out) into `model` in place. A name the model lacks, or a weight it has that `state` lacks, is
    an error: nothing is skipped silently."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    tied = set(tied if isinstance(tied, (list, tuple, set)) else tied.keys())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{where}: the weights do not fit the sampler's model: unexpected {sorted(unexpected)[:5]}, "
            f"missing {sorted(set(missing) - tied)[:5]}"
        )


class TransformersBackend:
    """alignkit's own sampler over `model`: the policy itself (nothing to sync), or, for an
    asynchronous run in one process, a copy of it (`detached`) that samples in a thread of its own
    while the policy trains and takes each update through `load_state`."""

    def __init__(self, model, tokenizer, batch_size: int = 16, progress: bool = False):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress

    @classmethod
    def detached(cls, model, tokenizer, batch_size: int = 16) -> "TransformersBackend":
        """A sampler over a copy of `model` (LoRA adapters merged into it)."""
        import copy

        from alignkit.models import is_peft, merged_copy

        base = base_weights(model) if is_peft(model) else None  # what each update's adapters merge into
        own = merged_copy(model) if base is not None else copy.deepcopy(model)  # never the policy itself
        own.eval()
        backend = cls(own, tokenizer, batch_size)
        if base is not None:
            backend.adapters, backend.accepts_adapters = AdapterBase(own, base), True
        return backend

    accepts_adapters = False  # a copy of a LoRA policy takes its adapters (`adapters.AdapterUpdate`)
    adapters: AdapterBase | None = None

    def load_state(self, state, version: int | None = None) -> None:
        if is_adapter_update(state):
            assert self.adapters is not None, "adapters go to a copy of a LoRA policy only"
            self.adapters.apply(state, "online.async")
        else:
            load_weights(self.model, state, "online.async")

    def sample(
        self, prompts: list, params: SamplingParams, seed: int, prompt_seeds: list | None = None, min_version: int = 0
    ) -> list[list[Sample]]:
        return sample(
            self.model,
            prompts,
            params,
            eos_ids=self.tokenizer.eos_token_id,
            pad_id=self.tokenizer.pad_token_id,
            batch_size=self.batch_size,
            seed=seed,
            tokenizer=self.tokenizer,
            progress=self.progress,
            prompt_seeds=prompt_seeds,
        )

    def sync(self, model) -> None:
        self.model = model  # the same module: its weights are always current

    def close(self) -> None:
        pass  # samples with the trained model itself


class ServerPool:
    """Several sampling servers as one backend: each call's prompts are cut into one contiguous
    share per server (sizes differing by one at most), sampled at the same time and put back in
    order; weights go to every server. Each prompt has its own seed, so the samples do not depend
    on which server drew them. A server that fails stops the call with its own message (its URL)."""

    def __init__(self, clients: list):
        self.clients = clients
        self.url = ", ".join(c.url for c in clients)
        self.accepts_adapters = all(c.accepts_adapters for c in clients)

    def _each(self, calls: list) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = [pool.submit(fn, *args) for fn, args in calls]
            return [f.result() for f in futures]  # the first failure, in server order, is raised

    def sample(self, prompts: list, params, seed: int, prompt_seeds: list | None = None, min_version: int = 0):
        k = len(self.clients)
        bounds = [len(prompts) * i // k for i in range(k + 1)]
        seeds = prompt_seeds if prompt_seeds is not None else [seed] * len(prompts)
        shares = [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i] < bounds[i + 1]]
        outs = self._each(
            [
                (self.clients[i].sample, (prompts[a:b], params, seed, seeds[a:b], min_version))
                for i, (a, b) in enumerate(shares)
            ]
        )
        return [group for out in outs for group in out]

    def set_run(self, run: str) -> None:
        for c in self.clients:
            c.set_run(run)

    def sync(self, model) -> None:
        state = self.clients[0].state_fn(model)
        if self.clients[0].writer:
            self.load_state(state)
        self.clients[0].barrier()

    def load_state(self, state: dict, version: int | None = None) -> None:
        self._each([(c.load_state, (state, version)) for c in self.clients])

    def close(self) -> None:
        for c in self.clients:
            c.close()


def make_backend(
    name: str,
    model,
    tokenizer,
    model_path: str,
    batch_size: int,
    *,
    vllm_server: str | None = None,
    sampler_server: str | None = None,
    request_timeout_s: float = 600.0,
    weight_transport: str = "directory",
    lora_rank: int | None = None,
    vllm_sync_dir: str | None = None,
    vllm_token_file: str | None = None,
    vllm_dtype: str = "auto",
    vllm_memory: float | None = None,
    vllm_kv_cache_gib: float | None = None,
    max_model_len: int = 2048,
    seed: int = 0,
    writer: bool = True,
    barrier=None,
    state_fn=None,
    training: bool = False,
    overlapped: bool = False,
):
    """The sampler `generation.backend` names: alignkit's own over `model` (or in an `alignkit
    sample-serve` at `sampler_server`), or vLLM (a colocated engine, or a client of `vllm_server`).
    `training`: a colocated engine on a GPU sleeps between rollouts so the trainer has the memory
    (unless `overlapped`: it samples while the trainer trains, `online.async`)."""
    if name == "transformers" and not sampler_server:
        return TransformersBackend(model, tokenizer, batch_size)
    if name not in ("transformers", "vllm"):
        raise ConfigError(f"`generation.backend` must be transformers or vllm; got {name!r}.")
    from alignkit.generation.vllm_engine import VLLMEngine, VLLMServer

    if sampler_server or vllm_server:
        given = sampler_server or vllm_server
        clients = [
            VLLMServer(
                url,
                tokenizer,
                kind="alignkit" if sampler_server else "vllm",
                timeout_s=request_timeout_s,
                model_path=model_path,
                writer=writer,
                barrier=barrier,
                state_fn=state_fn,
                weights_dir=vllm_sync_dir,
                token_file=vllm_token_file,
                transport=weight_transport,
            )
            for url in ([given] if isinstance(given, str) else given)
        ]
        return clients[0] if len(clients) == 1 else ServerPool(clients)
    import torch

    cuda = torch.cuda.is_available()
    dtype = vllm_dtype if vllm_dtype != "auto" else ("bfloat16" if cuda else "float32")
    return VLLMEngine(
        model_path,
        tokenizer,
        dtype=dtype,
        kv_cache_gib=vllm_kv_cache_gib,
        gpu_memory_utilization=vllm_memory,
        max_model_len=max_model_len,
        seed=seed,
        sleep_after_sample=training and not overlapped,
        logprobs="processed" if training else "raw",  # training scores the sampling distribution's
        lora_rank=lora_rank,
    )
