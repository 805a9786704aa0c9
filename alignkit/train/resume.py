"""Resuming a run: pick and check the checkpoint, and refuse a resume that would quietly mix two
runs (a changed config or changed training data) unless the user asks for it.

Everything here happens before any model loads, so a mistake costs seconds, not a reference pass.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from alignkit import losses
from alignkit.config import RunConfig, flat_dict, load_config, to_dict
from alignkit.errors import ConfigError
from alignkit.train import checkpoint as ckpt

# Keys that change how a run reports and saves, not what it computes: a resume may change them.
RESUME_SAFE_KEYS = {
    "output_dir",
    "cache_dir",
    "train.report_to",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "dist.strategy",
    "dist.reshard_after_forward",
    "dist.cpu_offload",
    "dist.timeout_s",
    "dist.context_parallel",  # how the same sequences are split over processes
    "train.stop_on",
}
RESUME_SAFE_SECTIONS = ("health.",)  # the monitor watches the run; it does not change what it computes


def check_output_dir(run_dir: Path) -> None:
    """Fail before any expensive work if the run directory cannot be created or written."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "output_dir" if parent == run_dir else f"output_dir's parent {parent}"
                raise ConfigError(
                    f"{what} `{parent}` is a file, not a directory; set `output_dir` to a new or existing directory."
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"`output_dir` {run_dir}: {parent} is not writable; choose a directory you can write to."
                )
            break


def _with_loss_defaults(cfg: RunConfig) -> dict:
    """The config as a dict, each loss spelled out with its default parameters (`loss: {name:
    dpo}` and `loss: {name: dpo, beta: 0.1}` are the same setting)."""

    def spelled_out(term: dict) -> dict:
        try:
            _, params = losses.resolve({k: v for k, v in term.items() if k != "weight"})
        except (ConfigError, KeyError, TypeError):  # invalid: compared as written (the recipe reports it)
            return term
        return {**term, **params}

    d = to_dict(cfg)
    d["loss"] = spelled_out(d["loss"])
    d["losses"] = [spelled_out(t) if isinstance(t, dict) else t for t in d["losses"]]
    return d


def config_changes(old: RunConfig, new: RunConfig) -> dict:
    """{key: (old, new)} for every setting that differs and changes what the run computes."""
    a, b = flat_dict(_with_loss_defaults(old)), flat_dict(_with_loss_defaults(new))
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in RESUME_SAFE_KEYS and not k.startswith(RESUME_SAFE_SECTIONS)
    }


def data_fingerprint(items: list) -> str:
    """Hash of the tokenized training examples: a resume must see the data it was trained on."""
    h = hashlib.sha256()
    for it in items:
        h.update(repr(it).encode())
    return h.hexdigest()[:24]


@dataclass
class Resume:
    path: Path
    saved: dict  # trainer_state.pt
    changes: dict  # {key: (old, new)} accepted with --allow-config-change
    allow_change: bool

    @property
    def state(self) -> dict:
        return self.saved["state"]

    def check_data(self, fingerprint: str) -> None:
        if self.state.get("data_fingerprint") != fingerprint and not self.allow_change:
            raise ConfigError(
                f"the training data differ from the data {self.path} was trained on (same config, "
                "other examples or tokens). Restore the data, start a new run in another output_dir, or "
                "pass --allow-config-change to go on with these data."
            )

    def record_changes(self, run_dir: Path, step: int) -> None:
        if not self.changes:
            return
        row = {
            "step": step,
            "resumed_from": self.path.name,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "changes": {k: {"from": old, "to": new} for k, (old, new) in self.changes.items()},
        }
        with open(run_dir / "config_changes.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.changes.items())
        print(
            f"alignkit: --allow-config-change: from step {step} on, {listed} (recorded in config_changes.jsonl)",
            flush=True,
        )


def prepare_resume(
    cfg: RunConfig, run_dir: Path, resume_from: str | None, allow_change: bool, dist=None
) -> Resume | None:
    """Pick and check the checkpoint, its config and its trainer state, before any model loads. With
    several processes (`dist`, an alignkit Dist), the main one cleans up and checks the files."""
    find = lambda: ckpt.find_resume_point(run_dir, resume_from)  # noqa: E731
    point = dist.on_main(find) if dist is not None else find()
    for note in point.notes if dist is None or dist.is_main else []:
        print(f"alignkit: {note}", flush=True)
    if point.path is None:
        return None
    saved_cfg_file = point.path / "alignkit_config.yaml"
    try:
        saved_cfg = load_config(str(saved_cfg_file), saved=True)
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{saved_cfg_file}: the checkpoint's config cannot be read: {e}") from None
    changes = config_changes(saved_cfg, cfg)
    if changes and not allow_change:
        listed = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ConfigError(
            f"the config differs from the one {point.path} was trained with:\n{listed}\n"
            "A resumed run continues the same run, so these would silently mix two settings. Undo the changes, "
            "start a new run in another output_dir, or pass --allow-config-change to apply them from step "
            f"{ckpt.checkpoint_step(point.path)} on (recorded in {run_dir / 'config_changes.jsonl'})."
        )
    return Resume(point.path, ckpt.load_trainer_state(point.path), changes, allow_change)


def finished_summary(run_dir: Path, resume: Resume, quiet: bool = False) -> dict | None:
    """The summary of a run that already ended and that nothing asks to extend, else None."""
    state, summary_file = resume.state, run_dir / "summary.json"
    if resume.changes or state["step"] < state["total_steps"] or not summary_file.is_file():
        return None
    if not quiet:
        print(
            f"alignkit: {run_dir} already finished at step {state['step']} of {state['total_steps']}; nothing "
            f"to resume (final model in {run_dir / 'final'}). To train longer, raise train.max_steps and pass "
            "--allow-config-change.",
            flush=True,
        )
    return json.loads(summary_file.read_text())
