"""Math-level tests of the PPO functions (alignkit/losses/ppo.py): hand-worked numbers and independent
float64 formulas written here as plain Python loops, never by calling the function under test.
Inputs are float64 so that tolerances can be 1e-12.
"""

import io
import math

import pytest
import torch

from alignkit.losses.ppo import (
    RunningMoments,
    explained_variance,
    gae,
    kl_per_token,
    kl_shaped_rewards,
    normalize_rewards,
    ppo_value_loss,
    whiten,
)


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def seq(values):
    return torch.tensor(values, dtype=torch.long)


def close(got, expected, atol=1e-12):
    as64 = lambda x: torch.as_tensor(x, dtype=torch.float64)
    torch.testing.assert_close(as64(got), as64(expected), rtol=0, atol=atol)


def reference_gae(rewards, values, token_seq, gamma, lam):
    """GAE (arXiv 1506.02438, Eq. 16) one sequence at a time in Python floats, V after the end = 0."""
    rewards, values, token_seq = rewards.tolist(), values.tolist(), token_seq.tolist()
    by_seq = {}
    for i, s in enumerate(token_seq):
        by_seq.setdefault(s, []).append(i)
    adv = [0.0] * len(rewards)
    for idxs in by_seq.values():
        next_value, next_adv = 0.0, 0.0
        for i in reversed(idxs):
            delta = rewards[i] + gamma * next_value - values[i]
            next_adv = delta + gamma * lam * next_adv
            adv[i] = next_adv
            next_value = values[i]
    return adv, [a + v for a, v in zip(adv, values)]


# A layout with sequences in shuffled block order, different lengths and an empty sequence (1):
# sequence 2 has 3 tokens, 0 has 1, 4 has 4, 3 has 1, 1 has none.
SHUFFLED_SEQ = [2, 2, 2, 0, 4, 4, 4, 4, 3]
SHUFFLED_S = 5


# ---------------------------------------------------------------------------------------------
# KL in the reward
# ---------------------------------------------------------------------------------------------


def test_kl_per_token_k1_and_k3():
    logps, ref = t64([-1.0, -2.0]), t64([-1.5, -1.0])
    # k1 = logp - ref
    close(kl_per_token(logps, ref), [0.5, -1.0])
    # k3 with d = ref - logp = [-0.5, 1.0]: exp(d) - d - 1
    close(kl_per_token(logps, ref, estimator="k3"), [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2.0])
    with pytest.raises(ValueError, match=r"unknown estimator 'k2'.*k1.*k3"):
        kl_per_token(logps, ref, estimator="k2")


def test_kl_shaped_rewards_hand_worked():
    # S = 3; sequence 0 has tokens 0..2, sequence 1 none, sequence 2 tokens 3..4. kl_coef = 0.5:
    #   token 0: -0.5 * 0.1 = -0.05;  token 1: -0.5 * 0.2 = -0.1;  token 2 (last of 0): 0.15 + 1.0 = 1.15
    #   token 3: -0.5 * 0.4 = -0.2;   token 4 (last of 2): -0.25 + 5.0 = 4.75
    # Sequence 1's reward -2.0 has no token to go on: dropped and counted.
    rewards, m = kl_shaped_rewards(
        t64([1.0, -2.0, 5.0]), t64([0.1, 0.2, -0.3, 0.4, 0.5]), seq([0, 0, 0, 2, 2]), 3, kl_coef=0.5
    )
    close(rewards, [-0.05, -0.1, 1.15, -0.2, 4.75])
    close(m["empty_sequences"], 1.0)
    close(m["kl"], (0.1 + 0.2 - 0.3 + 0.4 + 0.5) / 5)


def test_kl_shaped_rewards_blocks_in_any_order():
    # The same sequences with sequence 2's block first: each reward still lands on its own last token.
    rewards, m = kl_shaped_rewards(
        t64([1.0, -2.0, 5.0]), t64([0.4, 0.5, 0.1, 0.2, -0.3]), seq([2, 2, 0, 0, 0]), 3, kl_coef=0.5
    )
    close(rewards, [-0.2, 4.75, -0.05, -0.1, 1.15])
    close(m["empty_sequences"], 1.0)


def test_kl_shaped_rewards_rejects_bad_inputs():
    with pytest.raises(ValueError, match="kl_coef"):
        kl_shaped_rewards(t64([1.0]), t64([0.1]), seq([0]), 1, kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"\[S\] = \[2\]"):
        kl_shaped_rewards(t64([1.0]), t64([0.1]), seq([0]), 2, kl_coef=0.1)
    with pytest.raises(ValueError, match="not contiguous"):
        kl_shaped_rewards(t64([1.0, 2.0]), t64([0.1, 0.2, 0.3]), seq([0, 1, 0]), 2, kl_coef=0.1)


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def test_gae_hand_worked():
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72; V after each sequence's last token = 0.
    # Sequence 0: r = [0.1, -0.2, 1.0], V = [0.5, 0.4, 0.3]
    #   delta_2 = 1.0 + 0          - 0.3 =  0.7
    #   delta_1 = -0.2 + 0.9 * 0.3 - 0.4 = -0.33
    #   delta_0 = 0.1 + 0.9 * 0.4  - 0.5 = -0.04
    #   A_2 = 0.7;  A_1 = -0.33 + 0.72 * 0.7 = 0.174;  A_0 = -0.04 + 0.72 * 0.174 = 0.08528
    #   R = A + V = [0.58528, 0.574, 1.0]
    # Sequence 1: r = [0.0, 2.0], V = [1.0, -1.0]
    #   delta_1 = 2.0 - (-1.0) = 3.0;  delta_0 = 0.0 + 0.9 * (-1.0) - 1.0 = -1.9
    #   A_1 = 3.0;  A_0 = -1.9 + 0.72 * 3.0 = 0.26;  R = [1.26, 2.0]
    adv, ret = gae(
        t64([0.1, -0.2, 1.0, 0.0, 2.0]), t64([0.5, 0.4, 0.3, 1.0, -1.0]), seq([0, 0, 0, 1, 1]), 2, gamma=0.9, lam=0.8
    )
    close(adv, [0.08528, 0.174, 0.7, 0.26, 3.0])
    close(ret, [0.58528, 0.574, 1.0, 1.26, 2.0])


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (1.0, 1.0), (0.99, 0.0), (0.0, 0.5)])
def test_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    token_seq = seq(SHUFFLED_SEQ)
    rewards = torch.randn(len(SHUFFLED_SEQ), generator=g, dtype=torch.float64)
    values = torch.randn(len(SHUFFLED_SEQ), generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, token_seq, SHUFFLED_S, gamma=gamma, lam=lam)
    exp_adv, exp_ret = reference_gae(rewards, values, token_seq, gamma, lam)
    close(adv, exp_adv)
    close(ret, exp_ret)


def test_gae_long_random_layout_matches_python_loop():
    g = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(0, 30, (12,), generator=g)]
    order = torch.randperm(12, generator=g).tolist()
    token_seq = seq([s for s in order for _ in range(lengths[s])])
    m = token_seq.numel()
    rewards, values = torch.randn(m, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, token_seq, 12, gamma=0.97, lam=0.9)
    exp_adv, exp_ret = reference_gae(rewards, values, token_seq, 0.97, 0.9)
    close(adv, exp_adv)
    close(ret, exp_ret)


def test_gae_identity_advantage_is_reward_minus_kl_to_come():
    # gamma = lam = 1, V = 0: A_t = sum_{k >= t} r_k = seq_reward - kl_coef * sum_{k >= t} kl_k.
    g = torch.Generator().manual_seed(2)
    token_seq = seq(SHUFFLED_SEQ)
    kl = torch.rand(len(SHUFFLED_SEQ), generator=g, dtype=torch.float64)
    seq_rewards = torch.randn(SHUFFLED_S, generator=g, dtype=torch.float64)
    kl_coef = 0.1
    rewards, _ = kl_shaped_rewards(seq_rewards, kl, token_seq, SHUFFLED_S, kl_coef=kl_coef)
    adv, ret = gae(rewards, torch.zeros_like(rewards), token_seq, SHUFFLED_S, gamma=1.0, lam=1.0)
    expected = []
    for i, s in enumerate(SHUFFLED_SEQ):
        to_come = sum(kl[k].item() for k in range(i, len(SHUFFLED_SEQ)) if SHUFFLED_SEQ[k] == s)
        expected.append(seq_rewards[s].item() - kl_coef * to_come)
    close(adv, expected)
    close(ret, expected)


def test_gae_dtype_detach_and_empty():
    token_seq = seq([0, 0, 1])
    values = torch.tensor([0.5, 0.25, 1.0], requires_grad=True)
    adv, ret = gae(torch.tensor([0.0, 1.0, 2.0]), values, token_seq, 2)
    assert adv.dtype == ret.dtype == torch.float32
    assert not adv.requires_grad and not ret.requires_grad
    # float32 run agrees with the float64 loop to float32 precision (values of order 1)
    exp_adv, _ = reference_gae(t64([0.0, 1.0, 2.0]), t64([0.5, 0.25, 1.0]), token_seq, 1.0, 0.95)
    close(adv, exp_adv, atol=1e-6)
    adv, ret = gae(t64([]), t64([]), seq([]), 3)
    assert adv.shape == ret.shape == (0,)


def test_gae_rejects_bad_layouts():
    with pytest.raises(ValueError, match="not contiguous"):
        gae(t64([1, 2, 3]), t64([0, 0, 0]), seq([0, 1, 0]), 2)
    with pytest.raises(ValueError, match=r"outside 0..1"):
        gae(t64([1, 2]), t64([0, 0]), seq([0, 2]), 2)
    with pytest.raises(ValueError, match="long"):
        gae(t64([1, 2]), t64([0, 0]), torch.tensor([0, 1], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="gamma"):
        gae(t64([1, 2]), t64([0, 0]), seq([0, 1]), 2, gamma=1.5)


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------


def test_whiten_hand_worked():
    # x = [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], population var (4 + 1 + 0 + 9) / 4 = 3.5
    s = math.sqrt(3.5 + 1e-8)
    close(whiten(t64([1, 2, 3, 6])), [-2 / s, -1 / s, 0.0, 3 / s])
    close(whiten(t64([1, 2, 3, 6]), shift_mean=False), [3 - 2 / s, 3 - 1 / s, 3.0, 3 + 3 / s])
    close(whiten(t64([1, 2, 3, 6]), eps=0.0), [-2 / math.sqrt(3.5), -1 / math.sqrt(3.5), 0.0, 3 / math.sqrt(3.5)])
    close(whiten(t64([4.0, 4.0])), [0.0, 0.0])  # no spread: 0 / sqrt(eps)


def test_whiten_moments():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3 + 7
    y = whiten(x, eps=0.0)
    close(y.mean(), 0.0)
    close(y.var(unbiased=False), 1.0)
    z = whiten(x, shift_mean=False, eps=0.0)
    close(z.mean(), x.mean())
    close(z.var(unbiased=False), 1.0)


def test_whiten_gradcheck():
    x = torch.randn(7, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: whiten(v), (x,))
    assert torch.autograd.gradcheck(lambda v: whiten(v, shift_mean=False), (x,))


# ---------------------------------------------------------------------------------------------
# Reward normalisation
# ---------------------------------------------------------------------------------------------


def test_running_moments_match_concatenated_batches():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) * 2 + 10 for n in (5, 1, 17, 3)]
    rm = RunningMoments()
    assert rm.var == 1.0 and rm.std == 1.0  # nothing seen: no scaling
    rm.update(batches[0][:1])
    assert rm.count == 1 and rm.std == 1.0 and rm.mean == batches[0][0].item()
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    everything = torch.cat(batches)
    assert rm.count == everything.numel()
    close(rm.mean, everything.mean())
    close(rm.var, everything.var(unbiased=True))
    close(rm.std, everything.std(unbiased=True))


def test_running_moments_float32_rewards_accumulate_in_float64():
    rm = RunningMoments()
    x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float32)
    rm.update(x)
    rm.update(x[:2])
    # all five: [1, 2, 4, 1, 2], mean 2, squared deviations 1 + 0 + 4 + 1 + 0 = 6, var = 6 / 4
    assert isinstance(rm.mean, float)
    close(rm.mean, 2.0)
    close(rm.var, 1.5)


def test_running_moments_state_dict_round_trip():
    g = torch.Generator().manual_seed(6)
    a, b = RunningMoments(), RunningMoments()
    a.update(torch.randn(9, generator=g, dtype=torch.float64))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state == a.state_dict() and isinstance(state["count"], int) and isinstance(state["m2"], float)
    b.load_state_dict(state)
    nxt = torch.randn(4, generator=g, dtype=torch.float64)
    a.update(nxt)
    b.update(nxt)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({"count": 1})


def test_running_moments_refuse_non_finite():
    rm = RunningMoments()
    with pytest.raises(ValueError, match="non-finite"):
        rm.update(t64([1.0, float("nan")]))
    assert rm.count == 0


def test_normalize_rewards_and_clip():
    r = t64([3.0, -1.0, 10.0])
    # mean 1, std 2: (r - 1) / 2 = [1, -1, 4.5]
    close(normalize_rewards(r, 1.0, 2.0, eps=0.0), [1.0, -1.0, 4.5])
    close(normalize_rewards(r, 1.0, 2.0, clip=2.0, eps=0.0), [1.0, -1.0, 2.0])
    close(normalize_rewards(r, 1.0, 2.0, clip=0.5, eps=0.0), [0.5, -0.5, 0.5])
    close(normalize_rewards(r, 1.0, 2.0, clip=0.0, eps=0.0), [1.0, -1.0, 4.5])  # 0 disables
    close(normalize_rewards(r, 1.0, 2.0), [2 / (2 + 1e-8), -2 / (2 + 1e-8), 9 / (2 + 1e-8)])  # default eps
    close(normalize_rewards(r, 0.0, 2.0, eps=0.0), [1.5, -0.5, 5.0])  # MOSS-RLHF's released default: scale only
    close(
        normalize_rewards(r, torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), eps=0.0),
        [1.0, -1.0, 4.5],
    )
    with pytest.raises(ValueError, match="clip"):
        normalize_rewards(r, 0.0, 1.0, clip=-1.0)


def test_normalize_with_running_moments():
    # Two batches [1, 3] and [5, 7]: after both, mean 4, unbiased var (9 + 1 + 1 + 9) / 3 = 20 / 3.
    rm = RunningMoments()
    rm.update(t64([1.0, 3.0]))
    rm.update(t64([5.0, 7.0]))
    s = math.sqrt(20 / 3)
    close(normalize_rewards(t64([5.0, 7.0]), rm.mean, rm.std, eps=0.0), [1 / s, 3 / s])


# ---------------------------------------------------------------------------------------------
# Value loss and explained variance
# ---------------------------------------------------------------------------------------------

# (V, old, R) per token, clip_range 0.2, V_clip = old + clamp(V - old, -0.2, 0.2):
#   1: (1.0, 0.5, 2.0)   V_clip 0.7:  (V-R)^2 = 1,      (V_clip-R)^2 = 1.69 -> 0.5 * 1.69 = 0.845  clipped larger
#   2: (1.0, 0.5, 0.0)   V_clip 0.7:  1                 0.49            -> 0.5 * 1    = 0.5
#   3: (0.55, 0.5, 0.0)  in range:    0.3025            0.3025          -> 0.15125               (tie: not counted)
#   4: (-1.0, 0.0, -0.5) V_clip -0.2: 0.25              0.09            -> 0.125
#   5: (-0.5, 0.0, -1.0) V_clip -0.2: 0.25              0.64            -> 0.32                  clipped larger
# d loss / dV = V - R where the unclipped term is active or V is in range, 0 where the clipped term
# (constant in V outside the range) is active: [0, 1.0, 0.55, -0.5, 0].
V_HAND, OLD_HAND, R_HAND = [1.0, 1.0, 0.55, -1.0, -0.5], [0.5, 0.5, 0.5, 0.0, 0.0], [2.0, 0.0, 0.0, -0.5, -1.0]


def test_ppo_value_loss_hand_worked():
    values = t64(V_HAND).requires_grad_(True)
    loss, m = ppo_value_loss(values, t64(OLD_HAND), t64(R_HAND), clip_range=0.2)
    close(loss, [0.845, 0.5, 0.15125, 0.125, 0.32])
    close(m["value_clip_fraction"], 2 / 5)
    close(m["value_mean"], (1.0 + 1.0 + 0.55 - 1.0 - 0.5) / 5)
    assert not m["value_clip_fraction"].requires_grad and m["value_mean"].ndim == 0
    loss.sum().backward()
    close(values.grad, [0.0, 1.0, 0.55, -0.5, 0.0])


def test_ppo_value_loss_without_clipping():
    loss, m = ppo_value_loss(t64(V_HAND), t64(OLD_HAND), t64(R_HAND), clip_range=float("inf"))
    close(loss, [0.5, 0.5, 0.15125, 0.125, 0.125])  # 0.5 * (V - R)^2
    close(m["value_clip_fraction"], 0.0)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_value_loss(t64(V_HAND), t64(OLD_HAND), t64(R_HAND), clip_range=0.0)


def test_ppo_value_loss_gradcheck():
    g = torch.Generator().manual_seed(7)
    old = torch.randn(12, generator=g, dtype=torch.float64)
    returns = torch.randn(12, generator=g, dtype=torch.float64)
    # V within +-0.5 of old: both branches and both sides of the clip range occur
    values = (old + torch.rand(12, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)
    _, m = ppo_value_loss(values, old, returns)
    assert 0.0 < m["value_clip_fraction"].item() < 1.0
    assert torch.autograd.gradcheck(lambda v: ppo_value_loss(v, old, returns, clip_range=0.2)[0], (values,))


def test_explained_variance():
    r = t64([1.0, 2.0, 3.0, 4.0])
    close(explained_variance(r.clone(), r), 1.0)  # perfect critic
    close(explained_variance(torch.full_like(r, 2.5), r), 0.0)  # predicts the mean
    close(explained_variance(torch.full_like(r, -7.0), r), 0.0)  # any constant
    # V = [1, 2, 2, 5]: R - V = [0, 0, 1, -1], var 0.5; Var(R) = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    close(explained_variance(t64([1.0, 2.0, 2.0, 5.0]), r), 1 - 0.5 / 1.25)
    assert explained_variance(t64([1.0, 2.0]), t64([3.0, 3.0])).isnan()  # Var(R) = 0: undefined
    assert explained_variance(t64([]), t64([])).isnan()
