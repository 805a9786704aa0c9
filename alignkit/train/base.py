"""What recipes share: the Recipe protocol with every hook declared, and the machinery of offline
recipes (`OfflineRecipe`: batches from tokenized examples, reference log-probs, the hooks'
defaults). Online recipes are `alignkit.train.online.OnlineRecipe`.

The loop (`alignkit.train.loop`) calls every hook of `Recipe` on every recipe. See
docs/architecture.md for the table of hooks and who overrides them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from alignkit import logprob_passes as passes
from alignkit.config import RunConfig
from alignkit.data.batching import TokenBatch
from alignkit.data.splits import PreparedData
from alignkit.data.tokenize import explain
from alignkit.distributed import Dist
from alignkit.train.steps import eval_batches, forward_pieces, run_batches


@dataclass
class SetupContext:
    """What a recipe needs from the loop (not the config file: the recipe has that), including the
    data-parallel helpers through which a recipe works on its share of the data without knowing
    which process it is (one process: each is the identity)."""

    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]  # zero-argument context factory: bf16 autocast or nothing
    precision: str  # "bf16" or "fp32"
    fingerprint: dict  # identity of the initial model: the key of caches derived from it
    cache_root: Path
    progress: bool = True  # progress bars (only the main process draws them)
    dist: Dist = field(default_factory=Dist)

    def shard(self, seq: list) -> list:
        """This process's share of `seq` (work every process does a part of)."""
        return self.dist.shard(seq)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t`, concatenated along dim 0 in process order (the inverse of `shard`)."""
        return self.dist.gather(t)

    def gather_objects(self, obj) -> list:
        return self.dist.gather_objects(obj)

    def gather_shares(self, obj) -> list:
        """Every data share's `obj`, in order (the inverse of `shard` for objects)."""
        return self.dist.gather_shares(obj)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.dist.all_sum(t)

    def full_params(self, *models):
        """A context in which `models` run forwards without collectives (a number of forwards that
        differs between processes: sampling, evaluation)."""
        return self.dist.full_params(*models)

    def say(self, message: str) -> None:
        """Print `message` once (from the main process)."""
        self.dist.say(message)

    def main_writes(self, write: Callable) -> None:
        """Run `write()` (a file write) on one process only, then let every process go on."""
        self.dist.main_writes(write)


@dataclass
class OptimSettings:
    """One trained module's optimizer and schedule."""

    learning_rate: float
    weight_decay: float
    betas: tuple
    max_grad_norm: float  # 0 disables clipping
    warmup_ratio: float
    schedule: str  # cosine | linear | constant

    @classmethod
    def of_policy(cls, cfg: RunConfig) -> "OptimSettings":
        t = cfg.train
        return cls(t.learning_rate, t.weight_decay, tuple(t.adam_betas), t.max_grad_norm, t.warmup_ratio, t.lr_schedule)


@dataclass
class Trainable:
    """A module the loop trains besides the policy (PPO's value model), with its own settings."""

    name: str
    model: torch.nn.Module
    settings: OptimSettings
    tokenizer: object = None  # saved with the module's checkpoints when given
    rebuild: Callable[[], torch.nn.Module] | None = None  # a fresh plain copy as loaded (to export it when sharded)


class Recipe(Protocol):
    """The interface the loop sees, offline and online. Every hook is declared here; `OfflineRecipe` and
    `online.OnlineRecipe` define each."""

    name: str
    iterations: int  # optimizer steps taken on each batch (online: per rollout)
    evaluate_at_start: bool  # also evaluate before the first step (online: the held-out reward at step 0)
    shard_model: bool  # whether the trained model's own forward is used (and so it may be sharded)

    @property
    def shares_prompts(self) -> bool: ...  # batches hold each prompt once (the token budget counts so)

    def prepare(self) -> PreparedData: ...

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData: ...

    def extra_modules(self, model, ctx: SetupContext) -> dict[str, Trainable]: ...

    def schedule(self, items_of: Callable[[int], list], keys: int) -> None: ...  # the plan: micro-batch key -> items

    def batches(self, model, items: list, key: int) -> list: ...

    def weight(self, batch) -> int: ...

    def loss(self, model, batch, split: str) -> tuple[torch.Tensor, dict]: ...

    def evaluate(self, model, items: list) -> dict: ...

    def step_done(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def show_example(self, data: PreparedData, index: int) -> str: ...

    def close(self) -> None: ...  # release what setup started (a colocated vLLM engine), once the run ends


class OfflineRecipe:
    """A recipe that trains on tokenized examples it prepared before training; the defaults of the
    hooks of `Recipe` for offline recipes, which derive from it directly (one level: what they
    share beyond it they compose, e.g. `recipes.dpo.PreferenceLosses`).

    Subclasses name their two layouts: `pack(items, pad_id, pack_tokens)` (prefix-shared, packed rows,
    `train.packing`, the default) and `pad(items, pad_id)` (plain padded rows)."""

    name = "offline"
    iterations = 1
    evaluate_at_start = False
    shard_model = True  # the loop may shard the policy (False: only a head trains, on features computed once)
    pack: Callable[..., TokenBatch]  # each subclass names its two layouts
    pad: Callable[..., TokenBatch]

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._ctx: SetupContext | None = None  # set in `setup`: the device, precision and data-parallel helpers
        self.references: dict[str, passes.CachedReference | passes.LiveReference] = {}

    @property
    def ctx(self) -> SetupContext:
        assert self._ctx is not None, "Recipe.setup has not run"  # the loop calls setup before any other hook
        return self._ctx

    @property
    def autocast(self) -> Callable:
        return self._ctx.autocast if self._ctx is not None else contextlib.nullcontext

    @property
    def needs_reference(self) -> bool:
        """Whether a loss reads reference log-probs (the DPO family's recipes ask their losses)."""
        return False

    def extra_modules(self, model, ctx: SetupContext) -> dict[str, Trainable]:
        return {}

    def weight(self, batch) -> int:
        return batch.num_examples

    def close(self) -> None:
        pass  # nothing outlives a step

    def schedule(self, items_of: Callable[[int], list], keys: int) -> None:
        pass  # batches are made when asked for

    def step_done(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @property
    def shares_prompts(self) -> bool:
        return self.cfg.train.packing

    def collate(self, items: list) -> TokenBatch:
        t = self.cfg.train
        if t.packing:
            return type(self).pack(items, self.tokenizer.pad_token_id, t.pack_tokens)
        return type(self).pad(items, self.tokenizer.pad_token_id)

    def batches(self, model, items: list, key: int) -> list:
        """The micro-batch's items collated, in pieces of at most `train.forward_tokens` tokens (whole
        examples; the loss is normalised over the whole step, so splitting leaves it unchanged)."""
        return [self.collate(p) for p in forward_pieces(items, self.cfg.train.forward_tokens, self.shares_prompts)]

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData:
        self._ctx = ctx
        self.attach_references(model, data, ctx)
        return data.replace()

    def attach_references(self, model, data: PreparedData, ctx: SetupContext) -> None:
        """Reference log-probs of every example, computed once and cached on disk (`reference:
        cached`), or a frozen reference model in memory (`reference: live`)."""
        if not self.needs_reference:
            return
        if self.cfg.reference == "live":
            live = passes.LiveReference(model)
            self.references = {"train": live, "eval": live}
            return
        t = self.cfg.train
        for split, items in (("train", data.train), ("eval", data.eval)):
            if items:
                table = passes.cached_ref_logps(
                    model,
                    items,
                    self.collate,
                    cache_dir=ctx.cache_root / "reference",
                    fingerprint=ctx.fingerprint,
                    precision=ctx.precision,
                    batch_size=t.eval_batch_size or t.batch_size,
                    chunk_size=t.logprob_chunk_size,
                    device=ctx.device,
                    autocast=ctx.autocast,
                    desc=f"reference log-probs ({split})",
                    parallel=ctx,
                    progress=ctx.progress,
                )
                self.references[split] = passes.CachedReference(table)

    @torch.no_grad()
    def evaluate(self, model, items: list) -> dict:
        """The loss and metrics over the held-out examples, in batches of `train.eval_batch_size`,
        each process evaluating its share."""
        was_training = model.training
        model.eval()
        batches = [self.collate(b) for b in eval_batches(self.cfg, self, self.ctx.shard(items))]
        try:
            with self.ctx.full_params(model):
                out, _, _ = run_batches(
                    self,
                    model,
                    batches,
                    "eval",
                    next(model.parameters()).device,
                    self.autocast,
                    backward=False,
                    dist=self.ctx.dist,
                )
        finally:
            model.train(was_training)
        return out

    def show_example(self, data: PreparedData, index: int) -> str:
        """Prompt, chosen and rejected with the tokens the loss scores."""
        item, tok = data.train[index], self.tokenizer
        return (
            explain(tok, item.prompt_ids, item.chosen_ids, label="chosen")
            + "\n\n"
            + explain(tok, item.prompt_ids, item.rejected_ids, label="rejected")
        )


class RunningMean:
    """Mean of every value seen so far (BCO's reward shift delta; BCO paper, arXiv 2404.04656, sec. 3.2)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, values: torch.Tensor) -> None:
        self.total += float(values.detach().float().sum())
        self.count += values.numel()

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = state["total"], state["count"]
