"""LoRA updates for a sampler: a LoRA run publishes its adapters, not its merged weights.

A policy trained with LoRA changes only its adapters (A [r, in] and B [out, r] per adapted linear
layer; Hu et al., arXiv 2106.09685), so an update to a sampler needs only those: for SmolLM2-135M
with r=16 on every linear layer, 4.9 M numbers instead of 135 M. The sampler keeps the base weights
W0 of the layers the adapters touch (on the CPU) and loads W = W0 + (B @ A) * scaling into its
model, the arithmetic of peft's `merge` (`LoraLayer.get_delta_weight`: float32 on the CPU for
half-precision adapters, then the weight's dtype), so the sampler holds what `merge_and_unload`
gives the trainer.

The base a sampler holds must be the trainer's: each update carries a fingerprint of every W0 it
applies to (sum and sum of squares in float64), checked when the sampler first takes its base (an
`alignkit sample-serve` reads it from the checkpoint it loaded, whatever full updates came since),
so a server started from another model refuses the update, saying what to start it with, instead of
sampling from a mixture.

alignkit's samplers take adapters (the copy of the policy in the training process, and
`alignkit sample-serve`) and merge them; vLLM serves them as a LoRA adapter (`save_peft`: the
colocated engine started with LoRA, `alignkit vllm-serve --max-lora-rank`), applied to the
checkpoint it loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.quantization import base_fingerprint, plain, weight_fingerprint

ADAPTERS_FILE, ADAPTERS_META = "adapters.safetensors", "adapters.json"
ADAPTER = "default"  # the adapter name alignkit's `apply_lora` gives


@dataclass
class AdapterUpdate:
    """The adapters of a policy under the base model's weight names."""

    modules: dict = field(default_factory=dict)  # weight name -> (A [r, in], B [out, r], scaling)
    fingerprints: dict = field(default_factory=dict)  # weight name -> (dtype, sum, sum of squares) of W0

    def copy_to_cpu(self) -> "AdapterUpdate":
        """A copy that later training steps do not change."""
        return AdapterUpdate(
            {
                k: (a.detach().to("cpu", copy=True), b.detach().to("cpu", copy=True), s)
                for k, (a, b, s) in self.modules.items()
            },
            dict(self.fingerprints),
        )

    def numel(self) -> int:
        return sum(a.numel() + b.numel() for a, b, _ in self.modules.values())

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, (a, b, _) in self.modules.items():
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a.contiguous(), b.contiguous()
        save_file(tensors, str(Path(directory) / ADAPTERS_FILE))
        meta = {name: {"scaling": s, "base": list(self.fingerprints[name])} for name, (_, _, s) in self.modules.items()}
        (Path(directory) / ADAPTERS_META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> "AdapterUpdate":
        from safetensors.torch import load_file

        tensors = load_file(str(Path(directory) / ADAPTERS_FILE))
        meta = json.loads((Path(directory) / ADAPTERS_META).read_text())
        modules = {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"], float(m["scaling"])) for n, m in meta.items()}
        return cls(modules, {n: tuple(m["base"]) for n, m in meta.items()})

    def rank_alpha(self) -> tuple[int, float]:
        """(r, lora_alpha) shared by every layer, as a PEFT adapter config states them."""
        ranks = {a.shape[0] for a, _, _ in self.modules.values()}
        scales = {round(s, 9) for _, _, s in self.modules.values()}
        if len(ranks) != 1 or len(scales) != 1:
            raise ValueError(f"the adapters differ in rank {sorted(ranks)} or scaling {sorted(scales)} across layers")
        r = ranks.pop()
        return r, scales.pop() * r

    def save_peft(self, directory: Path) -> None:
        """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors), what vLLM's LoRA
        support loads."""
        from safetensors.torch import save_file

        r, alpha = self.rank_alpha()
        tensors = {}
        for name, (a, b, _) in self.modules.items():
            prefix = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.detach().cpu().contiguous()
        save_file(tensors, str(Path(directory) / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "target_modules": sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in self.modules}),
            "modules_to_save": None,
            "base_model_name_or_path": None,
        }
        (Path(directory) / "adapter_config.json").write_text(json.dumps(config))

    def check_base(self, checkpoint: str, where: str) -> None:
        """Refuse adapters whose base differs from the checkpoint a sampler loaded (vLLM applies them
        to the weights it started with)."""
        stored = checkpoint_tensors(checkpoint, list(self.modules))
        for name, w in stored.items():
            have, want = fingerprint(w.to(getattr(torch, self.fingerprints[name][0]))), self.fingerprints[name]
            if not _same_base(have, want):
                raise ValueError(
                    f"{where}: the LoRA adapters' base differs from the checkpoint the engine loaded "
                    f"({checkpoint}, {name}): start it with the model the trainer started from."
                )

    def merged(self, base: dict) -> dict:
        """{weight name: W0 + (B @ A) * scaling} in W0's dtype, as peft's merge computes it."""
        out = {}
        for name, (a, b, scaling) in self.modules.items():
            w0 = base[name]
            a, b, dtype = a.to(w0.device), b.to(w0.device), b.dtype
            half = w0.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
            if half:  # peft: slow half-precision matmuls on CPUs, so float32 and back
                a, b = a.float(), b.float()
            delta = (b @ a) * scaling
            out[name] = w0 + delta.to(dtype).to(w0.dtype)
        return out


def is_adapter_update(state) -> bool:
    return isinstance(state, AdapterUpdate)


fingerprint = weight_fingerprint


def _lora_layers(model):
    """(base weight name, LoRA layer) for every adapted layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            # peft's names: base_model.model.<the base model's module path>
            yield name.removeprefix("base_model.model.") + ".weight", module


def adapter_update(model) -> AdapterUpdate:
    """The adapters of a peft policy (LoRA on linear layers), for a sampler to merge."""
    update = AdapterUpdate()
    for name, layer in _lora_layers(model):
        if getattr(layer, "fan_in_fan_out", False) or getattr(layer, "use_dora", {}).get(ADAPTER, False):
            raise ValueError(f"{name}: only plain LoRA on linear layers is published as adapters")
        update.modules[name] = (
            layer.lora_A[ADAPTER].weight.detach(),
            layer.lora_B[ADAPTER].weight.detach(),
            float(layer.scaling[ADAPTER]),
        )
        update.fingerprints[name] = base_fingerprint(layer.get_base_layer())
    return update


def adapter_update_copy(model) -> AdapterUpdate:
    """`adapter_update` with its tensors copied to the CPU: for a sharded policy, called while its
    parameters are gathered (`Dist.full_params`), whose storage is freed when they are resharded."""
    update = adapter_update(model)
    update.modules = {
        n: (plain(a).to("cpu", copy=True), plain(b).to("cpu", copy=True), s) for n, (a, b, s) in update.modules.items()
    }
    return update


def base_weights(model) -> dict:
    """{weight name: a CPU copy of W0} of every adapted layer of a peft model (the base a detached
    sampler merges its updates into)."""
    return {name: plain(layer.get_base_layer().weight).to("cpu", copy=True) for name, layer in _lora_layers(model)}


class AdapterBase:
    """A sampler's side: the base weights the adapters apply to, and the merge into its model.

    `base`: known base weights (a copy of the policy made in the training process); else each
    layer's base is read the first time an update names it, from `checkpoint` (the directory the
    sampler loaded its model from: the base whatever full updates came since) or, without one, from
    the model, and checked against the update's fingerprint."""

    def __init__(self, model, base: dict | None = None, checkpoint: str | None = None):
        self.model, self.base, self.checkpoint = model, dict(base or {}), checkpoint
        self.rest_changed = False  # full weights came since the start: the layers without adapters too

    def took_full_weights(self) -> None:
        """The sampler loaded full weights (another run's): the next adapter update restores the
        layers it does not touch (embeddings, norms) from the checkpoint first."""
        self.rest_changed = True

    def check(self, update: AdapterUpdate, where: str) -> None:
        """Refuse `update` unless the sampler knows (or now takes, from its model) the trainer's base
        of every layer it names."""
        params = dict(self.model.named_parameters())
        unknown = [n for n in update.modules if n not in params]
        if unknown:
            raise ValueError(f"{where}: the adapters name layers the sampler's model lacks: {unknown[:3]}")
        missing = [n for n in update.modules if n not in self.base]
        stored = checkpoint_tensors(self.checkpoint, missing) if self.checkpoint else {}
        for name in update.modules:
            if name not in self.base:
                w = stored.get(name, params[name])
                self.base[name] = w.detach().to("cpu", params[name].dtype, copy=True)
                have, want = fingerprint(self.base[name]), update.fingerprints[name]
                if not _same_base(have, want):
                    del self.base[name]
                    raise ValueError(
                        f"{where}: the base weights the LoRA adapters apply to differ from the trainer's "
                        f"({name}: sum {have[1]:.6g}, sum of squares {have[2]:.6g} here; {want[1]:.6g}, "
                        f"{want[2]:.6g} in the trainer). Start the sampler with the model the trainer "
                        "started from (model.name_or_path), and do not send it full weights before."
                    )

    def apply(self, update: AdapterUpdate, where: str) -> None:
        """Load W0 + (B @ A) * scaling into the model for every layer `update` names."""
        self.check(update, where)
        params = dict(self.model.named_parameters())
        if self.rest_changed:
            rest = [n for n in params if n not in update.modules]
            stored = checkpoint_tensors(self.checkpoint, rest) if self.checkpoint else {}
            if not stored:
                raise ValueError(
                    f"{where}: this sampler holds full weights sent before, and has no checkpoint to take the "
                    "layers without adapters from; restart it with the model the trainer started from."
                )
            with torch.no_grad():
                for name, w in stored.items():
                    params[name].copy_(w.to(params[name].device, params[name].dtype))
            self.rest_changed = False
        merged = update.merged(self.base)
        with torch.no_grad():
            for name, w in merged.items():
                params[name].copy_(w.to(params[name].device))


def checkpoint_tensors(directory: str, names: list) -> dict:
    """{name: tensor} of the `names` a model directory's safetensors files hold (the others left out)."""
    from safetensors import safe_open

    out, wanted = {}, set(names)
    for f in sorted(Path(directory).glob("*.safetensors")) if Path(directory).is_dir() else []:
        with safe_open(str(f), framework="pt") as sf:
            for name in wanted & set(sf.keys()):
                out[name] = sf.get_tensor(name)
    return out


def _same_base(have: tuple, want: tuple) -> bool:
    """Same dtype: the same numbers (to float64 summation order); another dtype: as close as the
    coarser one rounds (a float32 sampler of a bf16 trainer's base)."""
    tol = 1e-9 if have[0] == want[0] else 1e-2
    return all(math.isclose(h, w, rel_tol=tol, abs_tol=tol) for h, w in zip(have[1:], want[1:]))
