"""DPO and its closest relatives: losses on the reference-adjusted log-ratio of a pair.

Notation (all [B], summed over completion tokens):
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
the implicit reward of a completion is beta * (log pi - log pi_ref) (DPO paper, eq. 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.errors import ConfigError
from alignkit.losses.registry import register


def implicit_reward_metrics(chosen_rewards, rejected_rewards) -> dict:
    """Per-example reward metrics every pair loss reports (all [B])."""
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().detach(),
    }


def log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """Attach the implicit-reward metrics (DPO eq. 5) to per-example losses."""
    return losses, implicit_reward_metrics(
        beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)
    )


@register(
    "dpo",
    summary="Direct Preference Optimization: -log sigmoid(beta * h), with optional label smoothing.",
    citation="Rafailov et al., Direct Preference Optimization: Your Language Model is Secretly a Reward Model, arXiv "
    "2305.18290",
)
def dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)   (DPO eq. 7).

    eps = `label_smoothing` > 0 is conservative DPO (cDPO; Mitchell, "A note on DPO with noisy
    preferences", 2023): the label is assumed flipped with probability eps."""
    h = log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


@register(
    "cdpo",
    summary="Conservative DPO: DPO with label smoothing eps (labels flipped with probability eps).",
    citation="Mitchell, A note on DPO with noisy preferences & relationship to IPO (2023); see also arXiv 2403.00409",
)
def cdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
):
    """cDPO = `dpo` with label smoothing (a composition, not a copy)."""
    return dpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )


@register(
    "ipo",
    summary="Identity Preference Optimization: squared loss pulling h towards 1 / (2 beta).",
    citation="Azar et al., A General Theoretical Paradigm to Understand Learning from Human Preferences, arXiv "
    "2310.12036",
)
def ipo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """loss = (h - 1 / (2 * beta))^2   (IPO paper, eq. 17, with tau = beta).

    h uses summed sequence log-probs as in the paper; TRL averages them per token instead, which
    changes the effective beta with the completion length."""
    h = log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


@register(
    "hinge",
    summary="SLiC-style hinge on the reference-adjusted margin: max(0, 1 - beta * h).",
    citation="Zhao et al., SLiC-HF: Sequence Likelihood Calibration with Human Feedback, arXiv 2305.10425",
)
def hinge(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """loss = max(0, 1 - beta * h).

    Departure: SLiC-HF's calibration loss is max(0, delta - log pi(y_w) + log pi(y_l)) with no
    reference and a separate regulariser; like the DPO paper's comparison (and TRL), we apply the
    hinge to the reference-adjusted margin, with delta = 1 / beta."""
    h = log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * h)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


def mean_token_logps(logps, counts):
    """Average log-prob per scored token, logps / |y| ([B]). An empty completion (count 0, logps 0)
    gives 0 rather than 0/0."""
    return logps / counts.clamp(min=1)


@register(
    "robust_dpo",
    summary="Provably robust DPO: unbiased loss under labels flipped with known probability eps.",
    citation="Chowdhury et al., Provably Robust DPO: Aligning Language Models with Noisy Feedback, arXiv 2403.00409",
)
def robust_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
):
    """loss = ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)
    (the rDPO loss of arXiv 2403.00409: the de-biased BCE for a known flip rate eps, whose
    expectation over noisy labels equals the clean-label DPO loss).
    eps = `label_smoothing` must lie in [0, 0.5); eps = 0 is DPO.

    Unlike cDPO (which moves the target towards 1/2), the eps term enters with a minus sign, so a
    single example's loss can be negative. Default eps = 0.1 (our choice, as for `cdpo`; TRL's
    `loss_type="robust"` defaults to 0, i.e. plain DPO)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"`loss.label_smoothing` of robust_dpo must be in [0, 0.5); got {label_smoothing}.")
    h = log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


@register(
    "rpo",
    summary="Iterative RPO: DPO plus alpha times the length-normalised NLL of the chosen response.",
    citation="Pang et al., Iterative Reasoning Preference Optimization, arXiv 2404.19733",
)
def rpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_counts,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
):
    """loss = -log sigmoid(beta h) + alpha * (-log pi(y_w|x) / |y_w|)
    (the DPO+NLL loss of arXiv 2404.19733).

    Departures, both deliberate:
    - the paper writes L_NLL + alpha * L_DPO; we put `alpha` on the NLL term (TRL's `rpo_alpha`
      convention) so that alpha = 0 is exactly `dpo`. At the paper's alpha = 1 the two agree.
    - |y_w| is the number of scored completion tokens of the chosen response (`chosen_counts`); as we
      read it the paper divides by the whole sequence length, prompt included, which our
      pipeline does not score. TRL instead averages over all chosen tokens of the batch."""
    losses, metrics = dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta)
    nll = -mean_token_logps(policy_chosen_logps, chosen_counts)
    metrics["nll"] = nll.detach()
    return losses + alpha * nll, metrics


@register(
    "dpop",
    summary="DPO-Positive (Smaug): DPO with a penalty when log pi(chosen) falls below the reference.",
    citation="Pal et al., Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive, arXiv 2402.13228",
)
def dpop(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    lambda_penalty: float = 50.0,
):
    """loss = -log sigmoid(beta * (h - lambda * max(0, log pi_ref(y_w|x) - log pi(y_w|x))))
    (the DPOP loss of arXiv 2402.13228: the penalty sits inside the sigmoid, scaled by beta like h).
    Default lambda = 50, the value the paper uses for its Smaug models. The penalty has a kink where
    pi(y_w) = pi_ref(y_w)."""
    h = log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    penalty = torch.relu(ref_chosen_logps - policy_chosen_logps)
    losses = -F.logsigmoid(beta * (h - lambda_penalty * penalty))
    losses, metrics = with_rewards(
        losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    metrics["dpop/penalty"] = penalty.detach()
    return losses, metrics


@register(
    "rdpo",
    summary="Length-regularised DPO (R-DPO): the length gap alpha * (len_w - len_l) joins the margin.",
    citation="Park et al., Disentangling Length from Quality in Direct Preference Optimization, arXiv 2403.19159",
)
def rdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_counts,
    rejected_counts,
    *,
    beta: float = 0.1,
    alpha: float = 0.05,
):
    """loss = -log sigmoid(beta h + alpha * (|y_w| - |y_l|))   (the R-DPO loss of arXiv 2403.19159).

    The sign follows from the regularised objective max E[r - alpha |y|] - beta KL: the true reward
    is beta log(pi/pi_ref) + alpha |y| + const, so a longer chosen response already "explains" part
    of the preference and the policy is pushed less to favour length. |y| counts scored completion
    tokens. The paper sweeps alpha per dataset; 0.05 is our default, to be tuned."""
    h = log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    length_gap = (chosen_counts - rejected_counts).to(h.dtype)
    losses = -F.logsigmoid(beta * h + alpha * length_gap)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
