"""Checkpoints: Hugging Face directories written atomically, with the state to resume exactly.

A checkpoint is written under a temporary name in the same directory and renamed into place, so
a crash mid-write never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from alignkit.config import RunConfig, save_config
from alignkit.models import is_peft

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_dir(final: Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `final` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_model_dir(path: Path, model, tokenizer, cfg: RunConfig, merge_lora: bool = False) -> None:
    """Write a directory `AutoModelForCausalLM.from_pretrained` (and vLLM) can load."""
    to_save = model
    if merge_lora and is_peft(model):
        # Merge a copy so the training model keeps its adapters.
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    save_config(cfg, path / "alignkit_config.yaml")


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, cfg: RunConfig, optimizer, scheduler,
                    state: dict, keep: int) -> Path:
    def write(tmp: Path):
        save_model_dir(tmp, model, tokenizer, cfg)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "state": state},
            tmp / STATE_FILE,
        )
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

    path = atomic_dir(run_dir / f"checkpoint-{step}", write)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_weights(model, ckpt: Path) -> None:
    """Load a checkpoint's trainable weights into `model` (full weights, or LoRA adapters)."""
    if is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        return
    loaded = type(model).from_pretrained(ckpt, dtype=next(model.parameters()).dtype)  # LM or reward model
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected, unexpected


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
