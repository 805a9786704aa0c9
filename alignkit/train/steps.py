"""The pieces of a training step the loop and the recipes share: which examples form each
micro-batch (`BatchPlan`), the learning-rate schedule, and running a list of batches through a
recipe's loss (`run_batches`)."""

from __future__ import annotations

import math

import torch

from alignkit.config import RunConfig
from alignkit.data.batching import cut_by_budget, example_tokens


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


class BatchPlan:
    """Item indices of each global micro-batch: epochs follow each other, each reshuffled, and
    each is cut into micro-batches either by count (`batch_size` examples) or, when `max_tokens`
    is set, by token budget (consecutive examples while their tokens fit; an example over the
    budget goes alone).

    A pure function of its arguments, so a resumed run sees exactly the batches it would have."""

    def __init__(
        self, tokens: list, batch_size: int, max_tokens: int | None = None, seed: int = 0, shuffle: bool = True
    ):
        self.tokens, self.batch_size, self.max_tokens = list(tokens), batch_size, max_tokens
        self.seed, self.shuffle = seed, shuffle
        self._epochs: dict[int, list[list[int]]] = {}  # epoch -> its micro-batches' item indices

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
            return [order[j : j + self.batch_size] for j in range(0, len(order), self.batch_size)]
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


def eval_batches(cfg: RunConfig, recipe, items: list) -> list:
    """The held-out items in evaluation micro-batches (`train.eval_batch_size`, or the token budget)."""
    plan = batch_plan(cfg, recipe, items, cfg.train.eval_batch_size or cfg.train.batch_size, shuffle=False)
    return [[items[i] for i in idx] for idx in plan.epoch(0)] if items else []


def forward_pieces(items: list, budget: int | None, shared: bool) -> list:
    """Split one micro-batch's items into consecutive pieces of at most `budget` tokens (an example
    over the budget is a piece of its own); no budget: one piece."""
    if not budget:
        return [items]
    return cut_by_budget(items, [example_tokens(it, shared) for it in items], budget)


def total_steps(cfg: RunConfig, plan: BatchPlan, repeat: int = 1, world_size: int = 1) -> int:
    """Optimizer steps of the run; `repeat`: steps taken on each batch (online iterations); each
    step takes `grad_accum` micro-batches on each of `world_size` processes."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * plan.per_epoch * repeat / (t.grad_accum * world_size)))


class _Meter:
    """Sums per-example metric tensors over micro-batches; syncs with the host once, at the end."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums.get(k, 0) + v.sum()
            self.counts[k] = self.counts.get(k, 0) + v.numel()

    def means(self, dist=None) -> dict:
        """Means over everything added, on every process when `dist` (an alignkit Dist) is given:
        sums and counts are added up across processes, each key over the processes that have it."""
        if dist is None or not dist.enabled:
            return {k: float(self.sums[k]) / max(1, self.counts[k]) for k in self.sums}
        keys = sorted({k for ks in dist.gather_objects(sorted(self.sums)) for k in ks})
        local = torch.tensor(
            [[float(self.sums.get(k, 0.0)) for k in keys], [float(self.counts.get(k, 0)) for k in keys]],
            dtype=torch.float64,
        )
        total = dist.all_sum(local)
        return {k: float(total[0, i]) / max(1.0, float(total[1, i])) for i, k in enumerate(keys)}


def run_batches(
    recipe,
    model,
    batches: list,
    split: str,
    device,
    autocast,
    backward: bool,
    track_grads: list | None = None,
    dist=None,
) -> tuple[dict, list, list]:
    """Loss (normalised over all `batches` of every process) and mean metrics; backpropagates when asked.

    Each batch's loss is a sum; `recipe.weight` gives its normaliser. With several processes the
    normalisers are added up across them, and each process's loss is scaled by the number of
    processes, because FSDP and DDP average gradients: the update is then that of one process
    holding every process's batches. Also returns each batch's loss and, with `track_grads` (the
    trained parameters), the norm of the accumulated gradient after each batch: the first
    non-finite one names the batch that broke the step."""
    local_weight = sum(recipe.weight(b) for b in batches)
    context = dist.context if dist is not None else 1  # a context group's processes hold the same batches
    total_weight = (
        float(dist.all_sum(torch.tensor([float(local_weight)], dtype=torch.float64))[0]) / context
        if dist is not None and dist.enabled
        else float(local_weight)
    )
    # FSDP and DDP average over every process; under context parallelism a group's gradients are
    # parts of one sequence's, to be added: the same factor of world_size covers both
    scale = (dist.world_size if dist is not None else 1) / max(1.0, total_weight)
    meter, losses, norms = _Meter(), [], []
    for batch in batches:
        with autocast():
            loss, metrics = recipe.loss(model, batch.to(device), split)
        if backward:
            (loss * scale).backward()
        losses.append(loss.detach().float())
        grads = [p.grad for p in track_grads or () if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads) if grads else None)
        meter.add(metrics)
    out = meter.means(dist)
    loss_sum = torch.stack(losses).sum().double().reshape(1) if losses else torch.zeros(1, dtype=torch.float64)
    if dist is not None and dist.enabled:
        loss_sum = dist.all_sum(loss_sum.to(device)) / context
    out["loss"] = float(loss_sum[0]) / max(1.0, total_weight)
    return out, [float(x) for x in losses], [None if n is None else _float(n) for n in norms]


def _float(t) -> float:
    return float(t.full_tensor()) if hasattr(t, "full_tensor") else float(t)
