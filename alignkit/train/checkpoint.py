"""Checkpoints: Hugging Face directories written atomically, with the state to resume exactly.

A checkpoint is written under a temporary name in the same directory and renamed into place, so
a crash mid-write never leaves a directory that looks complete. Its `manifest.json`, written last,
lists every file with its size and SHA-256: a checkpoint damaged later (a truncated copy, a file
deleted by hand) is detected before anything is loaded from it.

Trainer state (`trainer_state.pt`) holds only tensors, numbers, strings, lists and dicts, and is
loaded with `torch.load(weights_only=True)`: a run directory shared by someone else can carry a
crafted pickle, and unpickling it would run their code. RNG states are stored as tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alignkit.config import RunConfig, save_config
from alignkit.errors import AlignkitError
from alignkit.models import is_peft, merged_copy, save_tokenizer

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_LEFTOVER = re.compile(r"\.(.+)\.(tmp|old)-[^/]+")


class CheckpointError(AlignkitError):
    """A checkpoint cannot be used: missing, damaged, or not a file alignkit wrote."""


# -- RNG state as tensors ----------------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG a run draws from, as tensors (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()  # (3, 625 ints, None | float)
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # legacy=True, the default: (kind, keys, pos, has_gauss, cached)
    kind, keys, pos, has_gauss, cached = np_state
    state = {
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if version != 3 or kind != "MT19937":
        raise RuntimeError(f"unexpected RNG state layout: python {version}, numpy {kind}")
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss[0] if gauss else None))
    pos, has_gauss = state["numpy_extra"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"][0]))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# -- atomic directories ------------------------------------------------------------------------


def atomic_dir(final: Path, write, prepared: Path | None = None) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `final` (replacing an older one). `prepared`: a
    temporary directory (beside `final`) that is already written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if prepared is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
    else:
        tmp = prepared
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


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what interrupted writes left in `run_dir` (`.checkpoint-N.tmp-*`, `.final.old-*`);
    an `.X.old-*` whose `X` is missing (killed between the two renames of `atomic_dir`) is the
    only complete copy and is put back. Returns one note per action."""
    notes: list[str] = []
    if not run_dir.is_dir():
        return notes
    for p in sorted(run_dir.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m or not p.is_dir():
            continue
        target = run_dir / m.group(1)
        if m.group(2) == "old" and not target.exists():
            os.replace(p, target)
            notes.append(f"restored {target.name} from {p.name}, left by a write that was interrupted")
        else:
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p.name}, left by a checkpoint write that was interrupted")
    return notes


# -- writing -----------------------------------------------------------------------------------


def save_model_dir(path: Path, model, tokenizer, cfg: RunConfig, merge_lora: bool = False) -> None:
    """Write a directory `AutoModelForCausalLM.from_pretrained` (and vLLM) can load."""
    to_save = model
    if merge_lora and is_peft(model):
        to_save = merged_copy(model)  # the training model keeps its adapters
    to_save.save_pretrained(path, safe_serialization=True)
    if is_peft(to_save):  # adapters only: the base's config still names the model it applies to
        to_save.get_base_model().config.save_pretrained(path)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)
    save_config(cfg, path / "alignkit_config.yaml")


def save_model_config(path: Path, model, tokenizer, cfg: RunConfig) -> None:
    """A sharded checkpoint's model directory without weights (they are in `dcp/`): config, tokenizer."""
    from alignkit.models import is_peft

    path.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if is_peft(model) else model
    base.config.save_pretrained(path)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)
    save_config(cfg, path / "alignkit_config.yaml")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """List every file (size, SHA-256) in `manifest.json`; written last, so its presence means
    the writer finished."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"alignkit_checkpoint": 1, "files": files}, indent=1))


def save_checkpoint(run_dir: Path, step: int, write_main, keep: int, dist, write_all=None) -> Path:
    """Write `checkpoint-<step>` atomically and prune all but the `keep` newest.

    `write_all(tmp)` runs on every process first (each writes its shards of a sharded checkpoint),
    then `write_main(tmp)` on the main process (model config and weights, tokenizer, trainer state);
    the manifest is written last and the directory renamed into place. `dist`: an alignkit Dist."""
    final = Path(run_dir) / f"checkpoint-{step}"
    if dist.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
    tmp = Path(dist.broadcast(str(tmp) if dist.is_main else None))
    try:
        if write_all is not None:
            write_all(tmp)
        dist.barrier()  # every shard is on disk
        if dist.is_main:
            write_main(tmp)
            write_manifest(tmp)
            atomic_dir(final, lambda target: None, prepared=tmp)
            for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a full disk, a lost mount: say what happened and what is still there
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in list_checkpoints(run_dir) if p != final]
        kept = (
            f"the previous checkpoint {previous[-1]} is intact (resume with --resume)"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"writing {final.name} failed: {e}. Nothing of it was kept; {kept}. Free space "
            "or fix the output directory, then resume."
        ) from e
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def save_trainer_state(tmp: Path, trainer_state: dict) -> None:
    """`trainer_state.pt` (tensors, numbers, strings, lists, dicts) and a readable copy of the loop state."""
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state.get("state", {}), indent=2, default=str))


# -- finding and checking ----------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every `checkpoint-N` directory of the run, in step order (complete or not)."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest `checkpoint-N` directory (not checked; see `find_resume_point`)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    m = _CHECKPOINT.fullmatch(path.name)
    assert m is not None, path  # a checkpoint-N directory: find_resume_point checked the name
    return int(m.group(1))


def verify(ckpt: Path) -> str | None:
    """None if every file of the manifest is there with its size and checksum; else what is wrong."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"it has no {MANIFEST} (the write did not finish, or it was made by hand)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is not valid"
    for name, want in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']} (truncated or replaced)"
        if _sha256(p) != want["sha256"]:
            return f"{name} does not match its checksum (the file was modified or damaged)"
    return None


@dataclass
class ResumePoint:
    path: Path | None  # None: nothing to resume, start from scratch
    notes: list  # what was found and decided, for the user


def find_resume_point(run_dir: Path, resume_from: str | None = None) -> ResumePoint:
    """The checkpoint to resume from: `resume_from` (a name in `run_dir` or a path), else the
    latest. A damaged one is an error that names it and offers the newest good one; it is never
    skipped in silence."""
    run_dir = Path(run_dir)
    notes = clean_leftovers(run_dir)
    if resume_from is not None:
        path = Path(resume_from)
        if not path.is_dir():
            path = run_dir / resume_from
        if not path.is_dir() or not _CHECKPOINT.fullmatch(path.name):
            names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
            raise CheckpointError(
                f"--resume-from {resume_from}: no such checkpoint directory (checkpoints in {run_dir}: {names})."
            )
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{path} cannot be resumed from: {problem}.")
        return ResumePoint(path, notes)
    found = list_checkpoints(run_dir)
    if not found:
        return ResumePoint(None, notes + [f"--resume: no checkpoint in {run_dir}; starting from scratch"])
    latest = found[-1]
    problem = verify(latest)
    if problem is None:
        return ResumePoint(latest, notes)
    good = next((p for p in reversed(found[:-1]) if verify(p) is None), None)
    offer = (
        f"Resume from the previous good checkpoint with `--resume-from {good.name}`, or delete {latest} "
        "and use --resume."
        if good
        else "No earlier checkpoint is intact; start the run again without --resume."
    )
    raise CheckpointError(f"the latest checkpoint {latest} is damaged: {problem}. {offer}")


# -- loading -----------------------------------------------------------------------------------


def load_weights(model, ckpt: Path) -> None:
    """Load a checkpoint's trainable weights into `model` (full weights, or LoRA adapters)."""
    from safetensors import SafetensorError

    try:
        if is_peft(model):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
            return
        loaded = type(model).from_pretrained(ckpt, dtype=next(model.parameters()).dtype)  # LM or reward model
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt}: the weights cannot be read ({e}); resume from an earlier checkpoint "
            "with --resume-from checkpoint-N."
        ) from None
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected, unexpected


def load_trainer_state(ckpt: Path) -> dict:
    """Read `trainer_state.pt` without running code from it (weights_only=True)."""
    path = ckpt / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} holds objects other than tensors, numbers and lists, so alignkit will not load it: "
            f"unpickling it could run code planted in the file ({first}). Only resume from checkpoints "
            "alignkit wrote; if this one came from someone else, delete it."
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({e}); resume from an earlier checkpoint with --resume-from checkpoint-N."
        ) from None
