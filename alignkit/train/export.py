"""`alignkit export CHECKPOINT OUT`: any checkpoint (one-process or sharded) as one Hugging Face
model directory that `AutoModelForCausalLM.from_pretrained` and vLLM load, LoRA merged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from alignkit.config import load_config
from alignkit.distributed import Dist
from alignkit.errors import ConfigError
from alignkit.models import apply_lora, load_model, load_tokenizer, save_tokenizer
from alignkit.registries import recipes as registry
from alignkit.train import checkpoint as ckpt


def export_checkpoint(
    checkpoint: str, output: str, module: str = "policy", trust_remote_code: bool = False, adapters_only: bool = False
) -> Path:
    """`output`: the model with LoRA merged (a quantized base dequantized first), or with
    `adapters_only` a PEFT adapter directory (`PeftModel.from_pretrained(base, output)` loads it)."""
    from alignkit.models import is_peft

    model, tokenizer, cfg = _assemble(Path(checkpoint), module, trust_remote_code)
    out = Path(output)
    if not adapters_only:
        return ckpt.atomic_dir(out, lambda tmp: ckpt.save_model_dir(tmp, model, tokenizer, cfg, merge_lora=True))
    if not is_peft(model):
        raise ConfigError(
            f"{checkpoint}: its {module} was trained in full (no LoRA adapters); export it without --adapters-only."
        )

    def write(tmp: Path) -> None:
        model.peft_config["default"].base_model_name_or_path = cfg.model.name_or_path
        model.save_pretrained(tmp)  # peft writes the adapters (and a reward head) only
        save_tokenizer(tokenizer, tmp)

    return ckpt.atomic_dir(out, write)


def load_checkpoint_model(checkpoint: Path, module: str = "policy", trust_remote_code: bool = False):
    """The checkpoint's model (any layout), LoRA merged, on the CPU."""
    from alignkit.models import merged_copy

    model, _, _ = _assemble(checkpoint, module, trust_remote_code)
    return merged_copy(model)


def _assemble(path: Path, module: str, trust_remote_code: bool):
    problem = ckpt.verify(path) if path.is_dir() else "it is not a directory"
    if problem:
        raise ckpt.CheckpointError(f"{path} cannot be exported: {problem}.")
    cfg = load_config(str(path / "alignkit_config.yaml"), saved=True)
    if cfg.model.trust_remote_code and not trust_remote_code:
        # a checkpoint may come from someone else: its saved config alone never runs a repository's code
        raise ConfigError(
            f"{path}: its model was trained with model.trust_remote_code=true, which runs Python code "
            f"from the model repository ({cfg.model.name_or_path}). Pass --trust-remote-code if you "
            "trust that code."
        )
    spec = registry.get(cfg.recipe)
    source = path if module == "policy" else path / module
    if not source.is_dir():
        found = ", ".join(p.name for p in path.iterdir() if p.is_dir() and p.name != "dcp") or "none"
        raise ConfigError(f"{path} has no module `{module}` (modules besides the policy: {found}).")
    tokenizer = load_tokenizer(dataclasses.replace(cfg.model, name_or_path=str(source)))
    cpu = torch.device("cpu")
    if module == "policy":
        model = load_model(
            cfg.model,
            device=cpu,
            cache_dir=cfg.cache_dir,
            pad_token_id=tokenizer.pad_token_id,
            reward_names=cfg.reward.head_names() if spec.model_kind == "reward_model" else None,
        )
        lora, frozen = cfg.lora.enabled, cfg.model.freeze_layers
    else:  # PPO's value model: a scalar head on the trunk it started from
        init = cfg.model.name_or_path if cfg.critic.init == "policy" else cfg.critic.init
        model = load_model(
            dataclasses.replace(cfg.model, name_or_path=init),
            device=cpu,
            cache_dir=cfg.cache_dir,
            reward_names=["value"],
            pad_token_id=tokenizer.pad_token_id,
        )
        lora, frozen = cfg.critic.lora, cfg.critic.freeze_layers
    if lora:
        model = apply_lora(model, cfg.lora, cfg.model.quantization, frozen)
    if (path / "dcp").is_dir():
        Dist().load_sharded_model(model, path / "dcp", module)
    else:
        ckpt.load_weights(model, source)
    return model, tokenizer, cfg


def average_models(directories: list, output: str) -> Path:
    """WARM (Ramé et al., "WARM: On the Benefits of Weight Averaged Reward Models", arXiv
    2401.12187): the element-wise mean of the weights of models fine-tuned from one initialisation
    (reward models trained with other seeds, data orders or learning rates), written as one model
    directory with the first one's config and tokenizer. The mean is taken in float64 and stored in
    each weight's own dtype. Models of other architectures or shapes are refused, naming the first
    difference; models from different initialisations average to nonsense, which this cannot see."""
    import shutil

    from safetensors.torch import load_file, save_file

    dirs = [Path(d) for d in directories]
    if len(dirs) < 2:
        raise ConfigError(f"averaging needs two or more model directories; got {len(dirs)}.")
    states = []
    for d in dirs:
        files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
        if not files or not (d / "config.json").is_file():
            raise ConfigError(
                f"{d} is not a model directory (config.json and *.safetensors); give `final/` directories."
            )
        state: dict = {}
        for f in files:
            state.update(load_file(str(f)))
        states.append(state)
    first = states[0]
    for d, state in zip(dirs[1:], states[1:]):
        if set(state) != set(first):
            extra = sorted(set(state) ^ set(first))[:3]
            raise ConfigError(
                f"{d} holds other weights than {dirs[0]} ({', '.join(extra)}): not the same architecture."
            )
        bad = next((k for k in first if state[k].shape != first[k].shape), None)
        if bad is not None:
            raise ConfigError(
                f"{d}: {bad} has shape {tuple(state[bad].shape)}, {dirs[0]} {tuple(first[bad].shape)}; "
                "only models of one shape average."
            )
    mean = {k: (sum(s[k].double() for s in states) / len(states)).to(first[k].dtype).contiguous() for k in first}

    def write(tmp: Path) -> None:
        for f in dirs[0].iterdir():  # config, tokenizer, chat template: the first model's
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        save_file(mean, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return ckpt.atomic_dir(Path(output), write)
