"""The one training loop: plain PyTorch, any recipe, one or more trained modules, one or many
processes.

records -> examples -> batches -> log-probs -> loss -> AdamW steps -> metrics. The loop knows
micro-batches, accumulation, schedules, checkpoints and logging; the recipe knows the method and
is reached only through the hooks of `alignkit.train.base.Recipe`; `alignkit.distributed` knows
the processes (docs/architecture.md).
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
from alignkit.distributed import Dist
from alignkit.errors import AlignkitError, ConfigError
from alignkit.logprob_passes import model_fingerprint
from alignkit.models import (apply_lora, bf16_supported, cache_root, disable_dropout, load_model, load_tokenizer,
                             resolve_device, resolve_model_path)
from alignkit.train import checkpoint as ckpt
from alignkit.train import registry
from alignkit.train.base import OptimSettings, SetupContext
from alignkit.train.health import Alert, HealthMonitor
from alignkit.train.metrics import MetricsLogger, NullLogger, read_metrics
from alignkit.train.model_card import write_model_card
from alignkit.train.modules import TrainedModule
from alignkit.train.resume import Resume, check_output_dir, data_fingerprint, finished_summary, prepare_resume
from alignkit.train.steps import batch_plan, run_batches, total_steps
from alignkit.train.trackers import check_installed as check_trackers_installed


class TrainingError(AlignkitError):
    """Training cannot go on (a non-finite loss or gradient under `train.on_nonfinite: stop`)."""


class HealthStop(TrainingError):
    """A health alert whose rule is in `train.stop_on` stopped the run, after a checkpoint at its step
    (`checkpoint`) and `summary.json` with status `stopped_by_health` were written; no `final/`."""

    def __init__(self, message: str, alert: Alert, checkpoint: Path):
        super().__init__(message)
        self.alert, self.checkpoint = alert, checkpoint


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    train_metrics: dict = field(default_factory=dict)  # the last logged step
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation
    timings: dict = field(default_factory=dict)  # seconds before the first step (summary.json "timings")


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
    timings: dict = field(default_factory=dict)  # load_s (tokenizer, data, model); setup_s (Recipe.setup)

    @property
    def dist(self) -> Dist:
        return self.ctx.dist


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that support it, fp32 elsewhere."""
    if cfg.train.precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return cfg.train.precision


def autocast_for(cfg: RunConfig, device: torch.device, dist: Dist | None = None):
    """A zero-argument context factory: bf16 autocast (fp32 master weights) or nothing. Under FSDP2
    mixed precision the parameters themselves are gathered in bf16, so there is no autocast."""
    if resolve_precision(cfg, device) == "bf16" and not (dist is not None and dist.mixed_precision):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def initial_fingerprint(cfg: RunConfig) -> dict:
    """Identity of the initial model, keying the caches of its reference log-probs and samples."""
    fingerprint = model_fingerprint(resolve_model_path(cfg.model.name_or_path, cfg.cache_dir), cfg.model.revision)
    fingerprint["lora"] = cfg.lora.enabled  # adapters start at zero, but keep the key honest
    return fingerprint


def start_dist(cfg: RunConfig) -> tuple[Dist, torch.device]:
    """This process's Dist (joining the process group torchrun set up, if any) and device."""
    device = Dist.local_device(resolve_device(cfg.model.device))
    return Dist.from_env(cfg.dist, device, resolve_precision(cfg, device)), device


def setup(cfg: RunConfig, progress: bool = True, dist: Dist | None = None) -> Session:
    """Load tokenizer, data, model and everything the recipe derives from the model (the model is
    not sharded yet: `train` does that)."""
    if dist is None:
        dist, device = start_dist(cfg)
    else:
        device = Dist.local_device(resolve_device(cfg.model.device))
    set_seed(cfg.seed)
    show = _printer(dist)
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    spec = registry.get(cfg.recipe)
    recipe = spec.load()(cfg, tokenizer)
    data = recipe.prepare()
    show(data.notes)
    if not data.train:
        raise ConfigError("no training examples left after loading and splitting; check `data.train`.")
    model = _load_policy(cfg, spec, tokenizer, device)
    autocast = autocast_for(cfg, device, dist)
    ctx = SetupContext(device, autocast, resolve_precision(cfg, device), initial_fingerprint(cfg),
                       cache_root(cfg.cache_dir), progress and dist.is_main, dist)
    loaded = time.perf_counter()
    # Recipe.setup: the cached reference pass (offline recipes), the sampler (online ones), ...
    prepared = recipe.setup(model, data, ctx)
    show(prepared.notes)
    timings = {"load_s": loaded - start, "setup_s": time.perf_counter() - loaded}
    return Session(tokenizer, recipe, prepared, model, device, autocast, ctx, timings)


def _load_policy(cfg: RunConfig, spec, tokenizer, device):
    model = load_model(cfg.model, device=device, cache_dir=cfg.cache_dir, pad_token_id=tokenizer.pad_token_id,
                       reward_names=cfg.reward.objectives if spec.model_kind == "reward_model" else None)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def _printer(dist: Dist):
    def show(notes) -> None:
        if dist.is_main:
            for note in notes:
                print(f"alignkit: {note}", flush=True)
    return show


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, resume_from: str | None = None,
          allow_config_change: bool = False) -> RunResult:
    """Run a training job described by `cfg`; see the README for the run directory's layout.

    `resume`: continue from the latest checkpoint; `resume_from`: from that checkpoint (a name
    such as `checkpoint-40`, or a path); `allow_config_change`: accept settings that differ from
    the checkpoint's, apply them from there on and record them in `config_changes.jsonl`. Under
    torchrun, every process runs this with the same config."""
    run_dir = Path(cfg.output_dir)
    dist, _ = start_dist(cfg)
    return _train(cfg, dist, run_dir, resume, progress, resume_from, allow_config_change)


def _train(cfg, dist: Dist, run_dir: Path, resume, progress, resume_from, allow_config_change) -> RunResult:
    show = _printer(dist)
    dist.on_main(lambda: check_output_dir(run_dir))
    dist.on_main(lambda: check_trackers_installed(cfg.train.report_to))  # before any model loads
    resumed = None
    if resume or resume_from:
        resumed = prepare_resume(cfg, run_dir, resume_from, allow_config_change, dist)
        summary = finished_summary(run_dir, resumed, quiet=not dist.is_main) if resumed else None
        if summary is not None:
            return RunResult(run_dir, run_dir / "final", summary["steps"], summary.get("train") or {},
                             summary.get("eval") or {})
    user_cfg = cfg  # what checkpoints record; `cfg` is what this run executes (see `_same_global_batch`)
    if resumed is not None:
        cfg = _same_global_batch(cfg, resumed, dist)
    else:
        show(dist.on_main(lambda: ckpt.clean_leftovers(run_dir)))
    if dist.enabled and cfg.train.forward_tokens:
        raise ConfigError("`train.forward_tokens` splits micro-batches into a number of pieces that differs between "
                          "processes, which sharded training cannot follow; unset it with more than one process "
                          "(`train.max_tokens_per_batch` bounds each process's micro-batch instead).")
    s = setup(cfg, progress, dist)
    s.model.train()
    plan = batch_plan(cfg, s.recipe, s.data.train, cfg.train.batch_size, cfg.train.shuffle)
    if plan.over_budget:
        show([f"{plan.over_budget} training examples are longer than train.max_tokens_per_batch="
              f"{cfg.train.max_tokens_per_batch}; each goes in a micro-batch of its own"])
    steps = total_steps(cfg, plan, s.recipe.iterations, dist.world_size)
    spec = registry.get(cfg.recipe)
    modules = {"policy": (s.model, OptimSettings.of_policy(cfg), s.tokenizer,
                          lambda: _load_policy(cfg, spec, s.tokenizer, torch.device("cpu")))}
    for name, extra in s.recipe.extra_modules(s.model, s.ctx).items():
        modules[name] = (extra.model, extra.settings, extra.tokenizer, extra.rebuild)
    sharded = resumed is not None and (resumed.path / "dcp").is_dir()
    if resumed is not None and not sharded:  # full weights load before sharding
        for name, (model, *_rest) in modules.items():
            ckpt.load_weights(model, resumed.path if name == "policy" else resumed.path / name)
    trained = {}
    for name, (model, settings, tokenizer, rebuild) in modules.items():
        shard = name != "policy" or s.recipe.shard_model
        wrapped = dist.wrap(model) if shard else model
        trained[name] = TrainedModule.build(name, wrapped, settings, steps, tokenizer, rebuild,
                                            sharded=shard and dist.strategy == "fsdp")
    fingerprint = data_fingerprint(s.data.train)
    state = {"step": 0, "micro_step": 0, "total_steps": steps, "data_fingerprint": fingerprint, "skipped_steps": 0,
             "world_size": dist.world_size, "global_accum": cfg.train.grad_accum * dist.world_size}
    if resumed is not None:
        state = _restore(resumed, trained, s.recipe, state, fingerprint, steps, dist, sharded)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed is not None:
            resumed.record_changes(run_dir, state["step"])
        save_config(user_cfg, run_dir / "config.yaml")
        write_record(cfg, s.data, run_dir)  # which examples eval --run must evaluate
    logger = MetricsLogger(run_dir, cfg.train.report_to, user_cfg,
                           resume_step=state["step"] if resumed else None) if dist.is_main else NullLogger()
    result = RunResult(run_dir, run_dir / "final", steps, timings=s.timings)
    try:
        _loop(cfg, s, plan, trained, state, logger, result, progress and dist.is_main, user_cfg)
    finally:
        logger.close()
    return result


def _same_global_batch(cfg: RunConfig, resumed: Resume, dist: Dist) -> RunConfig:
    """A checkpoint written by another number of processes resumes with the same global batch:
    `train.grad_accum` scales so that grad_accum x processes stays what it was. The micro-batches
    of each step are then the same examples as before (docs/architecture.md, "Batches")."""
    before = resumed.state.get("world_size", 1)
    total = resumed.state.get("global_accum", cfg.train.grad_accum * before)
    if "train.grad_accum" in resumed.changes:  # a new accumulation the user asked for
        total = cfg.train.grad_accum * dist.world_size
    if total == cfg.train.grad_accum * dist.world_size:
        return cfg
    if total % dist.world_size:
        raise ConfigError(
            f"{resumed.path} was written by {before} process(es): "
            f"{total} micro-batches of train.batch_size={cfg.train.batch_size} per step, which {dist.world_size} "
            f"processes cannot split evenly. Resume with a number of processes that divides {total}.")
    import dataclasses

    accum = total // dist.world_size
    _printer(dist)([f"{resumed.path} was written by {before} process(es); with {dist.world_size}, train.grad_accum "
                    f"becomes {accum} so that each step keeps its {total * cfg.train.batch_size} examples"])
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))


def _restore(resumed: Resume, modules: dict, recipe, state: dict, fingerprint: str, steps: int, dist: Dist,
             sharded: bool) -> dict:
    saved = resumed.saved
    resumed.check_data(fingerprint)
    state = {**state, **saved["state"], "total_steps": steps, "data_fingerprint": fingerprint,
             "world_size": dist.world_size, "global_accum": state["global_accum"]}
    if sharded:
        dist.load_sharded({name: (m.model, m.optimizer) for name, m in modules.items()}, resumed.path / "dcp")
    for name, module in modules.items():
        module.load_state_dict(saved["modules"][name], state["step"], dist)
    saved_ranks = saved["recipe"] if isinstance(saved["recipe"], list) else [saved["recipe"]]
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if len(saved_ranks) != dist.world_size and any(r.get("rollouts") for r in saved_ranks):
        raise ConfigError(f"{resumed.path} was written by {len(saved_ranks)} process(es) in the middle of an online "
                          f"rollout cycle; resume it with {len(saved_ranks)} process(es), or from a checkpoint taken "
                          "when a rollout's updates were done.")
    mine = dist.rank if len(saved_ranks) == dist.world_size else 0
    recipe.load_state_dict(saved_ranks[mine])
    ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
    _printer(dist)([f"resumed from {resumed.path} at step {state['step']}"
                    + (f" (written by {len(rngs)} processes, now {dist.world_size})" if len(rngs) != dist.world_size
                       else "")])
    return state


def _save(cfg, result, step, modules: dict, recipe, state, dist: Dist, final: bool = False) -> None:
    for m in modules.values():
        bad = dist.nonfinite_params(m.model)
        if bad:  # the step checks should make this impossible; never write such weights anyway
            raise TrainingError(f"{m.name} parameters {', '.join(bad[:5])} hold NaN or inf at step {step}; "
                                "nothing was saved.")
    sharded = dist.enabled
    module_states = {name: m.state_dict(dist, with_optimizer=not sharded) for name, m in modules.items()}
    trainer_state = {"modules": module_states, "state": dict(state),
                     "recipe": dist.gather_objects(recipe.state_dict()) if sharded else recipe.state_dict(),
                     "rng": dist.gather_objects(ckpt.rng_state()) if sharded else ckpt.rng_state()}

    def write_all(tmp: Path):  # every process: its shards of every module and optimizer
        if sharded:
            dist.save_sharded({name: {"model": dist.model_state(m.model, full=False),
                                      "optimizer": dist.optimizer_state(m.model, m.optimizer, full=False)}
                               for name, m in modules.items()}, tmp / "dcp")

    def write_main(tmp: Path):
        for name, m in modules.items():
            target = tmp if name == "policy" else tmp / name
            if sharded:  # weights are in dcp/; the directory still names the model and its tokenizer
                ckpt.save_model_config(target, m.model, m.tokenizer, cfg)
            else:
                ckpt.save_model_dir(target, m.model, m.tokenizer, cfg)
        ckpt.save_trainer_state(tmp, trainer_state)

    ckpt.save_checkpoint(result.run_dir, step, write_main, cfg.train.keep_checkpoints, dist, write_all=write_all)
    if final:
        _export(cfg, result, modules, dist)
        if dist.is_main:  # final/README.md: the Hugging Face model card
            write_model_card(result.final_dir, cfg, result.run_dir, step, result.train_metrics, result.eval_metrics,
                             dist.world_size, state["global_accum"] // dist.world_size)


def _export(cfg, result, modules: dict, dist: Dist) -> None:
    """`final/` (the policy) and `final_<name>/`: one consolidated directory each, LoRA merged."""
    for name, m in modules.items():
        target = result.final_dir if name == "policy" else result.run_dir / f"final_{name}"
        if not dist.enabled:
            ckpt.atomic_dir(target, lambda tmp, m=m: ckpt.save_model_dir(tmp, m.model, m.tokenizer, cfg, merge_lora=True))
            continue
        full = dist.model_state(m.model, full=True)  # every process takes part; the main one gets the tensors
        if dist.is_main:
            plain = m.rebuild()
            missing, unexpected = plain.load_state_dict(full, strict=False)
            assert not unexpected, unexpected
            ckpt.atomic_dir(target, lambda tmp, p=plain, t=m.tokenizer: ckpt.save_model_dir(tmp, p, t, cfg,
                                                                                          merge_lora=True))
        dist.barrier()


def _nonfinite_report(data, step, metrics, batch_items, losses, norms) -> tuple[int, str, list]:
    """(index of the micro-batch of this process that first went non-finite, why, its sources), or
    (-1, "", the last micro-batch's sources) when only the step's gradient norm shows it."""
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        if not math.isfinite(loss):
            return i, f"its loss is {loss}", data.sources_of("train", batch_items[i])
        if norm is not None and not math.isfinite(norm):
            return i, f"the gradient after it is {norm}", data.sources_of("train", batch_items[i])
    return -1, "", data.sources_of("train", batch_items[-1])


def _describe_nonfinite(step, metrics, found: list, micro_batches: int) -> str:
    """One message from every process's findings: the first process and micro-batch where it shows."""
    for rank, (a, why, sources) in enumerate(found):
        if a >= 0:
            where = f"Micro-batch {a + 1} of {micro_batches}" + (f" on process {rank}" if len(found) > 1 else "")
            break
    else:
        where, why = f"Micro-batch {micro_batches} of {micro_batches}", "the gradient norm over the step is not finite"
        sources = [src for _, _, srcs in found for src in srcs]
    shown = ", ".join(sources[:20]) + (f" and {len(sources) - 20} more" if len(sources) > 20 else "")
    return (f"step {step}: the loss or gradient is not finite (loss {metrics['loss']}, grad_norm "
            f"{metrics['grad_norm']}). {where} is the first where it shows ({why}); its examples: {shown}.")


def _starts(pieces: list) -> list:
    out, i = [], 0
    for k in pieces:
        out.append(i)
        i += k
    return out


def _loop(cfg, s: Session, plan, modules: dict, state, logger, result, progress, user_cfg=None):
    """Train until `total_steps`. `cfg` is what runs; `user_cfg` (default `cfg`) what checkpoints record."""
    user_cfg = user_cfg or cfg
    t, recipe, data, dist = cfg.train, s.recipe, s.data, s.dist
    policy = modules["policy"].model
    params = [p for m in modules.values() for p in m.params]
    repeat = recipe.iterations
    monitor, stops = HealthMonitor.for_run(cfg, state.get("health")), []  # every process: all stop together
    if recipe.evaluate_at_start and data.eval and state["step"] == 0:
        at_start = recipe.evaluate(policy, data.eval)
        logger.log(0, at_start, split="eval")
        stops += _check_health(monitor, logger, dist, state, 0, at_start, "eval", t.stop_on)
    bar = tqdm(total=state["total_steps"], initial=state["step"], desc=f"train {recipe.name}",
               unit="step", disable=not progress, dynamic_ncols=True)
    while state["step"] < state["total_steps"] and not stops:
        start = time.perf_counter()
        batches, batch_items, pieces = [], [], []
        for a in range(t.grad_accum):
            key = (state["step"] // repeat) * t.grad_accum + a  # = micro_step when repeat is 1
            # the global micro-batch `key` is the world_size per-process micro-batches key * world + rank
            items = [data.train[i] for i in plan.micro_batch(key * dist.world_size + dist.rank)]
            made = recipe.batches(policy, items, key)
            batches += made
            batch_items.append(items)
            pieces.append(len(made))
            state["micro_step"] += 1
        metrics, losses, norms = run_batches(recipe, policy, batches, "train", s.device, s.autocast, backward=True,
                                             track_grads=params if len(batches) > 1 else None, dist=dist)
        for m in modules.values():  # replicated modules (ddp, or a head trained alone): average their gradients
            if not m.sharded:
                dist.average_grads(m.params)
        norms_by_module = {name: m.clip(dist) for name, m in modules.items()}
        metrics["lr"], metrics["grad_norm"] = modules["policy"].lr, norms_by_module["policy"]
        for name, m in modules.items():
            if name != "policy":
                metrics[f"lr/{name}"], metrics[f"grad_norm/{name}"] = m.lr, norms_by_module[name]
        step = state["step"] + 1
        finite = math.isfinite(metrics["loss"]) and all(math.isfinite(n) for n in norms_by_module.values())
        if not finite:
            loss_mb = [sum(losses[i: i + k]) for i, k in zip(_starts(pieces), pieces)]
            norm_mb = [norms[i + k - 1] for i, k in zip(_starts(pieces), pieces)]
            found = dist.gather_objects(_nonfinite_report(data, step, metrics, batch_items, loss_mb, norm_mb))
            report = _describe_nonfinite(step, metrics, found, len(batch_items))
            if t.on_nonfinite == "stop":
                for m in modules.values():
                    m.optimizer.zero_grad(set_to_none=True)
                logger.log(step, {**metrics, "nonfinite": 1})
                if dist.is_main:
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
            if dist.is_main:
                print(f"alignkit: skipped the update of {report}", flush=True)
        for m in modules.values():
            m.step(apply=finite)
        recipe.step_done()
        state["step"] = step
        elapsed = time.perf_counter() - start
        counts = dist.all_sum(torch.tensor([float(sum(b.num_sequence_tokens for b in batches)),
                                            float(sum(b.num_tokens for b in batches))], dtype=torch.float64))
        metrics.update(tokens=int(counts[0]), tokens_per_s=float(counts[0]) / elapsed,
                       tokens_computed=int(counts[1]), step_time_s=elapsed)
        if "time/generation_s" in metrics:  # online: the share of the step spent sampling
            metrics["time/generation_s"] *= len(batches)  # the meter averaged it over micro-batches
            metrics["time/generation_fraction"] = metrics["time/generation_s"] / elapsed
        if step % t.log_every == 0 or step == state["total_steps"] or not finite:
            logger.log(step, metrics)
            stops += _check_health(monitor, logger, dist, state, step, metrics, "train", t.stop_on)
            result.train_metrics = metrics
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "rewards/accuracies", "accuracy", "reward")
                             if k in metrics and metrics[k] is not None})
        bar.update(1)
        last = step == state["total_steps"]
        if data.eval and ((t.eval_every and step % t.eval_every == 0) or last):
            result.eval_metrics = recipe.evaluate(policy, data.eval)
            logger.log(step, result.eval_metrics, split="eval")
            stops += _check_health(monitor, logger, dist, state, step, result.eval_metrics, "eval", t.stop_on)
        if (t.save_every and step % t.save_every == 0) and not last and not stops:
            _save(user_cfg, result, step, modules, recipe, state, dist)
    bar.close()
    if stops:
        _stop_for_health(user_cfg, result, modules, recipe, state, dist, logger, stops)
    if not result.train_metrics and dist.is_main:  # resumed at the last step: report what was logged before
        rows = read_metrics(result.run_dir)
        result.train_metrics = next((r for r in reversed(rows) if r["split"] == "train"), {})
        result.eval_metrics = next((r for r in reversed(rows) if r["split"] == "eval"), {})
    _save(user_cfg, result, state["step"], modules, recipe, state, dist, final=True)
    if dist.is_main:
        _write_summary(result.run_dir, state["step"], result, status="finished",
                       skipped_steps=state.get("skipped_steps", 0))
        print(f"alignkit: done after {state['step']} steps; final model in {result.final_dir}", flush=True)
        from alignkit.report import build_report

        report = build_report(result.run_dir)
        logger.log_artifact(report)  # the report on every tracker of train.report_to
        print(f"alignkit: report in {report} (add evaluation with `alignkit eval --run "
              f"{result.run_dir}`)", flush=True)


def _check_health(monitor: HealthMonitor, logger, dist: Dist, state: dict, step: int, row: dict, split: str,
                  stop_on: list) -> list:
    """Run the health rules on a row just logged: print each new alert (main process), write it to
    metrics.jsonl as an `alert` row, keep the monitor's state for checkpoints, and return the alerts
    whose rule is in `train.stop_on` (the main process's, on every process: all stop together)."""
    alerts = monitor.check(step, row, split)
    state["health"] = monitor.state_dict()
    for a in alerts:
        _printer(dist)([a.line()])
        logger.log_alert(step, a.to_row(level="error" if a.rule in stop_on else "warn"))
    stops = [a for a in alerts if a.rule in stop_on]
    return dist.broadcast(stops) if stop_on else stops


def _stop_for_health(cfg, result: RunResult, modules: dict, recipe, state: dict, dist: Dist, logger,
                     stops: list) -> None:
    """`train.stop_on`: a checkpoint at this step (resumable), summary.json with status
    `stopped_by_health` and the alert, the report; no final/ (the run did not finish). Raises HealthStop."""
    step, alert = state["step"], stops[0]
    _save(cfg, result, step, modules, recipe, state, dist)
    checkpoint = result.run_dir / f"checkpoint-{step}"
    if dist.is_main:
        _write_summary(result.run_dir, step, result, status="stopped_by_health",
                       alert={"step": step, **alert.to_row(level="error")}, skipped_steps=state.get("skipped_steps", 0))
        from alignkit.report import build_report

        report = build_report(result.run_dir)
        logger.log_artifact(report)
    dist.barrier()  # the others wait for these files: torchrun ends every process once one of them exits
    raise HealthStop(
        f"train.stop_on: health rule `{alert.rule}` alerted at step {step}: {alert.message} The run stopped cleanly: "
        f"{checkpoint} holds the model and trainer state, summary.json has status stopped_by_health, the report "
        f"is in {result.run_dir / 'report.html'}, and no final/ was written. Advice: {alert.advice} `--resume` goes "
        "on from the checkpoint (this alert is not raised again while its condition holds).", alert, checkpoint)


def _write_summary(run_dir: Path, steps: int, result: RunResult, status: str, **extra) -> None:
    summary = {"status": status, "steps": steps, **extra, "train": result.train_metrics, "eval": result.eval_metrics,
               "timings": {k: round(v, 3) for k, v in result.timings.items()}}
    jsonfile.write_atomic(run_dir / "summary.json", summary)
