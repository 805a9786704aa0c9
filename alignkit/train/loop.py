"""The one training loop: plain PyTorch, any recipe.

records -> examples -> batches -> log-probs -> loss -> AdamW step -> metrics. The loop knows
micro-batches, accumulation, schedules, checkpoints and logging; the recipe knows the method.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit.config import RunConfig, save_config
from alignkit.data.batching import example_tokens
from alignkit.errors import ConfigError
from alignkit.models import (apply_lora, bf16_supported, disable_dropout, load_model, load_tokenizer,
                             resolve_device, resolve_model_path)
from alignkit.train import checkpoint as ckpt
from alignkit.train.metrics import MetricsLogger
from alignkit.train.recipes import make_recipe, reference_cache_dir
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


def run_batches(recipe, model, batches: list, split: str, device, autocast, backward: bool) -> dict:
    """Loss (normalised over all `batches`) and mean metrics; backpropagates when asked."""
    total_weight = sum(recipe.weight(b) for b in batches)
    meter, loss_sum = _Meter(), 0.0
    for batch in batches:
        with autocast():
            loss, metrics = recipe.loss(model, batch.to(device), split)
        if backward:
            (loss / total_weight).backward()
        loss_sum = loss_sum + loss.detach().float()
        meter.add(metrics)
    out = meter.means()
    out["loss"] = float(loss_sum) / max(1, total_weight)
    return out


@torch.no_grad()
def evaluate(recipe, model, items: list, plan: BatchPlan, device, autocast) -> dict:
    was_training = model.training
    model.eval()
    batches = [recipe.collate([items[i] for i in idx]) for idx in plan.epoch(0)]
    out = run_batches(recipe, model, batches, "eval", device, autocast, backward=False)
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


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> RunResult:
    """Run a training job described by `cfg`; see the README for the run directory's layout."""
    run_dir = Path(cfg.output_dir)
    resume_from = ckpt.latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        print(f"alignkit: --resume: no checkpoint in {run_dir}; starting from scratch", flush=True)
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
    state = {"step": 0, "micro_step": 0, "total_steps": steps}
    if resume_from is not None:
        saved = ckpt.load_trainer_state(resume_from)
        ckpt.load_weights(model, resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ckpt.set_rng_state(saved["rng"])
        state = saved["state"]
        if "recipe" in state and hasattr(recipe, "load_state_dict"):
            recipe.load_state_dict(state["recipe"])
        print(f"alignkit: resumed from {resume_from} at step {state['step']}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg.train.tensorboard, resume_step=state["step"] if resume_from else None)
    result = RunResult(run_dir, run_dir / "final", steps)
    try:
        _loop(cfg, recipe, data, plan, model, tokenizer, optimizer, scheduler, state, logger, result,
              device, autocast, progress)
    finally:
        logger.close()
    return result


def _full_state(state: dict, recipe) -> dict:
    full = dict(state)
    if hasattr(recipe, "state_dict"):
        full["recipe"] = recipe.state_dict()
    return full


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
        batches = []
        for a in range(t.grad_accum):
            key = (state["step"] // repeat) * t.grad_accum + a  # = micro_step when repeat is 1
            items = [data.train[i] for i in plan.micro_batch(key)]
            if hasattr(recipe, "rollout"):
                batches.append(recipe.rollout(model, items, key))
            else:  # the loss is normalised over all pieces of the step, so splitting leaves it unchanged
                batches += [recipe.collate(p) for p in forward_pieces(items, t.forward_tokens, recipe.shares_prompts)]
            state["micro_step"] += 1
        metrics = run_batches(recipe, model, batches, "train", device, autocast, backward=True)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        metrics["lr"] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        elapsed = time.perf_counter() - start
        tokens = sum(b.num_sequence_tokens for b in batches)
        metrics.update(grad_norm=float(grad_norm), tokens=tokens, tokens_per_s=tokens / elapsed,
                       tokens_computed=sum(b.num_tokens for b in batches), step_time_s=elapsed)
        if "time/generation_s" in metrics:  # online: the share of the step spent sampling
            metrics["time/generation_s"] *= len(batches)  # the meter averaged it over micro-batches
            metrics["time/generation_fraction"] = metrics["time/generation_s"] / elapsed
        step = state["step"]
        if step % t.log_every == 0 or step == state["total_steps"]:
            logger.log(step, metrics)
            result.train_metrics = metrics
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "rewards/accuracies", "accuracy") if k in metrics})
        bar.update(1)
        last = step == state["total_steps"]
        if data.eval and ((t.eval_every and step % t.eval_every == 0) or last):
            result.eval_metrics = run_eval()
            logger.log(step, result.eval_metrics, split="eval")
        if (t.save_every and step % t.save_every == 0) and not last:
            ckpt.save_checkpoint(result.run_dir, step, model, tokenizer, cfg, optimizer, scheduler,
                                 _full_state(state, recipe), t.keep_checkpoints)
    bar.close()
    ckpt.save_checkpoint(result.run_dir, state["step"], model, tokenizer, cfg, optimizer, scheduler,
                         _full_state(state, recipe), t.keep_checkpoints)
    ckpt.atomic_dir(result.final_dir, lambda tmp: ckpt.save_model_dir(tmp, model, tokenizer, cfg, merge_lora=True))
    summary = {"steps": state["step"], "train": result.train_metrics, "eval": result.eval_metrics}
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"alignkit: done after {state['step']} steps; final model in {result.final_dir}", flush=True)
    from alignkit.report import build_report

    print(f"alignkit: report in {build_report(result.run_dir)} (add evaluation with `alignkit eval --run "
          f"{result.run_dir}`)", flush=True)
