"""Reward-model losses: Bradley-Terry on (possibly several, named) scalar rewards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.registry import register


@register(
    "bradley_terry",
    summary="Bradley-Terry reward model: -log sigmoid(r(chosen) - r(rejected) - margin), per labelled objective.",
    citation="Ouyang et al., Training language models to follow instructions with human feedback, arXiv 2203.02155 "
    "(margin: Touvron et al., Llama 2, arXiv 2307.09288; centering: Eisenstein et al., arXiv 2312.09244)",
    data="reward",
)
def bradley_terry(chosen_rewards, rejected_rewards, labels, margins, *, center_weight: float = 0.0):
    """loss = mean_k over labelled objectives of -log sigmoid(s_k (r_k(x, y_c) - r_k(x, y_r)) - m)
    + center_weight * mean_k (r_k(x, y_c) + r_k(x, y_r))^2.

    Inputs: chosen_rewards, rejected_rewards [B, K] (K named objectives; K = 1 for a plain reward
    model), labels [B, K] in {+1, -1, 0}: +1 when the first completion ("chosen") is better on
    objective k, -1 when it is worse, 0 when the record says nothing about k (it then adds no loss);
    margins [B] (0 without margins): the Llama 2 margin, how much better the better one is.

    The centering term (Eisenstein et al., Helping or Herding? Reward Model Ensembles Mitigate but
    do not Eliminate Reward Hacking, arXiv 2312.09244) pushes each pair's rewards to sum to zero,
    so rewards of different models and runs are on one scale; default 0 (off). Metrics:
    `accuracy` is over labelled (example, objective) cells: the better completion scored higher."""
    labels = labels.to(chosen_rewards.dtype)
    labelled = labels != 0
    n_labelled = labelled.sum(dim=1).clamp(min=1)
    diff = chosen_rewards - rejected_rewards
    bt = -F.logsigmoid(labels * diff - margins[:, None]) * labelled
    losses = bt.sum(dim=1) / n_labelled
    if center_weight:
        losses = losses + center_weight * ((chosen_rewards + rejected_rewards) ** 2).mean(dim=1)
    correct = ((labels * diff > 0) & labelled).to(diff.dtype)
    better = torch.where(labels >= 0, chosen_rewards, rejected_rewards)
    worse = torch.where(labels >= 0, rejected_rewards, chosen_rewards)
    metrics = {
        "accuracy": correct.sum(dim=1)[labelled.any(dim=1)] / n_labelled[labelled.any(dim=1)],
        "rewards/chosen": chosen_rewards[:, 0].detach(),
        "rewards/rejected": rejected_rewards[:, 0].detach(),
        "rewards/margins": ((better - worse) * labelled).sum(dim=1).detach() / n_labelled,
    }
    return losses, {k: v.detach() for k, v in metrics.items()}


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Pearson correlation of x and y [N] over their N entries (0 when either is constant)."""
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / (xc.norm() * yc.norm() + eps)


def odin_terms(
    quality: torch.Tensor,
    length_head: torch.Tensor,
    lengths: torch.Tensor,
    w_quality: torch.Tensor,
    w_length: torch.Tensor,
    *,
    length_coef: float = 1.0,
    orthogonal_coef: float = 1.0,
    length_sign: float = 1.0,
    squared: bool = False,
) -> tuple[torch.Tensor, dict]:
    """ODIN's disentangling terms (Chen et al., ODIN: Disentangled Reward Mitigates Hacking in RLHF,
    arXiv 2402.07319, Section 5), added to the Bradley-Terry loss of the summed reward
    r = r_Q + r_L:

        L_disentangle = length_coef * (|rho(r_Q, len)| - s rho(r_L, len)) + orthogonal_coef * |w_Q . w_L|

    with s = `length_sign`, +1 in the paper; with `squared`, rho(r_Q, len)^2 in place of
    |rho(r_Q, len)|.

    rho: the Pearson correlation over the batch's responses (chosen and rejected alike) of each
    head's reward with the response length in tokens; w_Q, w_L: the two linear heads' weight
    vectors. The length head is pushed to carry length, the quality head to carry none of it, and
    the heads to read orthogonal directions of the shared features. At use time only r_Q is the
    reward.

    Inputs: quality, length_head, lengths [N] (N = 2B responses), w_quality, w_length [H].
    Returns (the scalar term, metrics). Departures: one coefficient for both correlation terms (as
    the paper's experiments set them equal), the sign s, and the square where asked for.

    The square has the same minimum, at zero, and a gradient that shrinks on the way there:
    |rho|'s keeps its full size and flips its sign each time rho crosses zero, and Adam's second
    moment fills with that chatter, which shrinks the steps the Bradley-Terry loss gets. It pays
    where the correlations are exact (a head trained alone on cached trunk outputs, over every
    training reply): on HH-RLHF harmless the quality head's held-out accuracy rose from 0.586 to
    0.624 over five seeds (docs/benchmarks.md). Over a micro-batch's noisy estimates the paper's
    |rho| did better in the one case measured (bench/length_hacking.py's synthetic task, every weight
    trained: the policy's replies held at 9 words against 24), so the recipe squares only when the
    head trains alone (`reward.correlation_penalty: auto`).

    The paper's s = +1 assumes the
    preferences favour longer replies (its data does); where they favour shorter ones (HH-RLHF
    harmless: refusals are short) a length head that must grow with length cannot carry that, and
    the Bradley-Terry loss pushes it into the quality head instead (measured: docs/benchmarks.md).
    The recipe takes s from the training pairs (`reward.length_sign: auto`). A sign-free
    -|rho(r_L, len)| does not do: the correlation term outweighs the Bradley-Terry loss early on,
    so the head keeps whichever sign it started with (tried on tests/test_odin.py's synthetic set,
    which prefers longer replies: the length head ended at -0.98)."""
    if length_sign not in (1.0, -1.0):
        raise ValueError(f"length_sign must be +1 or -1; got {length_sign!r}")
    lengths = lengths.to(quality.dtype)
    rho_q, rho_l = pearson(quality, lengths), pearson(length_head, lengths)
    ortho = (w_quality * w_length).sum().abs()
    penalty = rho_q.square() if squared else rho_q.abs()
    term = length_coef * (penalty - length_sign * rho_l) + orthogonal_coef * ortho
    metrics = {
        "odin/quality_length_corr": rho_q.detach().reshape(1),
        "odin/length_head_corr": rho_l.detach().reshape(1),
        "odin/orthogonality": ortho.detach().reshape(1),
    }
    return term, metrics


@register(
    "step_bce",
    summary="Process reward model: binary cross-entropy of each step's score against its label, averaged per reply.",
    citation="Lightman et al., Let's Verify Step by Step, arXiv 2305.20050; "
    "Wang et al., Math-Shepherd, arXiv 2312.08935",
    data="steps",
)
def step_bce(step_logits, step_labels, step_example, num_examples: int):
    """loss_i = mean over the steps s of reply i of BCE(sigmoid(z_s), y_s)
             = mean_s -(y_s log sigmoid(z_s) + (1 - y_s) log sigmoid(-z_s)).

    Inputs: step_logits [S] (the model's score at each step's last token), step_labels [S] in
    [0, 1] (1: the step is right; a share: Math-Shepherd's soft label), step_example [S] (the reply,
    0..num_examples-1, each step belongs to). A reply without a kept step adds 0. Metrics:
    `step_accuracy` (a step scored above 0 exactly when its label is above 1/2) and `step_label_mean`."""
    bce = F.binary_cross_entropy_with_logits(step_logits, step_labels.to(step_logits.dtype), reduction="none")
    sums = torch.zeros(num_examples, dtype=bce.dtype, device=bce.device).index_add(0, step_example, bce)
    counts = torch.bincount(step_example, minlength=num_examples).clamp(min=1)
    correct = ((step_logits > 0) == (step_labels > 0.5)).to(bce.dtype)
    metrics = {"step_accuracy": correct.detach(), "step_label_mean": step_labels.detach().to(bce.dtype)}
    return sums / counts, metrics


def _soft_ce(diff: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(p log sigmoid(z) + (1 - p) log sigmoid(-z)) per entry: cross-entropy against a soft label."""
    return F.binary_cross_entropy_with_logits(diff, target.to(diff.dtype), reduction="none")


@register(
    "soft_bradley_terry",
    summary="Bradley-Terry on soft labels: cross-entropy of sigmoid(r(chosen) - r(rejected)) against each pair's prob.",
    citation="Burns et al., Weak-to-Strong Generalization, arXiv 2312.09390 (a weak supervisor's soft labels)",
    data="reward",
)
def soft_bradley_terry(chosen_rewards, rejected_rewards, probs):
    """loss = -(p log sigmoid(z) + (1 - p) log sigmoid(-z)), z = r(x, y_1) - r(x, y_2) (one objective),
    p = P(y_1 is better): the record's `prob`, or 1 / 0 from its label. With p in {0, 1} it is
    `bradley_terry`. Metrics: `accuracy` (z and p - 1/2 agree in sign; pairs at p = 1/2 are left
    out), `soft_label_mean`."""
    diff = (chosen_rewards - rejected_rewards)[:, 0]
    losses = _soft_ce(diff, probs)
    return losses, _soft_metrics(chosen_rewards, rejected_rewards, diff, probs)


def _soft_metrics(chosen_rewards, rejected_rewards, diff, probs) -> dict:
    judged = probs != 0.5
    correct = ((diff > 0) == (probs > 0.5)).to(diff.dtype)
    return {
        "accuracy": correct[judged].detach(),
        "soft_label_mean": probs.detach().to(diff.dtype),
        "rewards/chosen": chosen_rewards[:, 0].detach(),
        "rewards/rejected": rejected_rewards[:, 0].detach(),
    }


@register(
    "w2s_confidence",
    summary="Weak-to-strong auxiliary confidence loss: (1 - a) CE(student, weak label) + a CE(student, its own "
    "hardened prediction), a warmed up over training.",
    citation="Burns et al., Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision, "
    "arXiv 2312.09390, sec. 4.3.2 and appendix A.4",
    data="reward",
)
def w2s_confidence(chosen_rewards, rejected_rewards, probs, progress, *, alpha: float = 0.75, warmup: float = 0.2):
    """loss = (1 - a_t) CE(sigmoid(z), p_w) + a_t CE(sigmoid(z), t(z)),  z = r(x, y_1) - r(x, y_2),
    with p_w the weak supervisor's soft label (`prob`), t(z) = 1[z > q] the student's own prediction
    hardened at the batch quantile q of z that leaves the weak labels' mean share of the batch
    above it (the paper's adaptive threshold, as its authors' code sets it: half the batch for a
    balanced task; `alignkit w2s` shows each pair's replies in random order), not differentiated
    through, and a_t = alpha * min(1, progress / warmup): a warms up linearly over the first
    `warmup` of training (the paper: 20%, to 0.75 for its largest students). `progress` is the
    share of training done, the same for every pair of the batch. The confidence term lets the
    student overrule the weak label where it is confident itself.

    Departure: the authors' released code sets a_t = alpha * progress during its warm-up (not
    progress / warmup), so a jumps at the warm-up's end; here it is continuous."""
    diff = (chosen_rewards - rejected_rewards)[:, 0]
    a = alpha * min(1.0, float(progress) / warmup) if warmup > 0 else alpha
    level = 1 - float(probs.float().mean())  # the share of the batch left below the threshold
    hard = (diff > torch.quantile(diff.detach().float(), level).to(diff.dtype)).to(diff.dtype).detach()
    losses = (1 - a) * _soft_ce(diff, probs) + a * _soft_ce(diff, hard)
    metrics = _soft_metrics(chosen_rewards, rejected_rewards, diff, probs)
    metrics["w2s/alpha"] = torch.full_like(diff, a).detach()
    metrics["w2s/hardened_agree_weak"] = ((hard > 0.5) == (probs > 0.5)).to(diff.dtype).detach()
    return losses, metrics
