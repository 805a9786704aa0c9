"""Where a non-finite loss or gradient first shows, in words a user can act on: the micro-batch,
the process and the examples (file:line) it came from (`train.on_nonfinite`)."""

from __future__ import annotations

import math


def locate(data, losses: list, norms: list, batch_items: list) -> tuple[int, str, list]:
    """(index of this process's micro-batch that first went non-finite, why, its sources), or
    (-1, "", the last micro-batch's sources) when only the step's gradient norm shows it.
    `losses` and `norms`: per micro-batch (the norm after it, or None)."""
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        if not math.isfinite(loss):
            return i, f"its loss is {loss}", data.sources_of("train", batch_items[i])
        if norm is not None and not math.isfinite(norm):
            return i, f"the gradient after it is {norm}", data.sources_of("train", batch_items[i])
    return -1, "", data.sources_of("train", batch_items[-1])


def describe(step: int, metrics: dict, found: list, micro_batches: int) -> str:
    """One message from every process's `locate`: the first process and micro-batch where it shows."""
    for rank, (a, why, sources) in enumerate(found):
        if a >= 0:
            where = f"Micro-batch {a + 1} of {micro_batches}" + (f" on process {rank}" if len(found) > 1 else "")
            break
    else:
        where, why = f"Micro-batch {micro_batches} of {micro_batches}", "the gradient norm over the step is not finite"
        sources = [src for _, _, srcs in found for src in srcs]
    shown = ", ".join(sources[:20]) + (f" and {len(sources) - 20} more" if len(sources) > 20 else "")
    return (
        f"step {step}: the loss or gradient is not finite (loss {metrics['loss']}, grad_norm "
        f"{metrics['grad_norm']}). {where} is the first where it shows ({why}); its examples: {shown}."
    )
