"""PPO for LLMs (PPO-max): KL-shaped token rewards, GAE, whitening, reward normalisation, value loss.

The math of "Secrets of RLHF in Large Language Models Part I: PPO" (Zheng et al., arXiv 2307.04964;
PPO-max, Sec. 5.3-5.4 and Fig. 5), on top of PPO (Schulman et al., arXiv 1707.06347) and GAE
(Schulman et al., arXiv 1506.02438). The policy loss is `online.policy_gradient_loss` fed with
per-token advantages; this module has what PPO adds: the critic's targets and loss.

Layout (as in `losses/online.py`). Per-token quantities are flat tensors over the M scored
completion tokens; `token_seq` [M] (long) gives each token's sequence in 0..S-1. Contract: the
tokens of one sequence are contiguous in the flat layout and in time order (sequences themselves
may come in any order, and a sequence may have no tokens). `gae` and `kl_shaped_rewards` check
contiguity and the index range (two or three host syncs each; they run once per rollout); time order
inside a sequence cannot be checked and is the caller's responsibility.

Every function works in the dtype of its floating inputs (float32 in training; the tests use
float64 to pin numbers). All are pure functions except `RunningMoments`, the running reward
statistics, whose state is three plain numbers.
"""

from __future__ import annotations

import math

import torch

from alignkit.losses.online import kl_k3
from alignkit.losses.registry import register

__all__ = [
    "RunningMoments",
    "explained_variance",
    "gae",
    "kl_per_token",
    "kl_shaped_rewards",
    "normalize_rewards",
    "ppo_value_loss",
    "whiten",
]


def _check_flat(who: str, first: str, x: torch.Tensor, **others: torch.Tensor) -> None:
    if x.ndim != 1:
        raise ValueError(f"{who}: `{first}` must be flat [M] over scored tokens; got shape {tuple(x.shape)}.")
    for name, t in others.items():
        if t.shape != x.shape:
            raise ValueError(
                f"{who}: `{name}` must have the shape of `{first}` {tuple(x.shape)}; got {tuple(t.shape)}."
            )


def _layout(token_seq: torch.Tensor, num_sequences: int, who: str):
    """Position of each token inside its sequence [M] (long) and the tokens per sequence [S] (long),
    after checking the layout contract (see the module docstring). Two host syncs."""
    if token_seq.dtype != torch.long:
        raise ValueError(f"{who}: `token_seq` must be a long tensor of sequence indices; got {token_seq.dtype}.")
    if num_sequences < 1:
        raise ValueError(f"{who}: `num_sequences` must be >= 1; got {num_sequences}.")
    m = token_seq.numel()
    lo, hi = torch.stack([token_seq.min(), token_seq.max()]).tolist()
    if lo < 0 or hi >= num_sequences:
        raise ValueError(
            f"{who}: `token_seq` holds sequence indices in [{lo}, {hi}], outside "
            f"0..{num_sequences - 1} (num_sequences={num_sequences})."
        )
    idx = torch.arange(m, device=token_seq.device)  # [M]
    first = torch.full((num_sequences,), m, dtype=torch.long, device=token_seq.device)
    first = first.scatter_reduce(0, token_seq, idx, reduce="amin")  # [S] index of each sequence's first token
    counts = torch.bincount(token_seq, minlength=num_sequences)  # [S]
    pos = idx - first[token_seq]  # [M]; in 0..len-1 exactly when each sequence is contiguous
    if (pos >= counts[token_seq]).any().item():
        raise ValueError(
            f"{who}: the tokens of a sequence are not contiguous in `token_seq`; the flat layout "
            "must keep each sequence's tokens together and in time order."
        )
    return pos, counts


# --------------------------------------------------------------------------------------------
# KL in the reward
# --------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k3")


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi [M]:
        k1 = logp - ref_logp                       (can be negative; unbiased)
        k3 = exp(ref - logp) - (ref - logp) - 1    (>= 0; unbiased; see `online.kl_k3`)
    k1 is the penalty PPO-in-RLHF folds into the reward: R = r - beta * log(pi / pi_ref)
    (Ouyang et al., InstructGPT, arXiv 2203.02155, Eq. 2; Stiennon et al., arXiv 2009.01325,
    Eq. 1; Zheng et al., arXiv 2307.04964, Sec. 5.3.2, the token-level KL penalty; TRL's default).
    k3 is Schulman's low-variance estimator (http://joschu.net/blog/kl-approx.html), offered as an
    option. Differentiable; `kl_shaped_rewards` detaches it. Raises ValueError for another name."""
    _check_flat("kl_per_token", "logps", logps, ref_logps=ref_logps)
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return kl_k3(logps, ref_logps)
    raise ValueError(f"kl_per_token: unknown estimator {estimator!r}; choose one of {list(KL_ESTIMATORS)}.")


def step_rewards_from_returns(returns: torch.Tensor, token_seq: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-token rewards [M] from per-token returns [M] (each token's undiscounted return from its
    step on, `train.online.step_returns`): r_t = G_t - G_{t+1}, with G = 0 after a sequence's last
    token. A step's reward so lands on its last token and every other token gets 0: Math-Shepherd's
    step-by-step PPO (arXiv 2312.08935, Sec. 3.4), where each step's score is its reward."""
    who = "step_rewards_from_returns"
    _check_flat(who, "returns", returns, token_seq=token_seq)
    if returns.numel() == 0:
        return returns.new_zeros(0)
    pos, counts = _layout(token_seq, num_sequences, who)
    last = counts[token_seq] - 1 == pos
    following = torch.cat([returns[1:], returns.new_zeros(1)])
    return (returns - torch.where(last, torch.zeros_like(returns), following)).detach()


def kl_shaped_rewards(
    seq_rewards: torch.Tensor, kl: torch.Tensor, token_seq: torch.Tensor, num_sequences: int, *, kl_coef: float
):
    """Per-token rewards [M] for PPO: a KL penalty on every token, the sequence reward on the last.
        r_t = -kl_coef * kl_t + [t is the last token of its sequence] * seq_rewards[seq(t)]
    The reward model scores the whole completion, so its reward arrives when the episode ends;
    the KL to the reference is paid at every token (InstructGPT, arXiv 2203.02155, Eq. 2, written
    per token as in Ziegler et al., arXiv 1909.08593; PPO-max, arXiv 2307.04964, Sec. 5.3.2).
    `kl` [M] is `kl_per_token(...)`; `seq_rewards` [S] are the (normalised) sequence rewards.
    Inputs are detached: these are targets.

    A sequence with no scored tokens has nowhere to put its reward: the reward is dropped (it
    enters no advantage) and counted in metrics["empty_sequences"].

    Returns (token_rewards [M], metrics) with detached 0-d tensors: "kl" (mean of kl over the M
    tokens; 0 when M = 0) and "empty_sequences" (number of sequences without tokens)."""
    who = "kl_shaped_rewards"
    _check_flat(who, "kl", kl, token_seq=token_seq)
    if seq_rewards.shape != (num_sequences,):
        raise ValueError(f"{who}: `seq_rewards` must be [S] = [{num_sequences}]; got {tuple(seq_rewards.shape)}.")
    if kl_coef < 0.0:
        raise ValueError(f"{who}: `kl_coef` must be >= 0; got {kl_coef}.")
    kl = kl.detach()
    seq_rewards = seq_rewards.detach().to(kl.dtype)
    if kl.numel() == 0:
        zero = kl.new_zeros(())
        return kl.new_zeros(0), {"kl": zero, "empty_sequences": zero + num_sequences}
    pos, counts = _layout(token_seq, num_sequences, who)
    last = counts[token_seq] - 1 == pos  # [M] the last token of each non-empty sequence
    token_rewards = -kl_coef * kl + torch.where(last, seq_rewards[token_seq], 0.0)
    metrics = {"kl": kl.mean(), "empty_sequences": (counts == 0).sum().to(kl.dtype)}
    return token_rewards, metrics


# --------------------------------------------------------------------------------------------
# Advantages and returns
# --------------------------------------------------------------------------------------------


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    token_seq: torch.Tensor,
    num_sequences: int,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Generalized advantage estimation over each sequence's tokens; returns (advantages [M],
    returns [M]). For the tokens t = 0..T-1 of one sequence, with V_T = 0:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}     (A_T = 0)
        R_t     = A_t + V_t                           (the value targets)
    (Schulman et al., High-Dimensional Continuous Control Using Generalized Advantage Estimation,
    arXiv 1506.02438, Eq. 16; as used in PPO, arXiv 1707.06347, Eq. 11-12, and in PPO-max, arXiv
    2307.04964, whose background section states it). `token_rewards` [M] come from
    `kl_shaped_rewards`; `values` [M] are the critic's values V_t of the state before token t is
    generated, taken at rollout time.
    gamma = 1 and lam = 0.95 are PPO-max's settings (its released train_ppo script).

    The value after the last token is 0: the episode ends with the completion. A completion cut
    at the length limit is treated the same way (as in TRL, OpenRLHF and MOSS-RLHF), not
    bootstrapped from the critic. Inputs are detached: advantages and returns are targets.

    Computed by scattering each sequence into a zero-padded [S, Lmax] grid and scanning backwards
    over time (Lmax steps, all sequences at once); padding after a sequence's end has r = V = 0,
    so it contributes nothing and gives V_T = 0."""
    who = "gae"
    _check_flat(who, "token_rewards", token_rewards, values=values, token_seq=token_seq)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"{who}: need 0 <= gamma <= 1 and 0 <= lam <= 1; got gamma={gamma}, lam={lam}.")
    dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    rewards, values = token_rewards.detach().to(dtype), values.detach().to(dtype)
    if rewards.numel() == 0:
        return rewards.clone(), values.clone()
    pos, counts = _layout(token_seq, num_sequences, who)
    lmax = int(counts.max().item())
    grid_r = rewards.new_zeros(num_sequences, lmax)  # [S, Lmax]
    grid_v = rewards.new_zeros(num_sequences, lmax)
    grid_r[token_seq, pos] = rewards
    grid_v[token_seq, pos] = values
    next_v = torch.cat([grid_v[:, 1:], grid_v.new_zeros(num_sequences, 1)], dim=1)  # V_{t+1}; 0 past the end
    delta = grid_r + gamma * next_v - grid_v  # [S, Lmax]
    grid_a = torch.empty_like(delta)
    running = delta.new_zeros(num_sequences)  # A_{t+1}
    for t in range(lmax - 1, -1, -1):
        running = delta[:, t] + (gamma * lam) * running
        grid_a[:, t] = running
    advantages = grid_a[token_seq, pos]  # [M]
    return advantages, advantages + values


def whiten(
    x: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8, over: torch.Tensor | None = None
) -> torch.Tensor:
    """Whiten over all M entries [M] (or with the mean and variance of `over`, a population x is
    part of: the advantages of every process in a data-parallel rollout):
        y = (x - mean(x)) / sqrt(var(x) + eps),   var the population variance (divides by M),
    and with shift_mean=False, y + mean(x) (the scale is normalised but the mean kept; TRL's
    `masked_whiten` option, used there for rewards).

    Advantage normalisation of PPO-max (arXiv 2307.04964, Sec. 5.3.1 "Score Reparameterization",
    advantages normalisation): MOSS-RLHF, its released code, whitens with the mean subtracted
    (shift_mean=True) over the tokens of each minibatch, with the population variance, when its
    `use_advantage_norm` flag is on (its released train_ppo_en.sh leaves it off). Which tokens to
    whiten together is the caller's choice: pass that minibatch's advantages.
    Departure: eps = 1e-8 (TRL, OpenRLHF) where MOSS-RLHF adds 1e-6.

    Differentiable in x (advantages are usually detached first). M = 0 gives an empty tensor;
    M = 1 (or all equal) gives 0 (x - mean = 0), or x itself with shift_mean=False."""
    _check_flat("whiten", "x", x)
    if eps < 0.0:
        raise ValueError(f"whiten: `eps` must be >= 0; got {eps}.")
    if x.numel() == 0:
        return x.clone()
    pop = x if over is None else over.to(x.dtype)
    mean = pop.mean()
    var = ((pop - mean) ** 2).mean()
    y = (x - mean) * torch.rsqrt(var + eps)
    return y if shift_mean else y + mean


def reinforce_pp_advantages(token_rewards: torch.Tensor, token_seq: torch.Tensor, num_sequences: int, *, gather=None):
    """REINFORCE++ advantages [M] (Hu, REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models, arXiv 2501.03262, Sec. 3): no critic; each token's return is the sum of
    the rewards still to come in its sequence (gamma = 1),
        G_t = sum_{s >= t} r_s,   r_s = -kl_coef * KL_s + [s last] * r(x, y)   (`kl_shaped_rewards`),
    and the advantages are these returns normalised over the whole batch (global mean and std of
    every token's return, not per prompt group: the paper's argument against GRPO's per-prompt
    normalisation). `gather`: when this process holds a share of the batch, a function from its
    returns to the whole batch's (the recipe passes the processes' all-gather), so every process
    normalises with the same statistics. Returns (advantages [M], returns [M])."""
    returns, _ = gae(token_rewards, torch.zeros_like(token_rewards), token_seq, num_sequences, gamma=1.0, lam=1.0)
    return whiten(returns, over=gather(returns) if gather is not None else None), returns


# --------------------------------------------------------------------------------------------
# Reward normalisation (PPO-max)
# --------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean and variance of every reward seen so far, for PPO-max's reward normalisation
    (arXiv 2307.04964, Sec. 5.3.1 and the PPO-max setup: rewards are normalised with the mean
    and variance of the rewards seen so far, not of the current batch alone).

    `update(batch)` merges a batch with Chan et al.'s parallel formula (the batch form of Welford's
    update): with n, mean, m2 (sum of squared deviations) so far and n_b, mean_b, m2_b of the batch,
        n' = n + n_b,  mean' = mean + d * n_b / n',  m2' = m2 + m2_b + d^2 * n * n_b / n',
    d = mean_b - mean. It is accumulated in float64 (Python floats) whatever the rewards' dtype,
    so the statistics equal those of all rewards concatenated. One host sync per update.

    `var` is the unbiased sample variance m2 / (n - 1) and `std` its square root: the std that
    MOSS-RLHF and TRL's RunningMoments scale by. Before two rewards are seen, var = std = 1 (no
    scaling; MOSS-RLHF also starts from var = std = 1, as a prior of weight 1e-24 that has no
    effect once a batch is merged; we keep no prior, so the statistics are exact). A non-finite
    reward is a ValueError: it would poison every later value.

    `state_dict()` holds only a Python int and floats, so it checkpoints with
    torch.load(weights_only=True)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> None:
        x = rewards.detach().reshape(-1).to(torch.float64)
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean()
        mean_b, m2_b = torch.stack([mean_b, ((x - mean_b) ** 2).sum()]).tolist()
        if not (math.isfinite(mean_b) and math.isfinite(m2_b)):
            raise ValueError(
                f"RunningMoments.update: the batch of {n_b} rewards holds a non-finite value "
                f"(mean {mean_b}); fix the reward function before normalising."
            )
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count >= 2 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict:
        return {"count": int(self.count), "mean": float(self.mean), "m2": float(self.m2)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(
                f"RunningMoments.load_state_dict: missing keys {sorted(missing)}; "
                f"expected count, mean, m2 (got {sorted(state)})."
            )
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_rewards(
    rewards: torch.Tensor, mean, std, *, clip: float | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise and clip sequence rewards [S]:
        r' = clip((r - mean) / (std + eps), -clip, clip)
    PPO-max's reward normalisation and clipping (arXiv 2307.04964, Sec. 5.3.1, "Score
    Reparameterization": r~ = clip((r - mean(r)) / std(r), -delta, delta), mean and std over
    the rewards seen so far: pass `RunningMoments.mean` and `.std`, updated with this batch first,
    as MOSS-RLHF does). clip = None or 0 disables clipping.

    What the paper and its code do differ: the formula subtracts the mean, which is what this
    function follows; MOSS-RLHF's released script (use_reward_scaling without use_reward_norm)
    only divides by the running std ("do not -= mean since advantage will be normalized again")
    and does not clip (use_reward_clip off; its clip is 10 when on). Pass mean=0.0 to reproduce
    that.
    Departure: eps = 1e-8 in the denominator, so that a run whose rewards have all been equal
    (std = 0; common with 0/1 verifiable rewards) gives r - mean instead of a division by zero.
    `mean` and `std` may be floats or 0-d tensors; the result has the dtype of `rewards` (a
    float tensor)."""
    if rewards.ndim != 1:
        raise ValueError(f"normalize_rewards: `rewards` must be [S]; got shape {tuple(rewards.shape)}.")
    if clip is not None and clip < 0.0:
        raise ValueError(f"normalize_rewards: `clip` must be > 0 (or 0 / None for no clipping); got {clip}.")
    if isinstance(std, (int, float)) and std < 0.0:
        raise ValueError(f"normalize_rewards: `std` must be >= 0; got {std}.")
    out = (rewards - mean) / (std + eps)
    if clip:
        out = out.clamp(-clip, clip)
    return out


# --------------------------------------------------------------------------------------------
# Critic
# --------------------------------------------------------------------------------------------


@register(
    "ppo_value",
    summary="PPO's clipped value loss: 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2) per token.",
    citation="Zheng et al., Secrets of RLHF in Large Language Models Part I: PPO, arXiv 2307.04964 (value "
    "clipping, PPO-max); returns from GAE, Schulman et al., arXiv 1506.02438",
    data="value",
    reduction="token",
)
def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, clip_range: float = 0.2):
    """Clipped value loss per token; returns (per_token_loss [M], metrics).
        V_clip = old + clamp(V - old, -c, c)
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)
    V = `values` [M] (the critic now; gradients flow here), old = `old_values` [M] (the critic at
    rollout time), R = `returns` [M] from `gae`; old and R are detached. Value clipping keeps the
    critic within c of its rollout-time prediction per update, the pessimistic max mirroring the
    policy's clipped surrogate. It is not in the PPO paper (arXiv 1707.06347) but in OpenAI
    baselines' ppo2 (one of the code-level optimisations studied by Engstrom et al., arXiv
    2005.12729); PPO-max keeps it (arXiv
    2307.04964, "value function loss clipping", Fig. 5; MOSS-RLHF value_clip 0.2). The 0.5 is
    MOSS-RLHF's and TRL's. clip_range = inf turns clipping off (0.5 * (V - R)^2).

    V_clip is computed as clamp(V, old - c, old + c), the same value, but exactly V inside the
    range (old + (V - old) can differ from V by rounding), so no token counts as clipped by noise.
    Outside the range the clipped term has no gradient, so when it is the larger one the token's
    value gets no gradient this step.

    Reduce with the caller's token aggregation (MOSS-RLHF: mean over tokens). Metrics (detached 0-d
    tensors, token means, 0 when M = 0): "value_clip_fraction", the share of tokens whose clipped
    term is strictly larger (MOSS-RLHF's and TRL's vf_clipfrac), and "value_mean", mean of V."""
    who = "ppo_value_loss"
    _check_flat(who, "values", values, old_values=old_values, returns=returns)
    if not clip_range > 0.0:
        raise ValueError(f"{who}: `clip_range` must be > 0 (inf for no clipping); got {clip_range}.")
    old, ret = old_values.detach().to(values.dtype), returns.detach().to(values.dtype)
    unclipped = (values - ret) ** 2
    if math.isinf(clip_range):
        per_token = 0.5 * unclipped
        clipped_larger = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clip = torch.clamp(values, min=old - clip_range, max=old + clip_range)
        clipped = (v_clip - ret) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_larger = clipped.detach() > unclipped.detach()
    n = max(values.numel(), 1)
    metrics = {
        "value_clip_fraction": clipped_larger.to(values.dtype).sum() / n,
        "value_mean": values.detach().sum() / n,
    }
    return per_token, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """How much of the returns' variance the critic explains, a detached 0-d tensor:
        EV = 1 - Var(R - V) / Var(R)        (population variances over the M tokens)
    1 for a perfect critic, 0 for one that predicts a constant (e.g. the mean of R), negative for
    one worse than a constant. The diagnostic of OpenAI baselines / Stable-Baselines3 / CleanRL
    (PPO implementations' "explained_variance"). When Var(R) = 0 (M <= 1, or all returns equal)
    it is undefined and NaN is returned, as in those libraries; the strict-JSON metric writer
    records it as null. No host sync."""
    _check_flat("explained_variance", "values", values, returns=returns)
    v, r = values.detach(), returns.detach().to(values.dtype)
    if r.numel() == 0:
        return v.new_full((), float("nan"))
    var_r = ((r - r.mean()) ** 2).mean()
    resid = r - v
    var_resid = ((resid - resid.mean()) ** 2).mean()
    return torch.where(var_r > 0, 1.0 - var_resid / var_r, torch.full_like(var_r, float("nan")))
