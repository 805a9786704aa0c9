"""The one training loop: plain PyTorch, any recipe, one or more trained modules, one or many
processes.

records -> examples -> batches -> log-probs -> loss -> AdamW steps -> metrics. The loop knows
micro-batches, accumulation, schedules, checkpoints and logging; the recipe knows the method and
is reached only through the hooks of `alignkit.train.base.Recipe`; `alignkit.distributed` knows
the processes (docs/architecture.md). A step is `_step` (micro-batches, backward, clipping, the
update) and `_housekeeping` (metrics, health, evaluation, checkpoints); a non-finite step goes to
`_on_nonfinite`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from alignkit import jsonfile
from alignkit.config import RunConfig, save_config
from alignkit.data.heldout import write_record
from alignkit.distributed import Dist
from alignkit.errors import ConfigError
from alignkit.registries import recipes as registry
from alignkit.registries.trackers import check_installed as check_trackers_installed
from alignkit.train import checkpoint as ckpt
from alignkit.train import persist
from alignkit.train.base import OptimSettings
from alignkit.train.health import Alert, HealthMonitor
from alignkit.train.metrics import MetricsLogger, NullLogger, read_metrics
from alignkit.train.modules import TrainedModule
from alignkit.train.persist import TrainingError
from alignkit.train.resume import Resume, check_output_dir, data_fingerprint, finished_summary, prepare_resume
from alignkit.train.safety_watch import SafetyWatch, load_safety_prompts
from alignkit.train.session import Session, load_policy, place, printer, resolve_precision, setup  # noqa: F401
from alignkit.train.steps import BatchPlan, batch_plan, run_batches, total_steps

__all__ = ["train", "setup", "resolve_precision", "RunResult", "TrainState", "TrainingError", "HealthStop"]


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
class TrainState:
    """Where the run is; saved in every checkpoint (as `as_dict()`) and restored on resume."""

    step: int = 0
    micro_step: int = 0
    total_steps: int = 0
    data_fingerprint: str = ""
    skipped_steps: int = 0
    world_size: int = 1
    global_accum: int = 1  # micro-batches of all processes per step: kept across a change of scale
    health: dict | None = None  # the health monitor's state

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d if self.health is not None else {k: v for k, v in d.items() if k != "health"}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Run:
    """One training run in progress: what every part of a step reads and updates."""

    cfg: RunConfig  # what runs (a resume at another scale may have changed train.grad_accum)
    record: RunConfig  # what the user wrote: checkpoints and config.yaml record it, nothing else reads it
    session: Session
    plan: BatchPlan
    modules: dict[str, TrainedModule]  # "policy", and what the recipe trains beside it
    state: TrainState
    logger: MetricsLogger | NullLogger  # NullLogger on processes other than the main one
    result: RunResult
    progress: bool
    monitor: HealthMonitor
    finish: Callable[[Path], Path | None] | None = None  # finish(run_dir) -> a file for the trackers (the report)
    stops: list[Alert] = field(default_factory=list)  # alerts whose rule is in train.stop_on
    safety: SafetyWatch | None = None  # train.safety_prompts: harmful compliance at each evaluation

    @property
    def dist(self) -> Dist:
        return self.session.dist


def train(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    resume_from: str | None = None,
    allow_config_change: bool = False,
    finish: Callable[[Path], Path | None] | None = None,
) -> RunResult:
    """Run a training job described by `cfg`; see docs/training.md for the run directory's layout.

    `resume`: continue from the latest checkpoint; `resume_from`: from that checkpoint (a name
    such as `checkpoint-40`, or a path); `allow_config_change`: accept settings that differ from
    the checkpoint's, apply them from there on and record them in `config_changes.jsonl`.
    `finish(run_dir)`: called on the main process when the run ends or a health rule stops it
    (`alignkit.api.train` writes the report there). Under torchrun, every process runs this with
    the same config."""
    placement = place(cfg)
    dist, run_dir = placement.dist, Path(cfg.output_dir)
    dist.on_main(lambda: check_output_dir(run_dir))
    dist.on_main(lambda: check_trackers_installed(cfg.train.report_to))  # before any model loads
    record, resumed = cfg, None
    if resume or resume_from:
        resumed = prepare_resume(cfg, run_dir, resume_from, allow_config_change, dist)
        summary = finished_summary(run_dir, resumed, quiet=not dist.is_main) if resumed else None
        if summary is not None:
            return RunResult(
                run_dir, run_dir / "final", summary["steps"], summary.get("train") or {}, summary.get("eval") or {}
            )
        if resumed is not None:  # --resume without a checkpoint starts from scratch
            cfg = persist.same_global_batch(cfg, resumed, dist)
    else:
        printer(dist)(dist.on_main(lambda: ckpt.clean_leftovers(run_dir)))
    if dist.enabled and cfg.train.forward_tokens:
        raise ConfigError(
            "`train.forward_tokens` splits micro-batches into a number of pieces that differs between "
            "processes, which sharded training cannot follow; unset it with more than one process "
            "(`train.max_tokens_per_batch` bounds each process's micro-batch instead)."
        )
    if cfg.train.safety_prompts:  # its data errors before any model loads
        load_safety_prompts(cfg.train.safety_prompts, cfg.train.safety_num_prompts)
    run = _start(cfg, record, setup(cfg, progress, placement), resumed, progress, finish)
    run.safety = SafetyWatch.for_run(cfg, run.session.tokenizer)
    try:
        _loop(run)
    finally:
        run.logger.close()
        run.session.recipe.close()
    return run.result


def _start(
    cfg: RunConfig,
    record: RunConfig,
    s: Session,
    resumed: Resume | None,
    progress: bool,
    finish: Callable[[Path], Path | None] | None,
) -> Run:
    """Shard the trained modules, restore a checkpoint, write config.yaml and the held-out record."""
    dist, run_dir = s.dist, Path(cfg.output_dir)
    s.model.train()
    plan = batch_plan(cfg, s.recipe, s.data.train, cfg.train.batch_size, cfg.train.shuffle)
    if plan.over_budget:
        printer(dist)(
            [
                f"{plan.over_budget} training examples are longer than train.max_tokens_per_batch="
                f"{cfg.train.max_tokens_per_batch}; each goes in a micro-batch of its own"
            ]
        )
    steps = total_steps(cfg, plan, s.recipe.iterations, dist.data_size)
    spec = registry.get(cfg.recipe)
    # name -> (model, settings, tokenizer saved beside it, rebuild: a plain copy of the model as loaded)
    modules: dict[str, tuple[torch.nn.Module, OptimSettings, object, Callable[[], torch.nn.Module] | None]] = {
        "policy": (
            s.model,
            OptimSettings.of_policy(cfg),
            s.tokenizer,
            lambda: load_policy(cfg, spec, s.tokenizer, torch.device("cpu")),
        )
    }
    for name, extra in s.recipe.extra_modules(s.model, s.ctx).items():
        modules[name] = (extra.model, extra.settings, extra.tokenizer, extra.rebuild)
    sharded = resumed is not None and (resumed.path / "dcp").is_dir()
    if resumed is not None and not sharded:  # full weights load before sharding
        for name, (model, *_rest) in modules.items():
            ckpt.load_weights(model, resumed.path if name == "policy" else resumed.path / name)
    trained = {}
    for name, (model, settings, tokenizer, rebuild) in modules.items():
        shard = name != "policy" or s.recipe.shard_model
        trained[name] = TrainedModule.build(
            name,
            dist.wrap(model) if shard else model,
            settings,
            steps,
            tokenizer,
            rebuild,
            sharded=shard and dist.strategy == "fsdp",
        )
    fingerprint = data_fingerprint(s.data.train)
    state = TrainState(
        total_steps=steps,
        data_fingerprint=fingerprint,
        world_size=dist.world_size,
        global_accum=cfg.train.grad_accum * dist.data_size,
    )
    # the micro-batches the recipe will be asked for (an asynchronous online run samples ahead)
    per_step = cfg.train.grad_accum
    s.recipe.schedule(
        lambda key: micro_batch_items(plan, s.data.train, dist, key), -(-steps // s.recipe.iterations) * per_step
    )
    if resumed is not None:
        state = TrainState.from_dict(
            persist.restore(resumed, trained, s.recipe, state.as_dict(), fingerprint, steps, dist, sharded)
        )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed is not None:
            resumed.record_changes(run_dir, state.step)
        save_config(record, run_dir / "config.yaml")
        write_record(cfg.data, cfg.seed, cfg.recipe, s.data, run_dir)  # which examples eval --run must evaluate
    logger = (
        MetricsLogger(run_dir, cfg.train.report_to, record, resume_step=state.step if resumed else None)
        if dist.is_main
        else NullLogger()
    )
    return Run(
        cfg,
        record,
        s,
        plan,
        trained,
        state,
        logger,
        RunResult(run_dir, run_dir / "final", steps, timings=s.timings),
        progress and dist.is_main,
        HealthMonitor.for_run(cfg, state.health),
        finish,
    )


def _loop(run: Run) -> None:
    """Train until `total_steps`, or until a health rule in `train.stop_on` alerts."""
    s, state, result = run.session, run.state, run.result
    if state.step == 0 and ((s.recipe.evaluate_at_start and s.data.eval) or run.safety is not None):
        _evaluate(run, 0, recipe_too=s.recipe.evaluate_at_start)
    with tqdm(
        total=state.total_steps,
        initial=state.step,
        desc=f"train {s.recipe.name}",
        unit="step",
        disable=not run.progress,
        dynamic_ncols=True,
    ) as bar:
        while state.step < state.total_steps and not run.stops:
            start = time.perf_counter()
            metrics, batches, finite = _step(run)
            _housekeeping(run, metrics, batches, finite, time.perf_counter() - start, bar)
    if run.stops:
        _stop_for_health(run)
    if not result.train_metrics and run.dist.is_main:  # resumed at the last step: report what was logged before
        rows = read_metrics(result.run_dir)
        result.train_metrics = next((r for r in reversed(rows) if r["split"] == "train"), {})
        result.eval_metrics = next((r for r in reversed(rows) if r["split"] == "eval"), {})
    persist.save(run.record, result, state.step, run.modules, s.recipe, state.as_dict(), run.dist, final=True)
    if run.dist.is_main:
        _write_summary(result, state.step, status="finished", skipped_steps=state.skipped_steps)
        print(f"alignkit: done after {state.step} steps; final model in {result.final_dir}", flush=True)
        _finish(run)


def micro_batch_items(plan: BatchPlan, train: list, dist, key: int) -> list:
    """This process's items of micro-batch `key`: the global micro-batches are the data shares'
    ones, key * shares + share (the processes of a context group take the same)."""
    return [train[i] for i in plan.micro_batch(key * dist.data_size + dist.data_rank)]


def _micro_batches(run: Run) -> tuple[list, list, list]:
    """This step's micro-batches, as the recipe makes them: (batches, the items of each micro-batch,
    how many batches each micro-batch became)."""
    t, s, state, dist = run.cfg.train, run.session, run.state, run.dist
    batches, batch_items, pieces = [], [], []
    for a in range(t.grad_accum):
        key = (state.step // s.recipe.iterations) * t.grad_accum + a  # = micro_step when a rollout is used once
        items = micro_batch_items(run.plan, s.data.train, dist, key)
        made = s.recipe.batches(run.modules["policy"].model, items, key)
        batches += made
        batch_items.append(items)
        pieces.append(len(made))
        state.micro_step += 1
    return batches, batch_items, pieces


def _step(run: Run) -> tuple[dict, list, bool]:
    """Forward and backward over the step's micro-batches, clipping, the update (skipped when the
    loss or a gradient is not finite and `train.on_nonfinite: skip_step`): (metrics, batches, finite)."""
    s, dist, modules = run.session, run.dist, run.modules
    batches, batch_items, pieces = _micro_batches(run)
    params = [p for m in modules.values() for p in m.params]
    metrics, losses, norms = run_batches(
        s.recipe,
        modules["policy"].model,
        batches,
        "train",
        s.device,
        s.autocast,
        backward=True,
        track_grads=params if len(batches) > 1 else None,
        dist=dist,
    )
    for m in modules.values():  # replicated modules (ddp, or a head trained alone): average their gradients
        if not m.sharded:
            dist.average_grads(m.params)
    norms_by_module = {name: m.clip(dist) for name, m in modules.items()}
    metrics["lr"], metrics["grad_norm"] = modules["policy"].lr, norms_by_module["policy"]
    for name, m in modules.items():
        if name != "policy":
            metrics[f"lr/{name}"], metrics[f"grad_norm/{name}"] = m.lr, norms_by_module[name]
    finite = math.isfinite(metrics["loss"]) and all(math.isfinite(n) for n in norms_by_module.values())
    if not finite:
        _on_nonfinite(run, metrics, batch_items, losses, norms, pieces)
    for m in modules.values():
        m.step(apply=finite)
    s.recipe.step_done()
    run.state.step += 1
    return metrics, batches, finite


def _on_nonfinite(run: Run, metrics: dict, batch_items: list, losses: list, norms: list, pieces: list) -> None:
    """`train.on_nonfinite`: stop (summary, no update, TrainingError naming the examples) or skip the step."""
    from alignkit.train.nonfinite import describe, locate

    dist, step = run.dist, run.state.step + 1
    starts = [sum(pieces[:i]) for i in range(len(pieces))]
    loss_mb = [sum(losses[i : i + k]) for i, k in zip(starts, pieces)]
    norm_mb = [norms[i + k - 1] for i, k in zip(starts, pieces)]
    found = dist.gather_objects(locate(run.session.data, loss_mb, norm_mb, batch_items))
    report = describe(step, metrics, found, len(batch_items))
    if run.cfg.train.on_nonfinite == "stop":
        for m in run.modules.values():
            m.optimizer.zero_grad(set_to_none=True)
        run.logger.log(step, {**metrics, "nonfinite": 1})
        if dist.is_main:
            _write_summary(run.result, run.state.step, status="stopped_nonfinite", message=report)
        last = ckpt.list_checkpoints(run.result.run_dir)
        kept = (
            f"the last checkpoint, {last[-1].name}, is kept as it was" if last else "no checkpoint had been written yet"
        )
        raise TrainingError(
            f"train.on_nonfinite=stop: {report} No update was applied and no weights were written; {kept}. "
            "Lower train.learning_rate or check those examples; train.on_nonfinite=skip_step skips such "
            "steps instead."
        )
    run.state.skipped_steps += 1
    metrics["skipped"] = 1
    if dist.is_main:
        print(f"alignkit: skipped the update of {report}", flush=True)


def _housekeeping(run: Run, metrics: dict, batches: list, finite: bool, elapsed: float, bar) -> None:
    """After an update: throughput metrics, the log row, health rules, evaluation and checkpoints."""
    t, s, state, result, dist = run.cfg.train, run.session, run.state, run.result, run.dist
    step = state.step
    counts = (
        dist.all_sum(
            torch.tensor(
                [float(sum(b.num_sequence_tokens for b in batches)), float(sum(b.num_tokens for b in batches))],
                dtype=torch.float64,
            )
        )
        / dist.context
    )  # a context group's processes share their batches
    metrics.update(
        tokens=int(counts[0]),
        tokens_per_s=float(counts[0]) / elapsed,
        tokens_computed=int(counts[1]),
        step_time_s=elapsed,
    )
    if "time/generation_s" in metrics:  # online: the share of the step spent sampling
        metrics["time/generation_s"] *= len(batches)  # the meter averaged it over micro-batches
        metrics["time/generation_fraction"] = metrics["time/generation_s"] / elapsed
    if step % t.log_every == 0 or step == state.total_steps or not finite:
        _log(run, step, metrics, "train")
        result.train_metrics = metrics
        bar.set_postfix(
            {
                k: f"{metrics[k]:.3g}"
                for k in ("loss", "rewards/accuracies", "accuracy", "reward")
                if k in metrics and metrics[k] is not None
            }
        )
    bar.update(1)
    last = step == state.total_steps
    if (s.data.eval or run.safety is not None) and ((t.eval_every and step % t.eval_every == 0) or last):
        result.eval_metrics = _evaluate(run, step)
    if (t.save_every and step % t.save_every == 0) and not last and not run.stops:
        persist.save(run.record, result, step, run.modules, s.recipe, state.as_dict(), dist)


def _evaluate(run: Run, step: int, recipe_too: bool = True) -> dict:
    """Log an eval row: the recipe's held-out evaluation (when there is a held-out split and
    `recipe_too`) and the harmful compliance of `train.safety_prompts` (when set)."""
    s, model = run.session, run.modules["policy"].model
    row = s.recipe.evaluate(model, s.data.eval) if s.data.eval and recipe_too else {}
    if run.safety is not None:
        row = {**row, **run.safety.measure(model, run.dist)}
    _log(run, step, row, "eval")
    return row


def _log(run: Run, step: int, row: dict, split: str) -> None:
    """Log a row, then run the health rules on it: print each new alert (main process), write it to
    metrics.jsonl as an `alert` row, keep the monitor's state for checkpoints, and collect the
    alerts whose rule is in `train.stop_on` (the main process's, on every process: all stop together)."""
    run.logger.log(step, row, split=split)
    stop_on = run.cfg.train.stop_on
    alerts = run.monitor.check(step, row, split)
    run.state.health = run.monitor.state_dict()
    for a in alerts:
        printer(run.dist)([a.line()])
        run.logger.log_alert(step, a.to_row(level="error" if a.rule in stop_on else "warn"))
    stops = [a for a in alerts if a.rule in stop_on]
    run.stops += run.dist.broadcast(stops) if stop_on else stops


def _stop_for_health(run: Run) -> None:
    """`train.stop_on`: a checkpoint at this step (resumable), summary.json with status
    `stopped_by_health` and the alert, the caller's `finish`; no final/ (the run did not finish).
    Raises HealthStop."""
    step, alert, dist, result = run.state.step, run.stops[0], run.dist, run.result
    persist.save(run.record, result, step, run.modules, run.session.recipe, run.state.as_dict(), dist)
    checkpoint = result.run_dir / f"checkpoint-{step}"
    if dist.is_main:
        _write_summary(
            result,
            step,
            status="stopped_by_health",
            alert={"step": step, **alert.to_row(level="error")},
            skipped_steps=run.state.skipped_steps,
        )
        _finish(run)
    dist.barrier()  # the others wait for these files: torchrun ends every process once one of them exits
    raise HealthStop(
        f"train.stop_on: health rule `{alert.rule}` alerted at step {step}: {alert.message} The run stopped cleanly: "
        f"{checkpoint} holds the model and trainer state, summary.json has status stopped_by_health, the report "
        f"is in {result.run_dir / 'report.html'}, and no final/ was written. Advice: {alert.advice} `--resume` goes "
        "on from the checkpoint (this alert is not raised again while its condition holds).",
        alert,
        checkpoint,
    )


def _finish(run: Run) -> None:
    """The caller's `finish(run_dir) -> a file or None` (`alignkit.api.train` passes the report
    builder, which lives above this layer); the file goes to every tracker of train.report_to."""
    if run.finish is not None:
        made = run.finish(run.result.run_dir)
        if made is not None:
            run.logger.log_artifact(made)


def _write_summary(result: RunResult, steps: int, status: str, **extra) -> None:
    summary = {
        "status": status,
        "steps": steps,
        **extra,
        "train": result.train_metrics,
        "eval": result.eval_metrics,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
    }
    jsonfile.write_atomic(result.run_dir / "summary.json", summary)
