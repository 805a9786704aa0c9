"""Online RL for LLMs: group advantages, the clipped policy-gradient loss, pair/best-of selection.

Pure functions, like the rest of `alignkit.losses`. The policy loss `ppo_clip` is registered (data
kind "rollout"): its inputs are per-token, [M] over the scored tokens of sampled completions, and
it returns a per-token loss that the recipe reduces with `aggregate` (`online.aggregation`).
`policy_gradient_loss` composes it with a per-sequence advantage, the k3 KL term and the
aggregation: the whole GRPO objective in one call.

Layout. A step samples G completions for each of P prompts; the S = P * G sequences are flattened,
so sequence s belongs to prompt s // G and is sample s % G. Rewards are [P, G]. Per-token
quantities are flat tensors over the M scored completion tokens, with `token_seq` [M] (long) giving
the sequence of each token (sequences are usually contiguous and in order, but nothing here
relies on it).

Every function works in the dtype of its floating inputs (float32 in training; the tests use
float64 to pin numbers); integer rewards are promoted to float32.
"""

from __future__ import annotations

import math

import torch

from alignkit.losses.registry import register


def _check_rewards(rewards: torch.Tensor, who: str) -> torch.Tensor:
    if rewards.ndim != 2 or rewards.numel() == 0:
        raise ValueError(
            f"{who}: `rewards` must be a non-empty [P, G] tensor (P prompts, G samples each); "
            f"got shape {tuple(rewards.shape)}. Reshape flat rewards with `.view(P, G)`."
        )
    return rewards if rewards.is_floating_point() else rewards.float()


def _need_two_samples(rewards: torch.Tensor, who: str) -> None:
    if rewards.shape[1] < 2:
        raise ValueError(
            f"{who}: needs G >= 2 samples per prompt to form a baseline from the group; got "
            f"rewards of shape {tuple(rewards.shape)} (G = {rewards.shape[1]}). Sample more "
            "completions per prompt."
        )


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages [P, G] from outcome rewards [P, G].

    GRPO (Shao et al., DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models, arXiv 2402.03300, Sec. 4.1.2, outcome supervision): every token of sample i gets
        A_i = (r_i - mean(r)) / (std(r) + eps),   mean and std over the G samples of its prompt.
    std is the unbiased sample std (divides by G - 1; `torch.std`'s default), as in TRL's
    GRPOTrainer; the paper does not say which. eps = 1e-4 (TRL's value) keeps a group whose
    rewards are all equal at A = 0 instead of 0/0.

    scale_by_std=False is Dr. GRPO (Liu et al., Understanding R1-Zero-Like Training: A Critical
    Perspective, arXiv 2503.20783, Sec. 3): A_i = r_i - mean(r). Dividing by the std up-weights
    prompts that are nearly always solved or nearly always failed, a difficulty bias the paper
    removes.

    Raises ValueError for G < 2 (the sample std of one value is undefined, and the centred
    advantage would be identically 0)."""
    rewards = _check_rewards(rewards, "group_advantages")
    _need_two_samples(rewards, "group_advantages")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages [P, G] from rewards [P, G]:
        A_i = r_i - 1/(G-1) * sum_{j != i} r_j  ( = G/(G-1) * (r_i - mean(r)) )
    (Ahmadian et al., Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs, arXiv 2402.14740, Sec. 3.2; the baseline is Kool et al. 2019). The
    baseline of sample i excludes r_i, so it is independent of sample i and the estimator unbiased.

    Raises ValueError for G < 2 (no other sample to form the baseline)."""
    rewards = _check_rewards(rewards, "rloo_advantages")
    _need_two_samples(rewards, "rloo_advantages")
    g = rewards.shape[1]
    leave_one_out_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - leave_one_out_mean


def zero_variance_fraction(rewards: torch.Tensor) -> float:
    """Fraction of the P groups whose G rewards are all equal (a float in [0, 1]).

    Such a group has zero advantage under GRPO, Dr. GRPO and RLOO alike, so it contributes no
    policy gradient (only the KL term, if any); DAPO (arXiv 2503.14476, Sec. 3.2, dynamic sampling)
    filters these groups out and samples more. A rising value means the prompts have become too
    easy or too hard. Returns a Python float (one host sync): it is a logging metric."""
    rewards = _check_rewards(rewards, "zero_variance_fraction")
    constant = (rewards == rewards[:, :1]).all(dim=1)  # [P]
    return constant.float().mean().item()


# --------------------------------------------------------------------------------------------
# Clipped policy-gradient loss
# --------------------------------------------------------------------------------------------


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from tokens sampled from pi (same shape as input):
        k3 = exp(ref - logp) - (ref - logp) - 1  >= 0
    (Schulman, "Approximating KL Divergence", blog post, 2020, http://joschu.net/blog/kl-approx.html;
    the estimator of GRPO, arXiv 2402.03300, Sec. 4.1.1). With r = pi_ref / pi, k3 = (r - 1) - log r:
    unbiased (E_pi[r] = 1), and non-negative since log r <= r - 1. Written with expm1 so that it
    stays accurate near 0. No clamping: a very large ref - logp gives a large (possibly inf) value,
    as in TRL; it is not silently capped."""
    delta = ref_logps - logps
    return torch.expm1(delta) - delta


def truncated_importance_weights(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling (Yao et al., "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training", 2025): the sampler (vLLM in bf16, say) and the trainer disagree on the
    probability of what was sampled, so each token's policy-gradient term is weighted by

        w_t = min(pi_trainer(y_t) / pi_sampler(y_t), cap),

    with pi_trainer at the weights that sampled (the rollout's old log-probs), detached: a weight
    corrects the sampling distribution, it is not differentiated. Inputs [M]; returns (w [M],
    sums {"tis/weight_mean": sum of w, "tis/capped_fraction": count of w at the cap}), sums so a
    caller divides by its token count."""
    w = torch.exp(trainer_logps.detach() - sampler_logps.to(trainer_logps.dtype)).clamp(max=cap)
    return w, {"tis/weight_mean": w.sum(), "tis/capped_fraction": (w >= cap).to(w.dtype).sum()}


def masked_importance_weights(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, dict]:
    """Token-level masked importance sampling (MIS): drop the tokens on which the trainer and the
    sampler disagree too much. With r_t = pi_trainer(y_t) / pi_sampler(y_t),

        m_t = 1 if low <= r_t <= high else 0        (0 < low < 1 < high; bounds included)

    and each token's policy-gradient term is multiplied by m_t, so a dropped token gives neither
    loss nor gradient. pi_trainer is taken at the weights that sampled (the rollout's old
    log-probs), detached, as in `truncated_importance_weights`; the test is done on
    log r_t = trainer - sampler against log(low) and log(high), so a huge or infinite ratio (a
    sampler log-prob of -inf) is masked instead of overflowing, and a NaN ratio is masked too.

    Sources (blog posts, cited by title: we know no arXiv ids for them): the rejection ("mask")
    counterpart of truncation in Liu, Li et al., "When Speed Kills Stability: Demystifying RL
    Collapse from the Training-Inference Mismatch" (2025) and in the Ling Team's IcePop (2025),
    both after Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (2025; truncated IS); verl's `rollout_is_mode: mask` at token level is the same rejection.
    Departure: where those also weight a kept token by its ratio (m_t * r_t), the mask here is 0/1
    only and the IS weight is `truncated_importance_weights`' job; with both on, the weight is
    m_t * min(r_t, cap), their m_t * r_t whenever cap >= high (the cap never binds on a kept
    token). Where masked tokens sit in the loss's normaliser is the caller's choice
    (`train.rollouts.policy_gradient` keeps them there).

    Inputs [M]; returns (m [M] in the trainer's dtype, sums {"mis/masked_fraction": tokens
    masked, "mis/masked_low_fraction": masked for r_t < low, "mis/masked_high_fraction": masked
    for r_t > high}; a NaN ratio counts in the first only), sums so a caller divides by its token
    count."""
    if not 0.0 < low < 1.0 < high:
        raise ValueError(f"masked_importance_weights: need 0 < low < 1 < high; got low={low}, high={high}.")
    log_r = trainer_logps.detach() - sampler_logps.to(trainer_logps.dtype)  # [M]
    keep = (log_r >= math.log(low)) & (log_r <= math.log(high))
    m = keep.to(trainer_logps.dtype)
    below = (log_r < math.log(low)).to(m.dtype)
    above = (log_r > math.log(high)).to(m.dtype)
    return m, {
        "mis/masked_fraction": (1.0 - m).sum(),
        "mis/masked_low_fraction": below.sum(),
        "mis/masked_high_fraction": above.sum(),
    }


def kl_penalty_in_loss(
    per_token: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's KL term in the loss (Shao et al., arXiv 2402.03300, eq. 3): per token
    loss_t + kl_coef * k3(logp_t, ref_t), the gradient flowing through logp_t (the reference is
    detached). Returns (the per-token loss [M], the per-token k3 [M], detached: the `kl` metric).
    With kl_coef 0 the loss is unchanged and the KL is still measured."""
    kl = kl_k3(logps, ref_logps.detach())
    out = per_token + kl_coef * kl if kl_coef > 0 else per_token
    return out, kl.detach()


def _aggregate_grpo(per_token, token_seq, num_sequences, max_completion_length):
    """Mean over each sequence's tokens, then mean over the sequences that have tokens (GRPO,
    arXiv 2402.03300, the 1/|o_i| and 1/G factors of its objective)."""
    seq_sum = per_token.new_zeros(num_sequences).index_add(0, token_seq, per_token)  # [S]
    seq_len = per_token.new_zeros(num_sequences).index_add(0, token_seq, torch.ones_like(per_token))  # [S]
    has_tokens = (seq_len > 0).to(per_token.dtype)  # [S]
    seq_mean = seq_sum / seq_len.clamp(min=1)
    # Departure from TRL, which divides by all S sequences: an empty sequence is skipped, so it does
    # not shrink the weight of the others.
    return (seq_mean * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def _aggregate_dapo(per_token, token_seq, num_sequences, max_completion_length):
    """Token-level mean: sum over all tokens / number of tokens (DAPO, arXiv 2503.14476, Sec. 3.3),
    so every token weighs the same whatever the length of its sequence."""
    return per_token.sum() / max(per_token.numel(), 1)


def _aggregate_dr_grpo(per_token, token_seq, num_sequences, max_completion_length):
    """sum over all tokens / (S * max_completion_length) (Dr. GRPO, arXiv 2503.20783, Sec. 3): a
    constant normaliser, so there is no length bias and no dependence on the batch's lengths."""
    if max_completion_length is None:
        raise ValueError(
            "policy_gradient_loss: aggregation='dr_grpo' needs `max_completion_length` (the "
            "generation limit, in tokens); pass it, or use aggregation='dapo' or 'grpo'."
        )
    if max_completion_length <= 0:
        raise ValueError(f"policy_gradient_loss: `max_completion_length` must be > 0; got {max_completion_length}.")
    return per_token.sum() / (num_sequences * max_completion_length)


AGGREGATIONS = {"grpo": _aggregate_grpo, "dapo": _aggregate_dapo, "dr_grpo": _aggregate_dr_grpo}


def aggregate(
    per_token: torch.Tensor, token_seq: torch.Tensor, num_sequences: int, aggregation: str, max_completion_length=None
) -> torch.Tensor:
    """Per-token losses [M] -> the scalar loss, by `aggregation` (grpo, dapo or dr_grpo; see
    `policy_gradient_loss`)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregate: unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}.")
    return AGGREGATIONS[aggregation](per_token, token_seq, num_sequences, max_completion_length)


def aggregate_sum(
    per_token: torch.Tensor, token_seq: torch.Tensor, num_sequences: int, aggregation: str, max_completion_length=None
) -> torch.Tensor:
    """`aggregate` times its normaliser (`aggregation_weight`): the part that adds up across
    micro-batches and processes. The trainer sums these and divides by the summed weights, so a
    step's loss is the aggregation over all of its sequences however they are split (1 x 8 equals
    8 x 1, and N processes equal one)."""
    weight = aggregation_weight(token_seq, num_sequences, aggregation)
    return aggregate(per_token, token_seq, num_sequences, aggregation, max_completion_length) * weight


def aggregation_weight(token_seq: torch.Tensor, num_sequences: int, aggregation: str) -> int:
    """The normaliser of `aggregation` over these tokens: sequences with tokens (grpo), tokens
    (dapo), or sequences (dr_grpo, whose per-sequence length normaliser is constant)."""
    if aggregation == "dapo":
        return int(token_seq.numel())
    if aggregation == "dr_grpo":
        return int(num_sequences)
    return int((torch.bincount(token_seq, minlength=num_sequences) > 0).sum()) if token_seq.numel() else 0


def _clip_metrics(ratio, adv, clip_low: float, clip_high: float) -> dict:
    """Per-token clip indicators of a clipped surrogate (TRL's definitions): low-clipped where
    ratio < 1 - clip_low with A < 0, high-clipped where ratio > 1 + clip_high with A > 0, exactly
    where the clipped term is the active minimum and the gradient is zero; and the ratio."""
    low = ((ratio < 1.0 - clip_low) & (adv < 0)).to(ratio.dtype)
    high = ((ratio > 1.0 + clip_high) & (adv > 0)).to(ratio.dtype)
    return {"clip_fraction/low": low, "clip_fraction/high": high, "clip_fraction": low + high, "ratio_mean": ratio}


@register(
    "ppo_clip",
    summary="PPO's clipped surrogate per token, with decoupled clip range (GRPO, DAPO's clip-higher).",
    citation="Schulman et al., Proximal Policy Optimization Algorithms, arXiv 1707.06347; as GRPO uses it, "
    "Shao et al., arXiv 2402.03300; clip-higher: Yu et al., DAPO, arXiv 2503.14476",
    data="rollout",
    reduction="token",
)
def ppo_clip(token_logps, old_token_logps, advantages, *, clip_low: float = 0.2, clip_high: float = 0.2):
    """Per-token clipped surrogate; returns (loss [M], metrics {name: [M]}).

    Inputs, flat over the M scored tokens of the sampled completions: token_logps (log pi_theta,
    the only input gradients flow into), old_token_logps (log pi_old, the policy that sampled),
    advantages (one per token: GRPO and RLOO broadcast their sequence's, PPO's GAE gives each
    token its own). With ratio = exp(logp - old_logp) and A the token's advantage:
        loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    (PPO, arXiv 1707.06347, eq. 7, as GRPO uses it, arXiv 2402.03300, Sec. 4.1; DAPO's
    decoupled "clip-higher" range, arXiv 2503.14476, Sec. 3.1, uses clip_low 0.2, clip_high 0.28).

    Metrics, per token (the recipe averages them): `clip_fraction/low` (ratio < 1 - clip_low with
    A < 0), `clip_fraction/high` (ratio > 1 + clip_high with A > 0) -- exactly where the clipped
    term is the active minimum and the gradient is zero, TRL's definitions -- `clip_fraction`
    (either) and `ratio_mean`."""
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(
            f"ppo_clip: need 0 <= clip_low < 1 and clip_high >= 0; got clip_low={clip_low}, clip_high={clip_high}."
        )
    adv = advantages.detach().to(token_logps.dtype)
    ratio = torch.exp(token_logps - old_token_logps.detach())  # [M]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv)
    return per_token, _clip_metrics(ratio.detach(), adv, clip_low, clip_high)


def _sequence_means(x: torch.Tensor, token_seq: torch.Tensor) -> torch.Tensor:
    """Each token's sequence mean of `x` [M] (broadcast back to the tokens), differentiable."""
    num = int(token_seq.max()) + 1 if token_seq.numel() else 0
    sums = x.new_zeros(num).index_add(0, token_seq, x)
    counts = x.new_zeros(num).index_add(0, token_seq, torch.ones_like(x))
    return (sums / counts.clamp(min=1))[token_seq]


@register(
    "gspo",
    summary="GSPO: one importance ratio per sequence (length-normalised), clipped per sequence.",
    citation="Zheng et al., Group Sequence Policy Optimization, arXiv 2507.18071",
    data="rollout",
    reduction="token",
)
def gspo(token_logps, old_token_logps, advantages, token_seq, *, clip_low: float = 3e-4, clip_high: float = 4e-4):
    """Sequence-level clipped surrogate, broadcast to every token; returns (loss [M], metrics).

    GSPO (arXiv 2507.18071, Eq. 5-7): the importance ratio of sequence i is the geometric mean of
    its token ratios,
        s_i = (pi_theta(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp(mean_t (logp_t - old_logp_t)),
    and the objective is 1/G sum_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i). Each
    token of sequence i carries loss_t = -min(s_i A_i, clip(s_i) A_i), so `online.aggregation:
    grpo` (mean over each sequence's tokens, then over sequences) gives exactly the paper's
    objective; the other aggregations weight sequences by their length. The gradient reaches
    every token through s_i (the paper's Eq. 10). Defaults: the paper's clip ranges, 3e-4 and
    4e-4 (sequence ratios stay far closer to 1 than token ratios).

    A_i is the mean of the sequence's token advantages: GRPO and RLOO give every token its
    sequence's advantage, so this is that advantage (a departure only for per-token advantages,
    which GSPO does not define). Metrics per token: `clip_fraction` (its sequence is clipped: the
    clipped term is the active minimum), `clip_fraction/low`, `clip_fraction/high`, and
    `ratio_mean` (the sequence ratio s_i)."""
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(
            f"gspo: need 0 <= clip_low < 1 and clip_high >= 0; got clip_low={clip_low}, clip_high={clip_high}."
        )
    adv = _sequence_means(advantages.detach().to(token_logps.dtype), token_seq)
    s = torch.exp(_sequence_means(token_logps - old_token_logps.detach(), token_seq))  # [M], s_i at each token
    per_token = -torch.minimum(s * adv, torch.clamp(s, 1.0 - clip_low, 1.0 + clip_high) * adv)
    return per_token, _clip_metrics(s.detach(), adv, clip_low, clip_high)


@register(
    "cispo",
    summary="CISPO: REINFORCE with clipped, detached importance weights; every token keeps its gradient.",
    citation="MiniMax, MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention, "
    "arXiv 2506.13585, Sec. 3.1",
    data="rollout",
    reduction="token",
)
def cispo(token_logps, old_token_logps, advantages, *, clip_low: float = 1.0, clip_high: float = 0.2):
    """Clipped importance-sampling-weight policy loss; returns (loss [M], metrics).

    CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4-5): with r_t = exp(logp_t - old_logp_t),
        w_t    = sg(clip(r_t, 1 - clip_low, 1 + clip_high))       (sg: stop-gradient)
        loss_t = -w_t * A_t * logp_t
    PPO's clip zeroes the gradient of a token whose ratio left the range; here the weight is
    clipped instead and the token keeps its gradient A_t * w_t * grad log pi (the rare "reflective"
    tokens the paper says PPO/GRPO drop). The paper sets no lower bound (clip_low large): the
    default 1.0 puts it at 0, below any ratio; clip_high 0.2 is verl's CISPO setting. The paper
    normalises over all tokens of the batch: use `online.aggregation: dapo`.
    Metrics per token: `clip_fraction` (weight capped at 1 + clip_high or floored at 1 - clip_low)
    and `ratio_mean`. The loss value is not the surrogate's (it contains log pi); its gradient is."""
    if clip_low < 0.0 or clip_high < 0.0:
        raise ValueError(
            f"cispo: need clip_low >= 0 and clip_high >= 0; got clip_low={clip_low}, clip_high={clip_high}."
        )
    adv = advantages.detach().to(token_logps.dtype)
    r = torch.exp(token_logps.detach() - old_token_logps.detach())
    w = torch.clamp(r, min=1.0 - clip_low, max=1.0 + clip_high)
    per_token = -w * adv * token_logps
    clipped = ((r > 1.0 + clip_high) | (r < 1.0 - clip_low)).to(r.dtype)
    return per_token, {"clip_fraction": clipped, "ratio_mean": r}


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft over-length punishment (arXiv 2503.14476, Sec. 3.4, Eq. 13), added to the reward:
        0                                   if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
        -1                                  if |y| > L_max
    with L_max = `max_length` (the generation limit, `generation.max_new_tokens`) and L_cache =
    `buffer`: replies that run into the last `buffer` tokens lose reward linearly, down to -1 at the
    limit (a reply cut at the limit has |y| = L_max). `lengths` [...] in tokens; float output of the
    same shape."""
    if not 0 < buffer <= max_length:
        raise ValueError(
            f"overlong_penalty: need 0 < buffer <= max_length; got buffer={buffer}, max_length={max_length}."
        )
    lengths = lengths.to(torch.float32)
    start = max_length - buffer
    ramp = (start - lengths) / buffer
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, ramp, -1.0))


def _check_pg_inputs(
    token_logps,
    old_token_logps,
    advantages,
    token_seq,
    num_sequences,
    clip_low,
    clip_high,
    ref_token_logps,
    kl_coef,
    aggregation,
):
    """Shape and hyper-parameter checks only: no value checks, which would need a host sync."""
    who = "policy_gradient_loss"
    if token_logps.ndim != 1:
        raise ValueError(
            f"{who}: `token_logps` must be flat [M] over scored tokens; got shape {tuple(token_logps.shape)}."
        )
    same_shape = (("old_token_logps", old_token_logps), ("token_seq", token_seq), ("ref_token_logps", ref_token_logps))
    for name, t in same_shape:
        if t is not None and t.shape != token_logps.shape:
            raise ValueError(
                f"{who}: `{name}` must have the shape of `token_logps` {tuple(token_logps.shape)}; "
                f"got {tuple(t.shape)}."
            )
    if token_seq.dtype != torch.long:
        raise ValueError(f"{who}: `token_seq` must be a long tensor of sequence indices; got {token_seq.dtype}.")
    if advantages.shape != (num_sequences,):
        raise ValueError(
            f"{who}: `advantages` must be [S] = [{num_sequences}] (one per sequence; flatten [P, G] "
            f"advantages with `.reshape(-1)`); got shape {tuple(advantages.shape)}."
        )
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(
            f"{who}: need 0 <= clip_low < 1 and clip_high >= 0; got clip_low={clip_low}, clip_high={clip_high}."
        )
    if kl_coef < 0.0:
        raise ValueError(f"{who}: `kl_coef` must be >= 0; got {kl_coef}.")
    if kl_coef > 0.0 and ref_token_logps is None:
        raise ValueError(
            f"{who}: kl_coef={kl_coef} > 0 needs `ref_token_logps`; pass the reference model's "
            "token log-probs, or set kl_coef=0."
        )
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{who}: unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}.")


def policy_gradient_loss(
    token_logps,
    old_token_logps,
    advantages,
    token_seq,
    num_sequences: int,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_token_logps=None,
    kl_coef: float = 0.0,
    aggregation: str = "grpo",
    max_completion_length=None,
):
    """Clipped surrogate policy-gradient loss over flattened tokens; returns (loss [], metrics).

    Inputs: token_logps [M] (log pi_theta of each sampled token; the only input gradients flow
    into), old_token_logps [M] (log pi_old, the sampling policy), advantages [S] (one per sequence,
    e.g. `group_advantages(...).reshape(-1)`), token_seq [M] (long, the sequence of each token),
    num_sequences S, and optionally ref_token_logps [M] (log pi_ref). old/ref/advantages are
    detached here.

    Per token t of sequence i, with ratio = exp(logp - old_logp) and A = advantages[i]:
        objective_t = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        loss_t      = -objective_t + kl_coef * k3(logp, ref_logp)        (k3: see `kl_k3`)
    the PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347) as GRPO uses it
    (arXiv 2402.03300, Sec. 4.1), with DAPO's decoupled clip range "clip-higher" (arXiv 2503.14476,
    Sec. 3.1; the paper uses clip_low = 0.2, clip_high = 0.28). The KL term is added to the loss
    as in GRPO (not folded into the reward); it is only computed when kl_coef > 0.

    `aggregation` turns the per-token losses into the scalar loss:
      "grpo":    mean over each sequence's tokens, then mean over sequences (GRPO). Sequences with
                 no tokens are skipped (TRL counts them, with a 0 loss).
      "dapo":    sum over all tokens / M, the token-level loss of DAPO (Sec. 3.3).
      "dr_grpo": sum over all tokens / (S * max_completion_length) (Dr. GRPO, arXiv 2503.20783).
    With gradient accumulation, "grpo" and "dapo" normalise by the sequences/tokens of this call
    only; "dr_grpo"'s constant normaliser is the one that sums exactly across micro-batches.

    Metrics (detached 0-d tensors, so logging does not force a host sync; token means over the M
    tokens, 0 when M = 0), with TRL's definitions: a token is
      low-clipped  when ratio < 1 - clip_low  and A < 0,
      high-clipped when ratio > 1 + clip_high and A > 0,
    i.e. exactly when the clipped term is the active minimum and its gradient is zero (outside
    those cases the unclipped term is the minimum). "clip_fraction/low", "clip_fraction/high" and
    "clip_fraction" (their sum) are the fractions of tokens so clipped; "ratio_mean" is the mean
    ratio; "kl" is the mean k3 over tokens, reported whenever ref_token_logps is given (also with
    kl_coef = 0)."""
    _check_pg_inputs(
        token_logps,
        old_token_logps,
        advantages,
        token_seq,
        num_sequences,
        clip_low,
        clip_high,
        ref_token_logps,
        kl_coef,
        aggregation,
    )
    token_adv = advantages.detach().to(token_logps.dtype)[token_seq]  # [M]
    per_token, clip_metrics = ppo_clip(token_logps, old_token_logps, token_adv, clip_low=clip_low, clip_high=clip_high)
    n_tokens = max(token_logps.numel(), 1)
    metrics = {}
    if ref_token_logps is not None:
        kl = kl_k3(token_logps, ref_token_logps.detach())  # [M]
        if kl_coef > 0.0:
            per_token = per_token + kl_coef * kl
        metrics["kl"] = kl.detach().sum() / n_tokens
    loss = aggregate(per_token, token_seq, num_sequences, aggregation, max_completion_length)
    metrics.update({k: v.sum() / n_tokens for k, v in clip_metrics.items()})
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Selecting samples: online DPO pairs and best-of-K
# --------------------------------------------------------------------------------------------


def best_worst_pairs(rewards: torch.Tensor):
    """Per prompt, the indices (within its group) of the highest- and lowest-reward samples, for
    online DPO / IPO; returns (best_idx [P] long, worst_idx [P] long, valid [P] bool).

    Online DPO (Guo et al., Direct Language Model Alignment from Online AI Feedback, arXiv
    2402.04792) samples two responses and lets an annotator pick the preferred one; with G = 2 and
    a reward as the annotator this is exactly that pair. For G > 2 we take the best and the worst of
    the group, the common choice of iterative/online DPO pipelines (e.g. Dong et al., RLHF Workflow:
    From Reward Modeling to Online RLHF). Ties go to the first index (torch.argmax/argmin's
    documented behaviour). valid is False where all G rewards are equal: there is no preference,
    and the recipe should drop that prompt (best == worst there). The sequence index in the
    flattened layout is p * G + idx."""
    rewards = _check_rewards(rewards, "best_worst_pairs")
    best = rewards.argmax(dim=1)
    worst = rewards.argmin(dim=1)
    valid = rewards.amax(dim=1) != rewards.amin(dim=1)
    return best, worst, valid


def best_of_k(rewards: torch.Tensor) -> torch.Tensor:
    """Index [P] (long, within each group) of the highest-reward sample per prompt, first on ties:
    the sample RAFT keeps for fine-tuning (Dong et al., RAFT: Reward rAnked FineTuning for Generative
    Foundation Model Alignment, arXiv 2304.06767; rejection sampling / best-of-K)."""
    return _check_rewards(rewards, "best_of_k").argmax(dim=1)
