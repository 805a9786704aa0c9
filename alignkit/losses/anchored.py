"""Pair losses that judge each response's log-ratio on its own, against an anchor, not only the
margin between the two: NCA, paired BCO, SPPO (hard labels) and APO.

DPO only moves the margin h = r_w - r_l, so both likelihoods may fall together. These losses also
say where each r should go (above 0, above a running mean, to +-1/(2 beta), ...).
Notation (all [B], summed over completion tokens): r = log pi(y|x) - log pi_ref(y|x) for the chosen
(r_w) and rejected (r_l) response; the implicit reward is beta * r (DPO eq. 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.dpo import with_rewards
from alignkit.losses.registry import register


@register(
    "nca",
    summary="Noise Contrastive Alignment (pairwise): raise the chosen reward in absolute terms.",
    citation="Chen et al., Noise Contrastive Alignment of Language Models with Explicit Rewards, arXiv 2402.05369",
)
def nca(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """loss = -log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l)
    (the NCA loss of arXiv 2402.05369 for a preference pair, i.e. K = 2 responses with the preferred
    one as the positive). The first term is optimised against an absolute anchor (0), which is what
    keeps NCA from lowering the chosen likelihood the way DPO can."""
    z_w = beta * (policy_chosen_logps - ref_chosen_logps)
    z_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(z_w) - 0.5 * F.logsigmoid(-z_w) - 0.5 * F.logsigmoid(-z_l)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


@register(
    "bco_pair",
    summary="Binary Classifier Optimization on pairs: chosen vs rejected rewards around a running mean.",
    citation="Jung et al., Binary Classifier Optimization for Large Language Model Alignment, arXiv 2404.04656",
)
def bco_pair(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reward_shift, *, beta: float = 0.1
):
    """loss = -log sigmoid(beta r_w - delta) - log sigmoid(-(beta r_l - delta))
    (the BCO loss of arXiv 2404.04656 with reward shift delta, applied to both halves of a pair).

    `reward_shift` ([B] or a scalar tensor; the recipe supplies it) is delta: the running mean of the
    implicit rewards beta * r over all chosen and rejected responses seen so far. It is treated as a
    constant (detached). The metric `bco/reward_mean` is (beta r_w + beta r_l) / 2 per pair; its mean
    over the step's pairs is the batch mean reward the recipe folds into its running mean.

    Departure: TRL updates the running mean with the current batch before computing the loss; a
    recipe that passes the mean of *previous* steps (0 at the first) lags by one step. At the start,
    where policy = reference and every reward is 0, both give delta = 0."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    delta = reward_shift.detach()
    losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    losses, metrics = with_rewards(
        losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    metrics["bco/reward_mean"] = (0.5 * (chosen_rewards + rejected_rewards)).detach()
    metrics["bco/reward_shift"] = torch.broadcast_to(delta, chosen_rewards.shape).to(chosen_rewards.dtype)
    return losses, metrics


@register(
    "sppo_hard",
    summary="SPPO with hard labels: square loss pulling r_w to +1/(2 beta) and r_l to -1/(2 beta).",
    citation="Wu et al., Self-Play Preference Optimization for Language Model Alignment, arXiv 2405.00675",
)
def sppo_hard(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """loss = (r_w - eta/2)^2 + (r_l + eta/2)^2,  eta = 1 / beta.

    SPPO (arXiv 2405.00675, Algorithm 1) regresses log(pi(y|x) / pi_t(y|x)) onto
    eta * (P(y > pi_t | x) - 1/2), with P estimated by a preference model and pi_t the previous
    iterate (here the reference). The hard-label version sets P = 1 for the chosen and P = 0 for
    the rejected response, giving targets +-eta/2. We parameterise eta = 1/beta, as TRL's
    `sppo_hard` does, so that beta plays its usual role (larger beta, closer to the reference)."""
    target = 0.5 / beta
    r_w = policy_chosen_logps - ref_chosen_logps
    r_l = policy_rejected_logps - ref_rejected_logps
    losses = (r_w - target) ** 2 + (r_l + target) ** 2
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


@register(
    "apo_zero",
    summary="Anchored Preference Optimization (zero): raise the chosen likelihood, lower the rejected.",
    citation="D'Oosterlinck et al., Anchored Preference Optimization and Contrastive Revisions, arXiv 2408.06266",
)
def apo_zero(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """loss = 1 - sigmoid(beta r_w) + sigmoid(beta r_l)   (APO-zero, arXiv 2408.06266).

    For data whose chosen answers are better than the model's own outputs: the chosen likelihood
    is pushed up and the rejected down, each against the reference (anchor r = 0). The paper writes
    -sigmoid(beta r_w) + sigmoid(beta r_l); we add the constant 1 (as TRL does) so the loss lies in
    (0, 2). Gradients are unchanged."""
    z_w = beta * (policy_chosen_logps - ref_chosen_logps)
    z_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = 1 - torch.sigmoid(z_w) + torch.sigmoid(z_l)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


@register(
    "apo_down",
    summary="Anchored Preference Optimization (down): lower both likelihoods, the rejected more.",
    citation="D'Oosterlinck et al., Anchored Preference Optimization and Contrastive Revisions, arXiv 2408.06266",
)
def apo_down(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """loss = sigmoid(beta r_w) + 1 - sigmoid(beta (r_w - r_l))   (APO-down, arXiv 2408.06266).

    For data whose chosen answers are worse than the model's own outputs: the chosen likelihood is
    pushed down, and the rejected further down through the margin term. The paper writes
    sigmoid(beta r_w) - sigmoid(beta (r_w - r_l)); the constant 1 (as in TRL) keeps the loss in
    (0, 2) and does not change gradients."""
    z_w = beta * (policy_chosen_logps - ref_chosen_logps)
    z_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = torch.sigmoid(z_w) + 1 - torch.sigmoid(z_w - z_l)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
