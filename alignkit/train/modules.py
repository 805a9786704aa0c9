"""The modules a run trains, each with its own AdamW, learning-rate schedule and gradient clipping:
the policy, and whatever else a recipe trains beside it (PPO's value model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.train.base import OptimSettings
from alignkit.train.steps import lr_factor


@dataclass
class TrainedModule:
    name: str  # "policy", or the recipe's name for it ("value")
    model: torch.nn.Module
    settings: OptimSettings
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps: int  # optimizer steps of the run (the schedule's length)
    tokenizer: object = None  # saved beside the module in checkpoints
    rebuild: object = None  # () -> a plain copy of the module as it was loaded (to export a sharded one)
    sharded: bool = False  # FSDP2 reduces its gradients; otherwise the loop averages them across processes

    @classmethod
    def build(
        cls, name: str, model, settings: OptimSettings, steps: int, tokenizer=None, rebuild=None, sharded: bool = False
    ) -> "TrainedModule":
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm weights
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=tuple(settings.betas), foreach=None)
        warmup = int(settings.warmup_ratio * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, steps, warmup, settings.schedule)
        )
        return cls(name, model, settings, optimizer, scheduler, steps, tokenizer, rebuild, sharded)

    @property
    def params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])  # a float already: alignkit sets float learning rates

    def clip(self, dist) -> float:
        """Clip the gradient norm to `max_grad_norm` (0: no clipping); the norm before clipping."""
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else float("inf")
        return dist.clip_grad_norm(self.params, max_norm)

    def step(self, apply: bool) -> None:
        """Apply the update (unless `apply` is False: a skipped step), advance the schedule, zero grads."""
        if apply:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self, dist, with_optimizer: bool = True) -> dict:
        """The schedule, and the optimizer state keyed by parameter names (full, for a one-process
        checkpoint; a sharded checkpoint writes the optimizer with DCP instead)."""
        out = {"scheduler": self.scheduler.state_dict()}
        if with_optimizer:
            out["optimizer"] = dist.optimizer_state(self.model, self.optimizer, full=True)
        return out

    def load_state_dict(self, state: dict, step: int, dist) -> None:
        """Restore the schedule (and a full optimizer state when the checkpoint has one), then set the
        hyper-parameters from `settings` (a resume with `--allow-config-change` applies new ones from
        `step` on; unchanged, they are the same)."""
        if "optimizer" in state:
            dist.load_full_state(self.model, self.optimizer, None, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        s = self.settings
        decay, no_decay = self.optimizer.param_groups
        decay["weight_decay"], no_decay["weight_decay"] = s.weight_decay, 0.0
        self.scheduler.base_lrs = [s.learning_rate] * len(self.optimizer.param_groups)
        warmup = int(s.warmup_ratio * self.steps)
        for group in self.optimizer.param_groups:
            group["betas"] = tuple(s.betas)
            group["initial_lr"] = s.learning_rate
            group["lr"] = s.learning_rate * lr_factor(step, self.steps, warmup, s.schedule)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
