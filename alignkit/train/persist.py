"""What the loop writes and reads back: checkpoints (`save`), the consolidated `final/` directories
with their model card (`export`), and the state a resumed run starts from (`restore`,
`same_global_batch`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alignkit.config import RunConfig
from alignkit.distributed import Dist
from alignkit.errors import AlignkitError, ConfigError
from alignkit.train import checkpoint as ckpt
from alignkit.train.model_card import write_model_card
from alignkit.train.resume import Resume
from alignkit.train.session import printer


class TrainingError(AlignkitError):
    """Training cannot go on (a non-finite loss or gradient under `train.on_nonfinite: stop`)."""


def same_global_batch(cfg: RunConfig, resumed: Resume, dist: Dist) -> RunConfig:
    """A checkpoint written by another number of processes resumes with the same global batch:
    `train.grad_accum` scales so that grad_accum x processes stays what it was. The micro-batches
    of each step are then the same examples as before (docs/architecture.md, "Batches")."""
    before = resumed.state.get("world_size", 1)
    total = resumed.state.get("global_accum", cfg.train.grad_accum * before)
    shares = dist.data_size  # processes, or context groups under context parallelism
    if "train.grad_accum" in resumed.changes:  # a new accumulation the user asked for
        total = cfg.train.grad_accum * shares
    if total == cfg.train.grad_accum * shares:
        return cfg
    if total % shares:
        raise ConfigError(
            f"{resumed.path} was written by {before} process(es): "
            f"{total} micro-batches of train.batch_size={cfg.train.batch_size} per step, which {shares} "
            f"data shares cannot split evenly. Resume with a number of processes that divides {total}."
        )
    accum = total // shares
    printer(dist)(
        [
            f"{resumed.path} was written by {before} process(es); with {dist.world_size}, train.grad_accum "
            f"becomes {accum} so that each step keeps its {total * cfg.train.batch_size} examples"
        ]
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))


def restore(
    resumed: Resume, modules: dict, recipe, state: dict, fingerprint: str, steps: int, dist: Dist, sharded: bool
) -> dict:
    """The trainer state (a TrainState's dict) of the checkpoint, with modules, optimizers, the
    recipe's state and the RNGs restored in place."""
    saved = resumed.saved
    resumed.check_data(fingerprint)
    state = {
        **state,
        **saved["state"],
        "total_steps": steps,
        "data_fingerprint": fingerprint,
        "world_size": dist.world_size,
        "global_accum": state["global_accum"],
    }
    if sharded:
        dist.load_sharded({name: (m.model, m.optimizer) for name, m in modules.items()}, resumed.path / "dcp")
    for name, module in modules.items():
        module.load_state_dict(saved["modules"][name], state["step"], dist)
    saved_ranks = saved["recipe"] if isinstance(saved["recipe"], list) else [saved["recipe"]]
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if len(saved_ranks) != dist.world_size and any(r.get("rollouts") for r in saved_ranks):
        raise ConfigError(
            f"{resumed.path} was written by {len(saved_ranks)} process(es) in the middle of an online "
            f"rollout cycle; resume it with {len(saved_ranks)} process(es), or from a checkpoint taken "
            "when a rollout's updates were done."
        )
    mine = dist.rank if len(saved_ranks) == dist.world_size else 0
    recipe.load_state_dict(saved_ranks[mine])
    ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
    printer(dist)(
        [
            f"resumed from {resumed.path} at step {state['step']}"
            + (f" (written by {len(rngs)} processes, now {dist.world_size})" if len(rngs) != dist.world_size else "")
        ]
    )
    return state


def save(cfg, result, step, modules: dict, recipe, state: dict, dist: Dist, final: bool = False) -> None:
    """`checkpoint-<step>` (every module, optimizer, the recipe's and the trainer's state, the RNGs);
    with `final`, also `final/` and `final_<name>/` and the model card. `cfg` is the config the
    user wrote (what a resume compares with)."""
    for m in modules.values():
        bad = dist.nonfinite_params(m.model)
        if bad:  # the step checks should make this impossible; never write such weights anyway
            raise TrainingError(
                f"{m.name} parameters {', '.join(bad[:5])} hold NaN or inf at step {step}; nothing was saved."
            )
    sharded = dist.enabled
    module_states = {name: m.state_dict(dist, with_optimizer=not sharded) for name, m in modules.items()}
    trainer_state = {
        "modules": module_states,
        "state": dict(state),
        "recipe": dist.gather_objects(recipe.state_dict()) if sharded else recipe.state_dict(),
        "rng": dist.gather_objects(ckpt.rng_state()) if sharded else ckpt.rng_state(),
    }

    def write_all(tmp: Path):  # every process: its shards of every module and optimizer
        if sharded:
            dist.save_sharded(
                {
                    name: {
                        "model": dist.model_state(m.model, full=False),
                        "optimizer": dist.optimizer_state(m.model, m.optimizer, full=False),
                    }
                    for name, m in modules.items()
                },
                tmp / "dcp",
            )

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
        export(cfg, result, modules, dist)
        if dist.is_main:  # final/README.md: the Hugging Face model card
            write_model_card(
                result.final_dir,
                cfg,
                result.run_dir,
                step,
                result.train_metrics,
                result.eval_metrics,
                dist.world_size,
                state["global_accum"] // dist.data_size,
                getattr(modules["policy"].model, "quantization_report", None),
            )


def export(cfg, result, modules: dict, dist: Dist) -> None:
    """`final/` (the policy) and `final_<name>/`: one consolidated directory each, LoRA merged."""
    for name, m in modules.items():
        target = result.final_dir if name == "policy" else result.run_dir / f"final_{name}"
        if not dist.enabled:
            ckpt.atomic_dir(
                target, lambda tmp, m=m: ckpt.save_model_dir(tmp, m.model, m.tokenizer, cfg, merge_lora=True)
            )
            continue
        full = dist.model_state(m.model, full=True)  # every process takes part; the main one gets the tensors
        if dist.is_main:
            plain = m.rebuild()
            missing, unexpected = plain.load_state_dict(full, strict=False)
            assert not unexpected, unexpected
            ckpt.atomic_dir(
                target, lambda tmp, p=plain, t=m.tokenizer: ckpt.save_model_dir(tmp, p, t, cfg, merge_lora=True)
            )
        dist.barrier()
