"""DPO generalised over divergences: f-DPO (other f-divergences than reverse KL) and EXO
(the reverse KL between the policy's and the labels' distributions over a pair).

Notation (all [B], summed over completion tokens): r_w = log pi(y_w|x) - log pi_ref(y_w|x),
r_l likewise, h = r_w - r_l; the implicit reward is beta * r (DPO eq. 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignkit.errors import ConfigError
from alignkit.losses.dpo import dpo, log_ratio_diff, with_rewards
from alignkit.losses.registry import register

DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _capped_exp(x):
    """exp(x) with x clamped to log(finfo.max) - 20, so that differences and small multiples of
    the result stay finite (the idea of TRL's `cap_exp`). Beyond the cap the gradient is zero."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max) - 20.0))


def f_dpo_margin(r_w, r_l, divergence: str, alpha: float):
    """f'(u_w) - f'(u_l) with u = pi / pi_ref = exp(r), for the f-divergences of arXiv 2309.16240,
    with the additive constants of f' dropped (they cancel in the difference):
      reverse KL   f(u) = u log u              f'(u) = log u + 1
      forward KL   f(u) = -log u               f'(u) = -1/u
      JS           f(u) = u log u - (u+1) log((u+1)/2)    f'(u) = log(2u / (1+u)) = log 2 + log sigmoid(r)
      alpha-div.   f(u) = (u^(1-a) - (1-a) u - a) / (a (a-1))   f'(u) = (1 - u^(-a)) / a
    """
    if divergence == "reverse_kl":
        return r_w - r_l
    if divergence == "forward_kl":
        return _capped_exp(-r_l) - _capped_exp(-r_w)
    if divergence == "js_divergence":
        return F.logsigmoid(r_w) - F.logsigmoid(r_l)
    if divergence == "alpha_divergence":
        return (_capped_exp(-alpha * r_l) - _capped_exp(-alpha * r_w)) / alpha
    raise ConfigError(f"`loss.divergence` must be one of {', '.join(DIVERGENCES)}; got {divergence!r}.")


@register(
    "f_dpo",
    summary="f-DPO: DPO with the reverse KL replaced by another f-divergence (forward KL, JS, alpha).",
    citation="Wang et al., Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence "
    "Constraints, arXiv 2309.16240",
)
def f_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
):
    """loss = -log sigmoid(beta * (f'(u_w) - f'(u_l))),  u = pi(y|x) / pi_ref(y|x)
    (the f-DPO objective of arXiv 2309.16240; f' as in `f_dpo_margin`).

    `divergence` is one of reverse_kl (exactly `dpo`), forward_kl, js_divergence, alpha_divergence;
    `alpha` in (0, 1) is used by alpha_divergence only (alpha -> 0 tends to reverse KL, alpha = 1 is
    forward KL). Defaults: reverse_kl as in TRL; alpha = 0.5 is our choice (TRL's default, 1.0, is
    forward KL again).

    Departure: forward KL and alpha divergence exponentiate -r, which overflows float32 once the
    policy is ~80/alpha nats below the reference on a completion; the exponent is capped (see
    `_capped_exp`) so the loss stays finite, and past the cap that term has zero gradient."""
    if divergence == "reverse_kl":
        return dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta)
    if divergence == "alpha_divergence" and not 0.0 < alpha < 1.0:
        raise ConfigError(f"`loss.alpha` of f_dpo (alpha_divergence) must be in (0, 1); got {alpha}.")
    margin = f_dpo_margin(
        policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps, divergence, alpha
    )
    losses = -F.logsigmoid(beta * margin)
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


@register(
    "exo",
    summary="EXO (pairwise): reverse KL from the policy's pair distribution to the smoothed label.",
    citation="Ji et al., Towards Efficient Exact Optimization of Language Model Alignment, arXiv 2402.00856",
)
def exo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
):
    """loss = KL(p_theta || p_label) over the pair {y_w, y_l}
            = s(beta h) (log s(beta h) - log(1 - eps)) + s(-beta h) (log s(-beta h) - log eps),
    s = sigmoid. p_theta = softmax(beta * r) over the pair (the EXO objective of arXiv 2402.00856
    for K = 2 responses, with beta = beta_pi), and p_label = (1 - eps, eps) is the preference label
    softened by eps = `label_smoothing`, which stands in for softmax(r / beta_r) of a reward.

    Departure: with a hard label (eps = 0) the reverse KL is infinite, so eps must lie in (0, 1);
    the default 1e-3 is the value common implementations use (TRL's `exo_pair`). The minimum over
    h is 0, reached at beta h = log((1 - eps) / eps)."""
    if not 0.0 < label_smoothing < 1.0:
        raise ConfigError(f"`loss.label_smoothing` of exo must be in (0, 1); got {label_smoothing}.")
    z = beta * log_ratio_diff(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return with_rewards(losses, beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
