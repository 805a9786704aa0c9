"""Reference-free pair losses: SimPO, ORPO and CPO need no reference model (no `ref_*` inputs),
so the recipe skips the reference pass and its cache entirely.

Notation: logps are summed over completion tokens ([B]); counts are the scored token counts
|y| ([B], long); the average log-prob is logps / |y| (`mean_token_logps`). Each loss reports the
reward its paper (or, where the paper has none, TRL) defines, through `implicit_reward_metrics`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignkit.losses.dpo import implicit_reward_metrics, mean_token_logps
from alignkit.losses.registry import register


@register(
    "simpo",
    summary="SimPO: reference-free, length-normalised rewards beta * mean log-prob with a margin gamma.",
    citation="Meng et al., SimPO: Simple Preference Optimization with a Reference-Free Reward, arXiv 2405.14734",
)
def simpo(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_counts,
    rejected_counts,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
):
    """loss = -log sigmoid(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma)
    (the SimPO objective of arXiv 2405.14734), reward r(y) = beta * log pi(y|x) / |y|.

    The margin is given as gamma = gamma_beta_ratio * beta, the parameterisation of the authors'
    code; defaults beta = 2.0 and gamma / beta = 0.5 (gamma = 1.0) are from their Llama-3-8B-Base
    recipe. The official code's optional label smoothing is left out."""
    chosen_rewards = beta * mean_token_logps(policy_chosen_logps, chosen_counts)
    rejected_rewards = beta * mean_token_logps(policy_rejected_logps, rejected_counts)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma_beta_ratio * beta)
    return losses, implicit_reward_metrics(chosen_rewards, rejected_rewards)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler, "Accurately computing
    log(1 - exp(-|a|))", 2012): log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2. Each branch
    sees only its own half of the range, so neither produces an inf that `where` would turn into
    a NaN gradient."""
    near_zero = x > -math.log(2.0)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(x.clamp(min=-math.log(2.0)))),
        torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0)))),
    )


def log_odds(mean_logps):
    """log(P / (1 - P)) with P = exp(mean log-prob) (ORPO's odds). P = 1 exactly would give an
    infinite log odds, so the mean log-prob is capped at -eps of its dtype (float32 or wider):
    a model that sure of a response gets log odds ~16 (float32) and no gradient through this term."""
    if mean_logps.dtype in (torch.float16, torch.bfloat16):
        mean_logps = mean_logps.float()  # log odds near P = 1 needs more than 8 mantissa bits
    x = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).eps)
    return x - log1mexp(x)


@register(
    "orpo",
    summary="ORPO: NLL of the chosen response plus lambda times a log-odds-ratio preference term.",
    citation="Hong et al., ORPO: Monolithic Preference Optimization without Reference Model, arXiv 2403.07691",
)
def orpo(policy_chosen_logps, policy_rejected_logps, chosen_counts, rejected_counts, *, beta: float = 0.1):
    """loss = -log pi(y_w|x) / |y_w| + lambda * -log sigmoid(log odds(y_w) - log odds(y_l))
    with odds(y) = P(y|x) / (1 - P(y|x)) and P(y|x) = exp(log pi(y|x) / |y|), the length-normalised
    likelihood (the ORPO objective of arXiv 2403.07691). lambda is `beta` (TRL's name for it); default 0.1 as in the
    paper.

    Departures: the NLL is normalised per example by its own scored token count, while the paper
    (and TRL) average over all chosen tokens of the batch. The reported reward is beta * mean
    log-prob (TRL's; the paper defines none). See `log_odds` for the cap at P = 1."""
    mean_w = mean_token_logps(policy_chosen_logps, chosen_counts)
    mean_l = mean_token_logps(policy_rejected_logps, rejected_counts)
    log_odds_ratio = log_odds(mean_w) - log_odds(mean_l)
    nll = -mean_w
    losses = nll + beta * -F.logsigmoid(log_odds_ratio).to(nll.dtype)
    metrics = implicit_reward_metrics(beta * mean_w, beta * mean_l)
    metrics["nll"] = nll.detach()
    metrics["log_odds_ratio"] = log_odds_ratio.detach()
    return losses, metrics


@register(
    "cpo",
    summary="Contrastive Preference Optimization: reference-free DPO term plus NLL of the chosen response.",
    citation="Xu et al., Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine "
    "Translation, arXiv 2401.08417",
)
def cpo(policy_chosen_logps, policy_rejected_logps, chosen_counts, *, beta: float = 0.1, alpha: float = 1.0):
    """loss = -log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x))) + alpha * -log pi(y_w|x) / |y_w|
    (CPO, arXiv 2401.08417: L_prefer, DPO with a uniform reference, plus the NLL regulariser).

    Departure: the paper's NLL term is the summed sequence log-likelihood; we divide it by the
    chosen response's scored token count (TRL averages over the batch's chosen tokens), so that
    its scale does not grow with length. `alpha` weighs it (TRL's `cpo_alpha`; 1 in the paper).
    The reward reported is beta * log pi(y|x), the paper's implicit reward with a uniform reference."""
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    nll = -mean_token_logps(policy_chosen_logps, chosen_counts)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards) + alpha * nll
    metrics = implicit_reward_metrics(chosen_rewards, rejected_rewards)
    metrics["nll"] = nll.detach()
    return losses, metrics
