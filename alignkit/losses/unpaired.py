"""Losses for data that is not (chosen, rejected) pairs.

- data="unpaired" (KTO, BCO): each example is one (prompt, completion) with a boolean label,
  True = desirable (thumbs up), False = undesirable. Inputs per example ([B]):
    policy_logps, ref_logps   summed log-probs of the completion under the policy / reference
    labels                    bool, True for desirable
  plus each method's own extra input, documented on the function.
- data="negative" (D2O): each example is a prompt, one human-labelled negative response and K
  responses sampled from the model; inputs are [B] for the negative and [B, K] for the samples.

r = log pi(y|x) - log pi_ref(y|x) throughout; the implicit reward is beta * r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.dpo import implicit_reward_metrics
from alignkit.losses.registry import register


@register(
    "kto",
    summary="Kahneman-Tversky Optimization: unpaired thumbs-up/down, rewards judged against a KL anchor.",
    citation="Ethayarajh et al., KTO: Model Alignment as Prospect Theoretic Optimization, arXiv 2402.01306",
    data="unpaired",
)
def kto(
    policy_logps,
    ref_logps,
    labels,
    policy_kl_logps,
    ref_kl_logps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """loss = lambda_D * (1 - sigmoid(beta (r - z0)))   if desirable
            = lambda_U * (1 - sigmoid(beta (z0 - r)))   if undesirable
    i.e. lambda_y - v(x, y) of the KTO paper (arXiv 2402.01306, the KTO loss), with the reference
    point z0 = max(0, mean_i(policy_kl_logps_i - ref_kl_logps_i)), detached (no gradient flows
    through z0, as in the paper).

    Extra inputs the recipe must supply ([B]): policy_kl_logps and ref_kl_logps, the summed
    log-probs under policy and reference of a *mismatched* completion for each prompt, y'_i =
    y_{(i+1) mod B} (the completion of another example in the micro-batch, as TRL builds its KL
    batch). The policy pass for them may run under torch.no_grad().

    Departure: z0 is the mean over the micro-batch the loss sees; TRL also averages it across data
    parallel ranks. lambda_D / lambda_U (`desirable_weight` / `undesirable_weight`) should be set so
    that lambda_D n_D / (lambda_U n_U) lies in [1, 4/3] (paper's advice) when the classes are
    imbalanced."""
    labels = labels.bool()
    r = policy_logps - ref_logps
    z0 = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    losses = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    rewards = (beta * r).detach()
    metrics = {
        "rewards": rewards,
        "kl": torch.broadcast_to(z0, r.shape).to(r.dtype),
        # the reward is on the right side of the anchor for this example's label
        "rewards/accuracies": (labels == (r > z0)).to(r.dtype),
    }
    return losses, metrics


@register(
    "bco",
    summary="Binary Classifier Optimization: unpaired labels, a logistic classifier on shifted rewards.",
    citation="Jung et al., Binary Classifier Optimization for Large Language Model Alignment, arXiv 2404.04656",
    data="unpaired",
)
def bco(policy_logps, ref_logps, labels, reward_shift, *, beta: float = 0.1):
    """loss = -log sigmoid(beta r - delta)      if desirable
            = -log sigmoid(-(beta r - delta))   if undesirable
    (the BCO loss of arXiv 2404.04656: binary cross-entropy of the classifier sigmoid(beta r - delta)).

    Extra input the recipe must supply: `reward_shift` ([B] or a scalar tensor), delta = the running
    mean of beta * r over all examples seen so far (desirable and undesirable alike), treated as a
    constant. The metric `bco/reward_mean` is beta * r per example: its mean over the step is the
    batch mean reward to fold into the running mean (TRL folds the current batch in before the loss;
    passing the mean of previous steps lags by one step, and both start at 0 from the reference).

    Departure: the paper's underlying-distribution-matching (UDM) importance weights, which need a
    separate prompt classifier, are not part of this loss."""
    labels = labels.bool()
    rewards = beta * (policy_logps - ref_logps)
    delta = reward_shift.detach()
    logits = rewards - delta
    losses = torch.where(labels, -F.logsigmoid(logits), -F.logsigmoid(-logits))
    metrics = {
        "rewards": rewards.detach(),
        "bco/reward_mean": rewards.detach(),
        "bco/reward_shift": torch.broadcast_to(delta, rewards.shape).to(rewards.dtype),
        "rewards/accuracies": (labels == (logits > 0)).to(rewards.dtype),
    }
    return losses, metrics


@register(
    "d2o",
    summary="D2O: align with negatives only; K self-generated samples act as the positive distribution.",
    citation="Duan et al., Negating Negatives: Alignment with Human Negative Samples via Distributional "
    "Dispreference Optimization, arXiv 2403.03419",
    data="negative",
)
def d2o(
    policy_rejected_logps,
    ref_rejected_logps,
    policy_sample_logps,
    ref_sample_logps,
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
):
    """loss = -log sigmoid(beta/K sum_i log(pi(y_i|x) / pi_r-(y_i|x)) - alpha log(pi(y_l|x) / pi_r+(y_l|x)))
    (the D2O loss of arXiv 2403.03419): y_l the human-labelled negative, y_1..y_K responses sampled
    for the same prompt. The mean over the K samples is a distributional "positive": D2O pushes the
    negative below the model's own distribution rather than below one noisy positive.

    Inputs: policy_rejected_logps, ref_rejected_logps [B] (the negative under pi and pi_r+),
    policy_sample_logps, ref_sample_logps [B, K] (the samples under pi and pi_r-), all summed over
    completion tokens. The paper lets the two references differ (pi_r+ for the negative, pi_r- for
    the samples); with a single frozen reference (the initial model, which also generates the K
    samples before training, as in the paper's offline setting) both are that model.

    Defaults beta = alpha = 0.1 are our choice; the paper tunes them. Rewards
    reported: beta * mean_i r(y_i) as "chosen" and alpha * r(y_l) as "rejected", so their margin
    is the logit."""
    sample_rewards = beta * (policy_sample_logps - ref_sample_logps).mean(dim=-1)
    negative_rewards = alpha * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(sample_rewards - negative_rewards)
    return losses, implicit_reward_metrics(sample_rewards, negative_rewards)
