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

    @classmethod
    def build(cls, name: str, model, settings: OptimSettings, steps: int, tokenizer=None) -> "TrainedModule":
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm weights
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=tuple(settings.betas), foreach=None)
        warmup = int(settings.warmup_ratio * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, steps, warmup, settings.schedule))
        return cls(name, model, settings, optimizer, scheduler, steps, tokenizer)

    @property
    def params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def clip(self) -> float:
        """Clip the gradient norm to `max_grad_norm` (0: no clipping); the norm before clipping."""
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def step(self, apply: bool) -> None:
        """Apply the update (unless `apply` is False: a skipped step), advance the schedule, zero grads."""
        if apply:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore optimizer and schedule, then set the hyper-parameters from `settings` (a resume
        with `--allow-config-change` applies new ones from `step` on; unchanged, they are the same)."""
        self.optimizer.load_state_dict(state["optimizer"])
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
