"""DPO and its closest relatives: losses on the reference-adjusted log-ratio of a pair.

Notation (all [B], summed over completion tokens):
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
the implicit reward of a completion is beta * (log pi - log pi_ref) (DPO paper, eq. 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.registry import register


def implicit_reward_metrics(chosen_rewards, rejected_rewards) -> dict:
    """Per-example reward metrics every pair loss reports (all [B])."""
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().detach(),
    }


def _log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """Attach the implicit-reward metrics (DPO eq. 5) to per-example losses."""
    return losses, implicit_reward_metrics(beta * (policy_chosen_logps - ref_chosen_logps),
                                           beta * (policy_rejected_logps - ref_rejected_logps))


@register(
    "dpo",
    summary="Direct Preference Optimization: -log sigmoid(beta * h), with optional label smoothing.",
    citation="Rafailov et al., Direct Preference Optimization: Your Language Model is Secretly a Reward Model, arXiv 2305.18290",
)
def dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
        beta: float = 0.1, label_smoothing: float = 0.0):
    """loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)   (DPO eq. 7).

    eps = `label_smoothing` > 0 is conservative DPO (cDPO; Mitchell, "A note on DPO with noisy
    preferences", 2023): the label is assumed flipped with probability eps."""
    h = _log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return _with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps)


@register(
    "cdpo",
    summary="Conservative DPO: DPO with label smoothing eps (labels flipped with probability eps).",
    citation="Mitchell, A note on DPO with noisy preferences & relationship to IPO (2023); see also arXiv 2403.00409",
)
def cdpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
         beta: float = 0.1, label_smoothing: float = 0.1):
    """cDPO = `dpo` with label smoothing (a composition, not a copy)."""
    return dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               beta=beta, label_smoothing=label_smoothing)


@register(
    "ipo",
    summary="Identity Preference Optimization: squared loss pulling h towards 1 / (2 beta).",
    citation="Azar et al., A General Theoretical Paradigm to Understand Learning from Human Preferences, arXiv 2310.12036",
)
def ipo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
        beta: float = 0.1):
    """loss = (h - 1 / (2 * beta))^2   (IPO paper, eq. 17, with tau = beta).

    h uses summed sequence log-probs as in the paper; TRL averages them per token instead, which
    changes the effective beta with the completion length."""
    h = _log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return _with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps)


@register(
    "hinge",
    summary="SLiC-style hinge on the reference-adjusted margin: max(0, 1 - beta * h).",
    citation="Zhao et al., SLiC-HF: Sequence Likelihood Calibration with Human Feedback, arXiv 2305.10425",
)
def hinge(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
          beta: float = 0.1):
    """loss = max(0, 1 - beta * h).

    Departure: SLiC-HF's calibration loss is max(0, delta - log pi(y_w) + log pi(y_l)) with no
    reference and a separate regulariser; like the DPO paper's comparison (and TRL), we apply the
    hinge to the reference-adjusted margin, with delta = 1 / beta."""
    h = _log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * h)
    return _with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps)
