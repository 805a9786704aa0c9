"""The one training loop: plain PyTorch, any recipe.

records -> examples -> batches -> log-probs -> loss -> AdamW step -> metrics. The loop knows
micro-batches, accumulation, schedules, checkpoints and logging; the recipe knows the method.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import jsonfile, losses
from alignkit.config import RunConfig, load_config, save_config, to_dict
from alignkit.data.batching import example_tokens
from alignkit.errors import AlignkitError, ConfigError
from alignkit.models import (apply_lora, bf16_supported, disable_dropout, load_model, load_tokenizer,
                             resolve_device, resolve_model_path)
from alignkit.train import checkpoint as ckpt
from alignkit.train.metrics import MetricsLogger, read_metrics
from alignkit.train.recipes import make_recipe, reference_cache_dir, write_heldout_record
from alignkit.train.reference import CachedReference, LiveReference, cached_ref_logps, model_fingerprint


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    train_metrics: dict = field(default_factory=dict)  # the last logged step
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that support it, fp32 elsewhere."""
    if cfg.train.precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return cfg.train.precision


def autocast_for(cfg: RunConfig, device: torch.device):
    """A zero-argument context factory: bf16 autocast (fp32 master weights) or nothing."""
    if resolve_precision(cfg, device) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_optimizer(model, cfg: RunConfig):
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm weights
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.adam_betas),
                             foreach=None)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cut_by_budget(seq: list, sizes: list, budget: int) -> list:
    """Consecutive runs of `seq` whose sizes add up to at most `budget` (an element over it alone)."""
    runs, current, used = [], [], 0
    for x, n in zip(seq, sizes):
        if current and used + n > budget:
            runs.append(current)
            current, used = [], 0
        current.append(x)
        used += n
    return runs + [current] if current else runs


class BatchPlan:
    """Item indices of each global micro-batch: epochs follow each other, each reshuffled, and
    each is cut into micro-batches either by count (`batch_size` examples) or, when `max_tokens`
    is set, by token budget (consecutive examples while their tokens fit; an example over the
    budget goes alone).

    A pure function of its arguments, so a resumed run sees exactly the batches it would have."""

    def __init__(self, tokens: list, batch_size: int, max_tokens: int | None = None, seed: int = 0,
                 shuffle: bool = True):
        self.tokens, self.batch_size, self.max_tokens = list(tokens), batch_size, max_tokens
        self.seed, self.shuffle = seed, shuffle
        self._epochs = {}

    @property
    def over_budget(self) -> int:
        """Examples longer than the token budget (each is a micro-batch of its own)."""
        return sum(t > self.max_tokens for t in self.tokens) if self.max_tokens else 0

    def epoch(self, e: int) -> list:
        if e not in self._epochs:
            n = len(self.tokens)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e)).tolist()
            else:
                order = list(range(n))
            self._epochs = {e: self._cut(order)}  # one epoch kept: the loop walks forward
        return self._epochs[e]

    def _cut(self, order: list) -> list:
        if not self.max_tokens:
            return [order[j: j + self.batch_size] for j in range(0, len(order), self.batch_size)]
        return cut_by_budget(order, [self.tokens[i] for i in order], self.max_tokens)

    @property
    def per_epoch(self) -> int:
        """Micro-batches in the first epoch (by budget, later epochs may differ by a few)."""
        return len(self.epoch(0))

    def micro_batch(self, micro_step: int) -> list:
        e = 0
        while micro_step >= len(self.epoch(e)):
            micro_step -= len(self.epoch(e))
            e += 1
        return self.epoch(e)[micro_step]


def batch_plan(cfg: RunConfig, recipe, items: list, batch_size: int, shuffle: bool) -> BatchPlan:
    """The plan for `items` under the config's batch size or `train.max_tokens_per_batch`."""
    budget = cfg.train.max_tokens_per_batch
    tokens = [example_tokens(it, recipe.shares_prompts) for it in items] if budget else [0] * len(items)
    return BatchPlan(tokens, batch_size, budget, cfg.seed, shuffle)


def forward_pieces(items: list, budget: int | None, shared: bool) -> list:
    """Split one micro-batch's items into consecutive pieces of at most `budget` tokens (an example
    over the budget is a piece of its own); no budget: one piece."""
    if not budget:
        return [items]
    return cut_by_budget(items, [example_tokens(it, shared) for it in items], budget)


def total_steps(cfg: RunConfig, plan: BatchPlan, repeat: int = 1) -> int:
    """Optimizer steps of the run; `repeat`: steps taken on each batch (online iterations)."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * plan.per_epoch * repeat / t.grad_accum))


class _Meter:
    """Sums per-example metric tensors over micro-batches; syncs with the host once, at the end."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums.get(k, 0) + v.sum()
            self.counts[k] = self.counts.get(k, 0) + v.numel()

    def means(self) -> dict:
        return {k: float(self.sums[k]) / max(1, self.counts[k]) for k in self.sums}


def run_batches(recipe, model, batches: list, split: str, device, autocast, backward: bool,
                track_grads: list | None = None) -> tuple[dict, list, list]:
    """Loss (normalised over all `batches`) and mean metrics; backpropagates when asked.

    Also returns each batch's loss and, with `track_grads` (the trained parameters), the norm of
    the accumulated gradient after each batch: the first non-finite one names the batch that broke
    the step. Both stay on the device until read, so the normal path adds no host sync."""
    total_weight = sum(recipe.weight(b) for b in batches)
    meter, losses, norms = _Meter(), [], []
    for batch in batches:
        with autocast():
            loss, metrics = recipe.loss(model, batch.to(device), split)
        if backward:
            (loss / total_weight).backward()
        losses.append(loss.detach().float())
        grads = [p.grad for p in track_grads or () if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads) if grads else None)
        meter.add(metrics)
    out = meter.means()
    out["loss"] = float(sum(losses)) / max(1, total_weight) if losses else 0.0
    return out, [float(x) for x in losses], [None if n is None else float(n) for n in norms]


@torch.no_grad()
def evaluate(recipe, model, items: list, plan: BatchPlan, device, autocast) -> dict:
    was_training = model.training
    model.eval()
    batches = [recipe.collate([items[i] for i in idx]) for idx in plan.epoch(0)]
    out, _, _ = run_batches(recipe, model, batches, "eval", device, autocast, backward=False)
    model.train(was_training)
    return out


def _fingerprint(cfg: RunConfig) -> dict:
    """Identity of the initial model, keying the caches of its reference log-probs and samples."""
    fingerprint = model_fingerprint(resolve_model_path(cfg.model.name_or_path, cfg.cache_dir), cfg.model.revision)
    fingerprint["lora"] = cfg.lora.enabled  # adapters start at zero, but keep the key honest
    return fingerprint


def _attach_references(recipe, cfg: RunConfig, model, data, device, autocast) -> None:
    if not recipe.needs_reference:
        return
    if cfg.reference == "live":
        live = LiveReference(model)
        recipe.references = {"train": live, "eval": live}
        return
    common = dict(cache_dir=reference_cache_dir(cfg), fingerprint=_fingerprint(cfg), precision=resolve_precision(cfg, device),
                  batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                  chunk_size=cfg.train.logprob_chunk_size, device=device, autocast=autocast)
    recipe.references = {"train": CachedReference(cached_ref_logps(
        model, data.train, recipe.collate, desc="reference log-probs (train)", **common))}
    if data.eval:
        recipe.references["eval"] = CachedReference(cached_ref_logps(
            model, data.eval, recipe.collate, desc="reference log-probs (eval)", **common))


def setup(cfg: RunConfig, progress: bool = True):
    """Load tokenizer, data, model and references; returns (recipe, data, model, device, autocast)."""
    set_seed(cfg.seed)
    device = resolve_device(cfg.model.device)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    recipe = make_recipe(cfg, tokenizer)
    data = recipe.prepare()
    for note in data.notes:
        print(f"alignkit: {note}", flush=True)
    if not data.train:
        raise ConfigError("no training examples left after loading and splitting; check `data.train`.")
    model = load_model(cfg.model, device=device, cache_dir=cfg.cache_dir,
                       reward_names=getattr(recipe, "reward_names", None), pad_token_id=tokenizer.pad_token_id)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    autocast = autocast_for(cfg, device)
    if hasattr(recipe, "prepare_with_model"):  # data that needs the model, e.g. D2O's own samples
        data = recipe.prepare_with_model(model, data, _fingerprint(cfg), progress)
        for note in data.notes:
            print(f"alignkit: {note}", flush=True)
    _attach_references(recipe, cfg, model, data, device, autocast)
    return tokenizer, recipe, data, model, device, autocast


class TrainingError(AlignkitError):
    """Training cannot go on (a non-finite loss or gradient under `train.on_nonfinite: stop`)."""


# Keys that change how a run reports and saves, not what it computes: a resume may change them.
RESUME_SAFE_KEYS = {"output_dir", "cache_dir", "train.tensorboard", "train.log_every", "train.save_every",
                    "train.keep_checkpoints", "train.eval_every"}


def check_output_dir(run_dir: Path) -> None:
    """Fail before any expensive work if the run directory cannot be created or written."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "output_dir" if parent == run_dir else f"output_dir's parent {parent}"
                raise ConfigError(f"{what} `{parent}` is a file, not a directory; set `output_dir` to a new or "
                                  "existing directory.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"`output_dir` {run_dir}: {parent} is not writable; choose a directory you can "
                                  "write to.")
            break


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _with_loss_defaults(cfg: RunConfig) -> dict:
    """The config as a dict, each loss spelled out with its default parameters (`loss: {name:
    dpo}` and `loss: {name: dpo, beta: 0.1}` are the same setting)."""
    def spelled_out(term: dict) -> dict:
        try:
            rest = {k: v for k, v in term.items() if k != "weight"}
            spec, params = losses.resolve(rest)
        except (ConfigError, KeyError, TypeError):  # invalid: compared as written (the recipe reports it)
            return term
        return {**term, **params}

    d = to_dict(cfg)
    d["loss"] = spelled_out(d["loss"])
    d["losses"] = [spelled_out(t) if isinstance(t, dict) else t for t in d["losses"]]
    return d


def config_changes(old: RunConfig, new: RunConfig) -> dict:
    """{key: (old, new)} for every setting that differs and changes what the run computes."""
    a, b = _flat(_with_loss_defaults(old)), _flat(_with_loss_defaults(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUME_SAFE_KEYS}


@dataclass
class _Resume:
    path: Path
    saved: dict  # trainer_state.pt
    changes: dict  # {key: (old, new)} accepted with --allow-config-change


def _prepare_resume(cfg: RunConfig, run_dir: Path, resume_from: str | None, allow_change: bool) -> _Resume | None:
    """Pick and check the checkpoint, its config and its trainer state, before any model loads."""
    point = ckpt.find_resume_point(run_dir, resume_from)
    for note in point.notes:
        print(f"alignkit: {note}", flush=True)
    if point.path is None:
        return None
    saved_cfg_file = point.path / "alignkit_config.yaml"
    try:
        saved_cfg = load_config(str(saved_cfg_file))
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{saved_cfg_file}: the checkpoint's config cannot be read: {e}") from None
    changes = config_changes(saved_cfg, cfg)
    if changes and not allow_change:
        listed = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ConfigError(
            f"the config differs from the one {point.path} was trained with:\n{listed}\n"
            "A resumed run continues the same run, so these would silently mix two settings. Undo the changes, "
            "start a new run in another output_dir, or pass --allow-config-change to apply them from step "
            f"{ckpt.checkpoint_step(point.path)} on (recorded in {run_dir / 'config_changes.jsonl'}).")
    return _Resume(point.path, ckpt.load_trainer_state(point.path), changes)


def _finished(run_dir: Path, resume: _Resume) -> RunResult | None:
    """The result of a run that already ended (resuming it has nothing to do), else None."""
    state = resume.saved["state"]
    summary_file = run_dir / "summary.json"
    if resume.changes or state["step"] < state["total_steps"] or not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    print(f"alignkit: {run_dir} already finished at step {state['step']} of {state['total_steps']}; nothing to "
          f"resume (final model in {run_dir / 'final'}). To train longer, raise train.max_steps and pass "
          "--allow-config-change.", flush=True)
    return RunResult(run_dir, run_dir / "final", state["step"], summary.get("train") or {}, summary.get("eval") or {})


def data_fingerprint(items: list) -> str:
    """Hash of the tokenized training examples: a resume must see the data it was trained on."""
    h = hashlib.sha256()
    for it in items:
        h.update(repr(it).encode())
    return h.hexdigest()[:24]


def _record_changes(run_dir: Path, resume: _Resume, step: int) -> None:
    row = {"step": step, "resumed_from": resume.path.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "changes": {k: {"from": old, "to": new} for k, (old, new) in resume.changes.items()}}
    with open(run_dir / "config_changes.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in resume.changes.items())
    print(f"alignkit: --allow-config-change: from step {step} on, {listed} (recorded in config_changes.jsonl)",
          flush=True)


def apply_hyperparameters(optimizer, scheduler, cfg: RunConfig, step: int, steps: int, warmup: int) -> None:
    """Set the optimizer's hyper-parameters and the schedule from `cfg` at `step` (after loading a
    checkpoint's optimizer and scheduler state, which carry the values they were saved with)."""
    t = cfg.train
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = t.weight_decay, 0.0
    scheduler.base_lrs = [t.learning_rate] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["betas"] = tuple(t.adam_betas)
        group["initial_lr"] = t.learning_rate
        group["lr"] = t.learning_rate * lr_factor(step, steps, warmup, t.lr_schedule)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, resume_from: str | None = None,
          allow_config_change: bool = False) -> RunResult:
    """Run a training job described by `cfg`; see the README for the run directory's layout.

    `resume`: continue from the latest checkpoint; `resume_from`: from that checkpoint (a name
    such as `checkpoint-40`, or a path); `allow_config_change`: accept settings that differ from
    the checkpoint's, apply them from there on and record them in `config_changes.jsonl`."""
    run_dir = Path(cfg.output_dir)
    check_output_dir(run_dir)
    resumed = None
    if resume or resume_from:
        resumed = _prepare_resume(cfg, run_dir, resume_from, allow_config_change)
        done = _finished(run_dir, resumed) if resumed else None
        if done is not None:
            return done
    else:
        for note in ckpt.clean_leftovers(run_dir):
            print(f"alignkit: {note}", flush=True)
    tokenizer, recipe, data, model, device, autocast = setup(cfg, progress)
    model.train()
    optimizer = build_optimizer(model, cfg)
    plan = batch_plan(cfg, recipe, data.train, cfg.train.batch_size, cfg.train.shuffle)
    if plan.over_budget:
        print(f"alignkit: {plan.over_budget} training examples are longer than train.max_tokens_per_batch="
              f"{cfg.train.max_tokens_per_batch}; each goes in a micro-batch of its own", flush=True)
    steps = total_steps(cfg, plan, getattr(recipe, "iterations", 1))
    warmup = int(cfg.train.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, cfg.train.lr_schedule))
    fingerprint = data_fingerprint(data.train)
    state = {"step": 0, "micro_step": 0, "total_steps": steps, "data_fingerprint": fingerprint, "skipped_steps": 0}
    if resumed is not None:
        saved = resumed.saved
        if saved["state"].get("data_fingerprint") != fingerprint and not allow_config_change:
            raise ConfigError(f"the training data differ from the data {resumed.path} was trained on (same config, "
                              "other examples or tokens). Restore the data, start a new run in another output_dir, or "
                              "pass --allow-config-change to go on with these data.")
        ckpt.load_weights(model, resumed.path)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {**state, **saved["state"], "total_steps": steps, "data_fingerprint": fingerprint}
        apply_hyperparameters(optimizer, scheduler, cfg, state["step"], steps, warmup)
        ckpt.set_rng_state(saved["rng"])
        if "recipe" in saved and hasattr(recipe, "load_state_dict"):
            recipe.load_state_dict(saved["recipe"])
        print(f"alignkit: resumed from {resumed.path} at step {state['step']}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed is not None and resumed.changes:
        _record_changes(run_dir, resumed, state["step"])
    save_config(cfg, run_dir / "config.yaml")
    write_heldout_record(cfg, data, run_dir)  # which examples eval --run must evaluate
    logger = MetricsLogger(run_dir, cfg.train.tensorboard, resume_step=state["step"] if resumed else None)
    result = RunResult(run_dir, run_dir / "final", steps)
    try:
        _loop(cfg, recipe, data, plan, model, tokenizer, optimizer, scheduler, state, logger, result,
              device, autocast, progress)
    finally:
        logger.close()
    return result


def _trainer_state(state: dict, recipe, optimizer, scheduler) -> dict:
    out = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": dict(state)}
    if hasattr(recipe, "state_dict"):
        out["recipe"] = recipe.state_dict()
    return out


def nonfinite_params(model) -> list[str]:
    """Names of trainable parameters holding NaN or inf (never written to a checkpoint)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def _save(cfg, result, step, model, tokenizer, recipe, optimizer, scheduler, state, final: bool = False) -> None:
    bad = nonfinite_params(model)
    if bad:  # the step checks should make this impossible; never write such weights anyway
        raise TrainingError(f"parameters {', '.join(bad[:5])} hold NaN or inf at step {step}; nothing was saved.")
    ckpt.save_checkpoint(result.run_dir, step, model, tokenizer, cfg,
                         _trainer_state(state, recipe, optimizer, scheduler), cfg.train.keep_checkpoints)
    if final:
        ckpt.atomic_dir(result.final_dir, lambda tmp: ckpt.save_model_dir(tmp, model, tokenizer, cfg, merge_lora=True))


def _offenders(cfg, data, batch_items: list, losses: list, norms: list) -> tuple[int, str]:
    """(index of the first micro-batch whose loss or accumulated gradient went non-finite, what)."""
    for a, (loss, norm) in enumerate(zip(losses, norms)):
        if not math.isfinite(loss):
            return a, f"its loss is {loss}"
        if norm is not None and not math.isfinite(norm):
            return a, f"the gradient after it is {norm}"
    return len(batch_items) - 1, "the gradient norm over the step is not finite"


def _nonfinite_report(cfg, data, step, metrics, batch_items, losses, norms) -> str:
    a, why = _offenders(cfg, data, batch_items, losses, norms)
    sources = data.sources_of("train", batch_items[a])
    shown = ", ".join(sources[:20]) + (f" and {len(sources) - 20} more" if len(sources) > 20 else "")
    return (f"step {step}: the loss or gradient is not finite (loss {metrics['loss']}, grad_norm "
            f"{metrics['grad_norm']}). Micro-batch {a + 1} of {len(batch_items)} is the first where it shows "
            f"({why}); its examples: {shown}.")


def _loop(cfg, recipe, data, plan, model, tokenizer, optimizer, scheduler, state, logger, result, device,
          autocast, progress):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    eval_plan = batch_plan(cfg, recipe, data.eval, t.eval_batch_size or t.batch_size, shuffle=False)
    # Online recipes sample their batches (`rollout`), reuse each for `iterations` steps, and are
    # evaluated by the reward of their own held-out completions, from step 0 on.
    repeat = getattr(recipe, "iterations", 1)
    run_eval = (lambda: recipe.evaluate(model, data.eval)) if hasattr(recipe, "evaluate") else (
        lambda: evaluate(recipe, model, data.eval, eval_plan, device, autocast))
    if hasattr(recipe, "evaluate") and data.eval and state["step"] == 0:
        logger.log(0, run_eval(), split="eval")
    bar = tqdm(total=state["total_steps"], initial=state["step"], desc=f"train {recipe.name}",
               unit="step", disable=not progress, dynamic_ncols=True)
    while state["step"] < state["total_steps"]:
        start = time.perf_counter()
        batches, batch_items = [], []
        for a in range(t.grad_accum):
            key = (state["step"] // repeat) * t.grad_accum + a  # = micro_step when repeat is 1
            items = [data.train[i] for i in plan.micro_batch(key)]
            batch_items.append(items)
            if hasattr(recipe, "rollout"):
                batches.append(recipe.rollout(model, items, key))
            else:  # the loss is normalised over all pieces of the step, so splitting leaves it unchanged
                batches += [recipe.collate(p) for p in forward_pieces(items, t.forward_tokens, recipe.shares_prompts)]
            state["micro_step"] += 1
        metrics, losses, norms = run_batches(recipe, model, batches, "train", device, autocast, backward=True,
                                             track_grads=params if t.grad_accum > 1 else None)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        metrics["lr"] = scheduler.get_last_lr()[0]
        step = state["step"] + 1
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        metrics["grad_norm"] = grad_norm
        if finite:
            optimizer.step()
        else:
            # Pieces of a micro-batch share its examples: map losses per piece back to micro-batches.
            per_mb = _per_micro_batch(losses, norms, batches, batch_items, hasattr(recipe, "rollout"),
                                      t.forward_tokens, recipe.shares_prompts)
            report = _nonfinite_report(cfg, data, step, metrics, batch_items, *per_mb)
            if t.on_nonfinite == "stop":
                optimizer.zero_grad(set_to_none=True)
                logger.log(step, {**metrics, "nonfinite": 1})
                _write_summary(result.run_dir, state["step"], result, status="stopped_nonfinite", message=report)
                bar.close()
                last = ckpt.list_checkpoints(result.run_dir)
                kept = (f"the last checkpoint, {last[-1].name}, is kept as it was" if last else
                        "no checkpoint had been written yet")
                raise TrainingError(
                    f"train.on_nonfinite=stop: {report} No update was applied and no weights were written; {kept}. "
                    "Lower train.learning_rate or check those examples; train.on_nonfinite=skip_step skips such "
                    "steps instead.")
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            metrics["skipped"] = 1
            print(f"alignkit: skipped the update of {report}", flush=True)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        elapsed = time.perf_counter() - start
        tokens = sum(b.num_sequence_tokens for b in batches)
        metrics.update(tokens=tokens, tokens_per_s=tokens / elapsed,
                       tokens_computed=sum(b.num_tokens for b in batches), step_time_s=elapsed)
        if "time/generation_s" in metrics:  # online: the share of the step spent sampling
            metrics["time/generation_s"] *= len(batches)  # the meter averaged it over micro-batches
            metrics["time/generation_fraction"] = metrics["time/generation_s"] / elapsed
        if step % t.log_every == 0 or step == state["total_steps"] or not finite:
            logger.log(step, metrics)
            result.train_metrics = metrics
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "rewards/accuracies", "accuracy") if k in metrics})
        bar.update(1)
        last = step == state["total_steps"]
        if data.eval and ((t.eval_every and step % t.eval_every == 0) or last):
            result.eval_metrics = run_eval()
            logger.log(step, result.eval_metrics, split="eval")
        if (t.save_every and step % t.save_every == 0) and not last:
            _save(cfg, result, step, model, tokenizer, recipe, optimizer, scheduler, state)
    bar.close()
    if not result.train_metrics:  # resumed at the last step: report what was logged before
        rows = read_metrics(result.run_dir)
        result.train_metrics = next((r for r in reversed(rows) if r["split"] == "train"), {})
        result.eval_metrics = next((r for r in reversed(rows) if r["split"] == "eval"), {})
    _save(cfg, result, state["step"], model, tokenizer, recipe, optimizer, scheduler, state, final=True)
    _write_summary(result.run_dir, state["step"], result, status="finished",
                   skipped_steps=state.get("skipped_steps", 0))
    print(f"alignkit: done after {state['step']} steps; final model in {result.final_dir}", flush=True)
    from alignkit.report import build_report

    print(f"alignkit: report in {build_report(result.run_dir)} (add evaluation with `alignkit eval --run "
          f"{result.run_dir}`)", flush=True)


def _per_micro_batch(losses, norms, batches, batch_items, online: bool, forward_tokens, shared) -> tuple[list, list]:
    """Per-piece losses and gradient norms -> per micro-batch (a micro-batch may run in pieces)."""
    if online or len(batches) == len(batch_items):
        return losses, norms
    out_l, out_n, i = [], [], 0
    for items in batch_items:
        k = len(forward_pieces(items, forward_tokens, shared))
        out_l.append(sum(losses[i: i + k]))
        out_n.append(norms[i + k - 1])
        i += k
    return out_l, out_n


def _write_summary(run_dir: Path, steps: int, result: RunResult, status: str, **extra) -> None:
    summary = {"status": status, "steps": steps, **extra, "train": result.train_metrics, "eval": result.eval_metrics}
    jsonfile.write_atomic(run_dir / "summary.json", summary)
