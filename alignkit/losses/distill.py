"""Distillation losses: per-position divergences between a student's and a teacher's next-token
distributions, and the advantage of a preference-trained teacher (`recipe: distill`).

Pure functions, like the rest of `alignkit.losses`, registered with data kind "distill". Unlike the
other kinds, their inputs are whole distributions: `student_logps`, `teacher_logps` and
`teacher_ref_logps` are [N, V] log-probabilities (each row a log-softmax over the vocabulary) at N
completion positions of sampled sequences. Each returns (per-position loss [N], metrics {name:
[N]}); the recipe computes them chunk by chunk over positions (so no [tokens, vocab] tensor of
the whole batch exists) and reduces them per sequence with `online.aggregation`.

Notation (GKD, Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv 2306.13649): P = p_T, the teacher's distribution; Q = q_theta, the
student's. Forward KL is KL(P || Q) (mode-covering, the supervised-KD objective), reverse KL is
KL(Q || P) (mode-seeking). Rows where a probability is exactly 0 contribute 0 * log 0 = 0.
Everything is computed in the dtype of the inputs (float32 in training; the tests pin float64).
"""

from __future__ import annotations

import math

import torch

from alignkit.losses.registry import register

GKD = (
    "Agarwal et al., On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes "
    "(GKD), arXiv 2306.13649"
)


def _check(who: str, *logps: torch.Tensor) -> None:
    """Shapes only (no value checks: they would sync the device)."""
    first = logps[0]
    if first.ndim != 2:
        raise ValueError(
            f"{who}: log-probabilities must be [N, V] (positions x vocabulary); got shape {tuple(first.shape)}."
        )
    for t in logps[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{who}: student and teacher distributions must have the same shape [N, V]; got "
                f"{tuple(first.shape)} and {tuple(t.shape)} (do the models share a vocabulary?)."
            )


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) per row of [N, V] log-probabilities -> [N]; a term with A(v) = 0 is 0."""
    p_a = logp_a.exp()
    return torch.where(p_a > 0, p_a * (logp_a - logp_b), torch.zeros_like(p_a)).sum(-1)


@register(
    "reverse_kl",
    summary="On-policy distillation: per-token reverse KL(student || teacher) over the vocabulary.",
    citation=GKD,
    data="distill",
    reduction="token",
)
def reverse_kl(student_logps, teacher_logps):
    """Per-position reverse KL from the student to the teacher over the whole vocabulary:

        loss_t = KL(q_theta || p_T)(. | y_<t, x) = sum_v q_theta(v) (log q_theta(v) - log p_T(v))

    (GKD, arXiv 2306.13649: its token-level discrepancy D(p_T || q_theta)(y | x) = 1/L_y sum_t
    D(p_T(. | y_<t, x) || q_theta(. | y_<t, x)) with D the reverse KL, one of the divergences it
    studies; mode-seeking: the student pays for mass where the teacher puts little). Its gradient
    w.r.t. the student's logit z_v is q(v) (log q(v) - log p(v) - loss_t): the exact gradient of
    the KL at this position, not a single-sample estimate.

    Inputs [N, V]; returns (loss [N], {}) (the loss is the metric). No departure from the paper at
    the position level; the recipe averages positions per sequence and then over sequences (GKD's
    1/L_y sum over the sequence, with `online.aggregation: grpo`)."""
    _check("reverse_kl", student_logps, teacher_logps)
    return _kl(student_logps, teacher_logps), {}


@register(
    "generalized_jsd",
    summary="GKD's generalized Jensen-Shannon divergence JSD(beta) between teacher and student, per token.",
    citation=GKD,
    data="distill",
    reduction="token",
)
def generalized_jsd(student_logps, teacher_logps, *, beta: float = 0.5):
    """Per-position generalized JSD as GKD defines it (arXiv 2306.13649, JSD(beta)), with P = p_T
    the teacher and Q = q_theta the student:

        M           = beta * P + (1 - beta) * Q
        JSD_beta    = beta * KL(P || M) + (1 - beta) * KL(Q || M)

    For 0 < beta < 1 it is bounded (by -beta log beta - (1 - beta) log(1 - beta) <= ln 2). GKD
    notes (after Huszar, 2015) that it behaves like the forward KL(P || Q) for beta near 0 and like
    the reverse KL(Q || P) for beta near 1. Its value vanishes at both ends, so the exact statement
    is about the scaled divergence: JSD_beta / beta -> KL(P || Q) as beta -> 0 (JSD_beta = beta
    KL(P || Q) + O(beta^2)) and JSD_beta / (1 - beta) -> KL(Q || P) as beta -> 1; the gradients
    scale alike. We therefore define the ends as these limits (as TRL's GKDTrainer does):

        beta = 0:  KL(P || Q) = KL(teacher || student)   forward KL (supervised KD's loss)
        beta = 1:  KL(Q || P) = KL(student || teacher)   reverse KL (= `reverse_kl`)

    Departure: the ends are these renormalised limits, not JSD_beta's value (0) there, so that
    `beta: 0` and `beta: 1` give the two KL forms GKD names. log M is computed stably as
    logsumexp(log beta + log P, log(1 - beta) + log Q). Inputs [N, V]; returns (loss [N], {})."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"generalized_jsd: `beta` must be in [0, 1] (0: forward KL(teacher || student), "
            f"1: reverse KL(student || teacher)); got {beta}."
        )
    _check("generalized_jsd", student_logps, teacher_logps)
    if beta == 0.0:
        loss = _kl(teacher_logps, student_logps)
    elif beta == 1.0:
        loss = _kl(student_logps, teacher_logps)
    else:
        log_m = torch.logsumexp(
            torch.stack([teacher_logps + math.log(beta), student_logps + math.log1p(-beta)]), dim=0
        )  # [N, V]
        loss = beta * _kl(teacher_logps, log_m) + (1.0 - beta) * _kl(student_logps, log_m)
    return loss, {}


@register(
    "adpa",
    summary="Advantage-guided distillation (ADPA): raise the student's expected teacher advantage "
    "log pi_T - log pi_T_ref per token.",
    citation="Gao et al., Advantage-Guided Distillation for Preference Alignment in Small Language Models "
    "(ADPA), arXiv 2502.17927",
    data="distill",
    reduction="token",
)
def adpa(student_logps, teacher_logps, teacher_ref_logps):
    """Advantage-guided distillation (ADPA; Gao et al., arXiv 2502.17927, ICLR 2025). The teacher
    pi_T is a DPO-trained model and pi_T_ref the model it was trained from. DPO's policy is the
    optimum of a token-level KL-regularised RL problem in which beta * log pi_T(a|s) / pi_T_ref(a|s)
    is the advantage of token a in state s (Rafailov et al., "From r to Q*", arXiv 2404.12358); ADPA
    hands this advantage to the student for every token of the vocabulary at every position of
    the student's own responses:

        A(s_t, a) = log pi_T(a | s_t) - log pi_T_ref(a | s_t)          for every token a
        loss_t    = - sum_a q_theta(a | s_t) * A(s_t, a)                (= -E_{a ~ q_theta}[A(s_t, a)])

    a distribution-level reward: the student moves probability towards the tokens the teacher's
    preference training made more likely, and away from those it made less likely. The gradient
    w.r.t. the student's logit z_a is -q(a) (A(a) - sum_b q(b) A(b)): the softmax centres the
    advantage, so no baseline is needed.

    What this follows, and departures. The formula is the ADPA term as the authors' released
    training code computes it (`get_reverse_ce`: minus the sum over the vocabulary of the student's
    probabilities times the per-token margin log p_dpo - log p_ref, averaged over response tokens);
    the paper's equation numbers could not be checked when this was written. Departures: (1) the
    DPO temperature beta is not applied (the released code does not either; it is a constant factor
    that the term's `weight` in `losses` absorbs); (2) every token of the vocabulary is used, where
    the released code keeps the teacher's top-k tokens with a probability floor of 1e-7; (3) the
    paper scores responses sampled once from the initial (SFT or DCKD) student, with an optional
    sequence-level importance weight; `recipe: distill` samples them from the current student at
    every rollout (on-policy, as GKD), where that weight is 1; (4) the paper combines ADPA with
    other terms (its code: an SFT term on preferred responses); here terms combine through
    `losses`, e.g. with `reverse_kl` to the teacher as an anchor, since ADPA alone has no term
    keeping the student near any distribution.

    Inputs [N, V]; returns (loss [N], {"advantage": [N]}), the student's expected advantage."""
    _check("adpa", student_logps, teacher_logps, teacher_ref_logps)
    q = student_logps.exp()
    advantage = teacher_logps - teacher_ref_logps  # [N, V]
    expected = torch.where(q > 0, q * advantage, torch.zeros_like(q)).sum(-1)  # [N]
    return -expected, {"advantage": expected.detach()}
