"""Everything a run needs before its first step: where it runs (`Placement`: processes, device,
precision, autocast, resolved once) and what `setup` builds from the config (tokenizer, recipe,
data, model and what the recipe derives from the model)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from alignkit import context_parallel, quantization
from alignkit.config import RunConfig
from alignkit.data.splits import PreparedData
from alignkit.distributed import Dist
from alignkit.errors import ConfigError
from alignkit.logprob_passes import weights_fingerprint
from alignkit.models import (
    apply_lora,
    bf16_supported,
    cache_root,
    disable_dropout,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from alignkit.registries import recipes as registry
from alignkit.train.base import Recipe, SetupContext

if TYPE_CHECKING:  # transformers is imported when a model loads, not with this module
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Placement:
    """Where this process trains, resolved once from the config."""

    dist: Dist
    device: torch.device
    precision: str  # "bf16" or "fp32"
    autocast: Callable[[], contextlib.AbstractContextManager]  # a zero-argument context factory


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that support it, fp32 elsewhere."""
    if cfg.train.precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return cfg.train.precision


def place(cfg: RunConfig) -> Placement:
    """This process's Placement: it joins the process group torchrun set up, if any."""
    device = Dist.local_device(resolve_device(cfg.model.device))
    precision = resolve_precision(cfg, device)
    dist = Dist.from_env(cfg.dist, device, precision)
    # bf16 autocast (fp32 master weights), unless FSDP2 mixed precision gathers the parameters in bf16
    autocast: Callable[[], contextlib.AbstractContextManager]
    if precision == "bf16" and not dist.mixed_precision:
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    if cfg.train.activation_offload:
        autocast = offloading(autocast, device)
    return Placement(dist, device, precision, autocast)


def offloading(autocast: Callable[[], contextlib.AbstractContextManager], device: torch.device):
    """`autocast` and, around the same forwards, the tensors saved for the backward kept in pinned
    CPU memory (`torch.autograd.graph.save_on_cpu`): the activations leave the GPU until the
    backward brings them back. On a CPU they are in CPU memory already, so it is refused."""
    if device.type != "cuda":
        raise ConfigError(
            f"`train.activation_offload: true` moves activations from GPU to CPU memory; this run is on "
            f"{device.type}, where they are in host memory already. Remove it (model.gradient_checkpointing "
            "is what saves activation memory here)."
        )

    @contextlib.contextmanager
    def both():
        with autocast(), torch.autograd.graph.save_on_cpu(pin_memory=True):
            yield

    return both


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_fingerprint(cfg: RunConfig) -> dict:
    """Identity of the initial model, keying the caches of its reference log-probs and samples."""
    fingerprint = weights_fingerprint(resolve_model_path(cfg.model.name_or_path, cfg.cache_dir), cfg.model.revision)
    fingerprint["lora"] = cfg.lora.enabled  # adapters start at zero, but keep the key honest
    if cfg.model.quantization:  # a QLoRA reference is the quantized base
        fingerprint["quantization"] = cfg.model.quantization
    return fingerprint


def printer(dist: Dist):
    """A function printing notes as `alignkit: ...` on the main process only."""

    def show(notes) -> None:
        if dist.is_main:
            for note in notes:
                print(f"alignkit: {note}", flush=True)

    return show


def load_policy(cfg: RunConfig, spec, tokenizer, device):
    mc, context = cfg.model, cfg.dist.context_parallel
    if context > 1:  # the model runs alignkit's attention: SDPA, with Ulysses' all-to-all when sharded
        context_parallel.check_attention(mc.attn_implementation, context)
        context_parallel.register()
        mc = dataclasses.replace(mc, attn_implementation=context_parallel.ATTENTION)
    model = load_model(
        mc,
        device=device,
        cache_dir=cfg.cache_dir,
        pad_token_id=tokenizer.pad_token_id,
        reward_names=cfg.reward.head_names() if spec.model_kind == "reward_model" else None,
    )
    if context > 1:
        context_parallel.check_heads(model.config, context)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, cfg.model.quantization, cfg.model.freeze_layers)
    return model


@dataclass
class Session:
    """What `setup` builds: everything a run needs before its first step."""

    tokenizer: PreTrainedTokenizerBase
    recipe: Recipe
    data: PreparedData
    model: torch.nn.Module
    placement: Placement
    ctx: SetupContext
    timings: dict = field(default_factory=dict)  # load_s (tokenizer, data, model); setup_s (Recipe.setup)

    @property
    def dist(self) -> Dist:
        return self.placement.dist

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        return self.placement.autocast


def setup(cfg: RunConfig, progress: bool = True, placement: Placement | None = None) -> Session:
    """Load tokenizer, data, model and everything the recipe derives from the model (the model is
    not sharded yet: `loop.train` does that)."""
    placement = placement or place(cfg)
    set_seed(cfg.seed)
    show = printer(placement.dist)
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    spec = registry.get(cfg.recipe)
    recipe: Recipe = spec.load()(cfg, tokenizer)
    data = recipe.prepare()
    show(data.notes)
    if not data.train:
        raise ConfigError("no training examples left after loading and splitting; check `data.train`.")
    model = load_policy(cfg, spec, tokenizer, placement.device)
    if getattr(model, "quantization_report", None):
        show([quantization.describe(model.quantization_report)])
    ctx = SetupContext(
        placement.device,
        placement.autocast,
        placement.precision,
        initial_fingerprint(cfg),
        cache_root(cfg.cache_dir),
        progress and placement.dist.is_main,
        placement.dist,
    )
    loaded = time.perf_counter()
    # Recipe.setup: the cached reference pass (offline recipes), the sampler (online ones), ...
    prepared = recipe.setup(model, data, ctx)
    show(prepared.notes)
    timings = {"load_s": loaded - start, "setup_s": time.perf_counter() - loaded}
    return Session(tokenizer, recipe, prepared, model, placement, ctx, timings)
