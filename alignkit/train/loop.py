"""The one training loop: plain PyTorch, any recipe, one or more trained modules.

records -> examples -> batches -> log-probs -> loss -> AdamW steps -> metrics. The loop knows
micro-batches, accumulation, schedules, checkpoints and logging; the recipe knows the method and
is reached only through the hooks of `alignkit.train.base.Recipe` (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import jsonfile
from alignkit.config import RunConfig, save_config
from alignkit.data.heldout import write_record
from alignkit.errors import AlignkitError, ConfigError
from alignkit.logprob_passes import model_fingerprint
from alignkit.models import (apply_lora, bf16_supported, cache_root, disable_dropout, load_model, load_tokenizer,
                             resolve_device, resolve_model_path)
from alignkit.train import checkpoint as ckpt
from alignkit.train import registry
from alignkit.train.base import OptimSettings, SetupContext
from alignkit.train.metrics import MetricsLogger, read_metrics
from alignkit.train.modules import TrainedModule
from alignkit.train.resume import Resume, check_output_dir, data_fingerprint, finished_summary, prepare_resume
from alignkit.train.steps import batch_plan, run_batches, total_steps


class TrainingError(AlignkitError):
    """Training cannot go on (a non-finite loss or gradient under `train.on_nonfinite: stop`)."""


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    train_metrics: dict = field(default_factory=dict)  # the last logged step
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation


@dataclass
class Session:
    """What `setup` builds: everything a run needs before its first step."""

    tokenizer: object
    recipe: object
    data: object  # PreparedData
    model: torch.nn.Module
    device: torch.device
    autocast: object
    ctx: SetupContext


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


def initial_fingerprint(cfg: RunConfig) -> dict:
    """Identity of the initial model, keying the caches of its reference log-probs and samples."""
    fingerprint = model_fingerprint(resolve_model_path(cfg.model.name_or_path, cfg.cache_dir), cfg.model.revision)
    fingerprint["lora"] = cfg.lora.enabled  # adapters start at zero, but keep the key honest
    return fingerprint


def _show(notes) -> None:
    for note in notes:
        print(f"alignkit: {note}", flush=True)


def setup(cfg: RunConfig, progress: bool = True) -> Session:
    """Load tokenizer, data, model and everything the recipe derives from the model."""
    set_seed(cfg.seed)
    device = resolve_device(cfg.model.device)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    spec = registry.get(cfg.recipe)
    recipe = spec.load()(cfg, tokenizer)
    data = recipe.prepare()
    _show(data.notes)
    if not data.train:
        raise ConfigError("no training examples left after loading and splitting; check `data.train`.")
    model = load_model(cfg.model, device=device, cache_dir=cfg.cache_dir, pad_token_id=tokenizer.pad_token_id,
                       reward_names=cfg.reward.objectives if spec.model_kind == "reward_model" else None)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    autocast = autocast_for(cfg, device)
    ctx = SetupContext(device, autocast, resolve_precision(cfg, device), initial_fingerprint(cfg),
                       cache_root(cfg.cache_dir), progress)
    prepared = recipe.setup(model, data, ctx)
    _show(prepared.notes)
    return Session(tokenizer, recipe, prepared, model, device, autocast, ctx)


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
        resumed = prepare_resume(cfg, run_dir, resume_from, allow_config_change)
        summary = finished_summary(run_dir, resumed) if resumed else None
        if summary is not None:
            return RunResult(run_dir, run_dir / "final", summary["steps"], summary.get("train") or {},
                             summary.get("eval") or {})
    else:
        _show(ckpt.clean_leftovers(run_dir))
    s = setup(cfg, progress)
    s.model.train()
    plan = batch_plan(cfg, s.recipe, s.data.train, cfg.train.batch_size, cfg.train.shuffle)
    if plan.over_budget:
        print(f"alignkit: {plan.over_budget} training examples are longer than train.max_tokens_per_batch="
              f"{cfg.train.max_tokens_per_batch}; each goes in a micro-batch of its own", flush=True)
    steps = total_steps(cfg, plan, s.recipe.iterations)
    modules = {"policy": TrainedModule.build("policy", s.model, OptimSettings.of_policy(cfg), steps, s.tokenizer)}
    for name, extra in s.recipe.extra_modules(s.model, s.ctx).items():
        modules[name] = TrainedModule.build(name, extra.model, extra.settings, steps, extra.tokenizer)
    fingerprint = data_fingerprint(s.data.train)
    state = {"step": 0, "micro_step": 0, "total_steps": steps, "data_fingerprint": fingerprint, "skipped_steps": 0}
    if resumed is not None:
        state = _restore(resumed, modules, s.recipe, state, fingerprint, steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed is not None:
        resumed.record_changes(run_dir, state["step"])
    save_config(cfg, run_dir / "config.yaml")
    write_record(cfg, s.data, run_dir)  # which examples eval --run must evaluate
    logger = MetricsLogger(run_dir, cfg.train.tensorboard, resume_step=state["step"] if resumed else None)
    result = RunResult(run_dir, run_dir / "final", steps)
    try:
        _loop(cfg, s, plan, modules, state, logger, result, progress)
    finally:
        logger.close()
    return result


def _restore(resumed: Resume, modules: dict, recipe, state: dict, fingerprint: str, steps: int) -> dict:
    saved = resumed.saved
    resumed.check_data(fingerprint)
    state = {**state, **saved["state"], "total_steps": steps, "data_fingerprint": fingerprint}
    for name, module in modules.items():
        ckpt.load_weights(module.model, resumed.path if name == "policy" else resumed.path / name)
        module.load_state_dict(saved["modules"][name], state["step"])
    ckpt.set_rng_state(saved["rng"])
    recipe.load_state_dict(saved["recipe"])
    print(f"alignkit: resumed from {resumed.path} at step {state['step']}", flush=True)
    return state


def nonfinite_params(model) -> list[str]:
    """Names of trainable parameters holding NaN or inf (never written to a checkpoint)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def _save(cfg, result, step, modules: dict, recipe, state, final: bool = False) -> None:
    for m in modules.values():
        bad = nonfinite_params(m.model)
        if bad:  # the step checks should make this impossible; never write such weights anyway
            raise TrainingError(f"{m.name} parameters {', '.join(bad[:5])} hold NaN or inf at step {step}; "
                                "nothing was saved.")
    policy = modules["policy"]
    trainer_state = {"modules": {name: m.state_dict() for name, m in modules.items()}, "state": dict(state),
                     "recipe": recipe.state_dict()}
    extras = {name: (m.model, m.tokenizer) for name, m in modules.items() if name != "policy"}
    ckpt.save_checkpoint(result.run_dir, step, policy.model, policy.tokenizer, cfg, trainer_state,
                         cfg.train.keep_checkpoints, extras=extras)
    if final:
        ckpt.atomic_dir(result.final_dir, lambda tmp: ckpt.save_model_dir(tmp, policy.model, policy.tokenizer, cfg,
                                                                         merge_lora=True))
        for name, (model, tokenizer) in extras.items():
            ckpt.atomic_dir(result.run_dir / f"final_{name}",
                            lambda tmp, m=model, t=tokenizer: ckpt.save_model_dir(tmp, m, t, cfg, merge_lora=True))


def _nonfinite_report(data, step, metrics, batch_items, losses, norms) -> str:
    """Which micro-batch of the step first went non-finite, and the sources of its examples."""
    a, why = len(batch_items) - 1, "the gradient norm over the step is not finite"
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        if not math.isfinite(loss):
            a, why = i, f"its loss is {loss}"
            break
        if norm is not None and not math.isfinite(norm):
            a, why = i, f"the gradient after it is {norm}"
            break
    sources = data.sources_of("train", batch_items[a])
    shown = ", ".join(sources[:20]) + (f" and {len(sources) - 20} more" if len(sources) > 20 else "")
    return (f"step {step}: the loss or gradient is not finite (loss {metrics['loss']}, grad_norm "
            f"{metrics['grad_norm']}). Micro-batch {a + 1} of {len(batch_items)} is the first where it shows "
            f"({why}); its examples: {shown}.")


def _loop(cfg, s: Session, plan, modules: dict, state, logger, result, progress):
    t, recipe, data = cfg.train, s.recipe, s.data
    policy = modules["policy"].model
    params = [p for m in modules.values() for p in m.params]
    repeat = recipe.iterations
    if recipe.evaluate_at_start and data.eval and state["step"] == 0:
        logger.log(0, recipe.evaluate(policy, data.eval), split="eval")
    bar = tqdm(total=state["total_steps"], initial=state["step"], desc=f"train {recipe.name}",
               unit="step", disable=not progress, dynamic_ncols=True)
    while state["step"] < state["total_steps"]:
        start = time.perf_counter()
        batches, batch_items, pieces = [], [], []
        for a in range(t.grad_accum):
            key = (state["step"] // repeat) * t.grad_accum + a  # = micro_step when repeat is 1
            items = [data.train[i] for i in plan.micro_batch(key)]
            made = recipe.batches(policy, items, key)
            batches += made
            batch_items.append(items)
            pieces.append(len(made))
            state["micro_step"] += 1
        metrics, losses, norms = run_batches(recipe, policy, batches, "train", s.device, s.autocast, backward=True,
                                             track_grads=params if len(batches) > 1 else None)
        norms_by_module = {name: m.clip() for name, m in modules.items()}
        metrics["lr"], metrics["grad_norm"] = modules["policy"].lr, norms_by_module["policy"]
        for name, m in modules.items():
            if name != "policy":
                metrics[f"lr/{name}"], metrics[f"grad_norm/{name}"] = m.lr, norms_by_module[name]
        step = state["step"] + 1
        finite = math.isfinite(metrics["loss"]) and all(math.isfinite(n) for n in norms_by_module.values())
        if not finite:
            loss_mb = [sum(losses[i: i + k]) for i, k in zip(_starts(pieces), pieces)]
            norm_mb = [norms[i + k - 1] for i, k in zip(_starts(pieces), pieces)]
            report = _nonfinite_report(data, step, metrics, batch_items, loss_mb, norm_mb)
            if t.on_nonfinite == "stop":
                for m in modules.values():
                    m.optimizer.zero_grad(set_to_none=True)
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
        for m in modules.values():
            m.step(apply=finite)
        recipe.step_done()
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
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "rewards/accuracies", "accuracy", "reward")
                             if k in metrics and metrics[k] is not None})
        bar.update(1)
        last = step == state["total_steps"]
        if data.eval and ((t.eval_every and step % t.eval_every == 0) or last):
            result.eval_metrics = recipe.evaluate(policy, data.eval)
            logger.log(step, result.eval_metrics, split="eval")
        if (t.save_every and step % t.save_every == 0) and not last:
            _save(cfg, result, step, modules, recipe, state)
    bar.close()
    if not result.train_metrics:  # resumed at the last step: report what was logged before
        rows = read_metrics(result.run_dir)
        result.train_metrics = next((r for r in reversed(rows) if r["split"] == "train"), {})
        result.eval_metrics = next((r for r in reversed(rows) if r["split"] == "eval"), {})
    _save(cfg, result, state["step"], modules, recipe, state, final=True)
    _write_summary(result.run_dir, state["step"], result, status="finished",
                   skipped_steps=state.get("skipped_steps", 0))
    print(f"alignkit: done after {state['step']} steps; final model in {result.final_dir}", flush=True)
    from alignkit.report import build_report

    print(f"alignkit: report in {build_report(result.run_dir)} (add evaluation with `alignkit eval --run "
          f"{result.run_dir}`)", flush=True)


def _starts(pieces: list) -> list:
    out, i = [], 0
    for k in pieces:
        out.append(i)
        i += k
    return out


def _write_summary(run_dir: Path, steps: int, result: RunResult, status: str, **extra) -> None:
    summary = {"status": status, "steps": steps, **extra, "train": result.train_metrics, "eval": result.eval_metrics}
    jsonfile.write_atomic(run_dir / "summary.json", summary)
