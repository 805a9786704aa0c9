"""Supervised fine-tuning: negative log-likelihood of the completion tokens."""

from __future__ import annotations

from alignkit.losses.registry import register


@register(
    "sft",
    summary="Negative log-likelihood of completion tokens, averaged over all tokens of the step.",
    citation="Standard maximum likelihood; e.g. Ouyang et al., Training language models to follow instructions, "
    "arXiv 2203.02155",
    data="sft",
    reduction="token",
)
def sft(policy_logps, counts):
    """loss_i = -sum_t log pi(y_t | x, y_<t); the loop divides the step's sum by its token count,
    so every completion token weighs the same whatever the batch and accumulation split."""
    return -policy_logps, {"nll_per_token": (-policy_logps / counts.clamp(min=1)).detach()}
