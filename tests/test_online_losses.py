"""Math-level tests of the online-RL functions: hand-worked numbers and hand-derived gradients.

Expected values are worked out in the comments (or by the independent float64 loop `_reference_loss`),
never by calling the function under test. Inputs are float64 so that tolerances can be 1e-12.
"""

import math

import pytest
import torch

from alignkit.losses.online import (
    best_of_k,
    best_worst_pairs,
    group_advantages,
    kl_k3,
    policy_gradient_loss,
    rloo_advantages,
    zero_variance_fraction,
)


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def close(got, expected, atol=1e-12):
    as64 = lambda x: torch.as_tensor(x, dtype=torch.float64)
    torch.testing.assert_close(as64(got), as64(expected), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def test_group_advantages_grpo_unbiased_std():
    # Group [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3.
    # Group [3, 3, 3, 3]: deviations 0 -> 0 / (0 + eps) = 0.
    a = group_advantages(t64([[1, 0, 0, 1], [3, 3, 3, 3]]))
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.86587...
    close(a, [[s, -s, -s, s], [0, 0, 0, 0]])


def test_group_advantages_std_is_sample_not_population():
    # [2, 4, 6]: deviations -2, 0, 2; unbiased std = sqrt(8 / 2) = 2 -> -1, 0, 1 with eps = 0.
    # (The population std sqrt(8 / 3) would give -1.2247..., 0, 1.2247...)
    close(group_advantages(t64([[2, 4, 6]]), eps=0.0), [[-1, 0, 1]])
    # default eps = 1e-4 enters the denominator: -2 / 2.0001
    close(group_advantages(t64([[2, 4, 6]])), [[-2 / 2.0001, 0, 2 / 2.0001]])


def test_group_advantages_dr_grpo_centres_only():
    close(
        group_advantages(t64([[1, 0, 0, 1], [2, 4, 6, 0]]), scale_by_std=False),
        [[0.5, -0.5, -0.5, 0.5], [-1, 1, 3, -3]],
    )  # second group: mean 3


def test_group_advantages_int_rewards_become_float32():
    a = group_advantages(torch.tensor([[1, 0]]), scale_by_std=False)
    assert a.dtype == torch.float32 and a.tolist() == [[0.5, -0.5]]


def test_rloo_advantages():
    # sum = 12, G - 1 = 3: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
    close(rloo_advantages(t64([[1, 2, 3, 6]])), [[-8 / 3, -4 / 3, 0, 4]])
    # G = 2: each sample's baseline is the other one
    close(rloo_advantages(t64([[1, 0], [5, 5]])), [[1, -1], [0, 0]])


@pytest.mark.parametrize("fn", [rloo_advantages, group_advantages])
def test_single_sample_groups_are_an_error(fn):
    with pytest.raises(ValueError, match=r"G >= 2"):
        fn(t64([[1.0], [0.0]]))


@pytest.mark.parametrize("fn", [rloo_advantages, group_advantages, zero_variance_fraction, best_of_k, best_worst_pairs])
def test_rewards_must_be_2d(fn):
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        fn(t64([1.0, 0.0, 1.0]))


def test_zero_variance_fraction():
    # groups 0 and 2 are constant, 1 and 3 are not -> 2 / 4
    got = zero_variance_fraction(t64([[1, 1, 1], [0, 1, 0], [0, 0, 0], [2, 2, 3]]))
    assert isinstance(got, float) and got == 0.5
    assert zero_variance_fraction(t64([[1, 0]])) == 0.0


# ---------------------------------------------------------------------------------------------
# KL estimator
# ---------------------------------------------------------------------------------------------


def test_kl_k3_values():
    # delta = ref - logp = [0, 1, -0.5]; k3 = e^delta - delta - 1
    got = kl_k3(t64([-1.0, -2.0, -0.5]), t64([-1.0, -1.0, -1.0]))
    close(got, [0.0, math.e - 2, math.exp(-0.5) - 0.5])  # [0, 0.71828..., 0.10653...]
    assert (got >= 0).all()


# ---------------------------------------------------------------------------------------------
# Policy-gradient loss: aggregations
# ---------------------------------------------------------------------------------------------

# S = 3 sequences of lengths 1, 3, 0 (the last is empty); A = [2, -1, 5].
# At ratio 1 (logp == old) the per-token loss is -A: tokens [-2, 1, 1, 1].
AGG_SEQ = torch.tensor([0, 1, 1, 1])
AGG_ADV = t64([2.0, -1.0, 5.0])
AGG_LOGPS = [-1.0, -0.5, -2.0, -0.25]


@pytest.mark.parametrize(
    "aggregation,kwargs,loss,grad",
    [
        # seq means -2 and 1, mean over the 2 non-empty sequences = -0.5;
        # d/dlogp = -A / len(seq) / 2: seq 0 -> -2 / 1 / 2 = -1, seq 1 -> 1 / 3 / 2 = 1/6
        ("grpo", {}, -0.5, [-1.0, 1 / 6, 1 / 6, 1 / 6]),
        # token mean: (-2 + 1 + 1 + 1) / 4 = 0.25; d/dlogp = -A / 4
        ("dapo", {}, 0.25, [-0.5, 0.25, 0.25, 0.25]),
        # sum / (S * L) = 1 / (3 * 4); d/dlogp = -A / 12
        ("dr_grpo", {"max_completion_length": 4}, 1 / 12, [-2 / 12, 1 / 12, 1 / 12, 1 / 12]),
    ],
)
def test_aggregations_unequal_lengths(aggregation, kwargs, loss, grad):
    logps = t64(AGG_LOGPS).requires_grad_()
    got, metrics = policy_gradient_loss(logps, t64(AGG_LOGPS), AGG_ADV, AGG_SEQ, 3, aggregation=aggregation, **kwargs)
    close(got, loss)
    got.backward()
    close(logps.grad, grad)
    close(metrics["ratio_mean"], 1.0)
    close(metrics["clip_fraction"], 0.0)
    assert "kl" not in metrics


def test_grpo_gradient_at_ratio_one_is_minus_a_over_len_over_s():
    # no empty sequence: S = 2, lengths 2 and 1, A = [0.5, -3]
    logps = t64([-0.3, -1.2, -0.7]).requires_grad_()
    loss, _ = policy_gradient_loss(logps, logps.detach().clone(), t64([0.5, -3.0]), torch.tensor([0, 0, 1]), 2)
    loss.backward()
    close(logps.grad, [-0.5 / 2 / 2, -0.5 / 2 / 2, 3 / 1 / 2])
    close(loss, (-0.5 + 3) / 2)


def test_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_gradient_loss(t64(AGG_LOGPS), t64(AGG_LOGPS), AGG_ADV, AGG_SEQ, 3, aggregation="dr_grpo")


def test_unknown_aggregation():
    with pytest.raises(ValueError, match=r"unknown aggregation 'token'.*dapo"):
        policy_gradient_loss(t64(AGG_LOGPS), t64(AGG_LOGPS), AGG_ADV, AGG_SEQ, 3, aggregation="token")


def test_advantages_must_be_per_sequence():
    with pytest.raises(ValueError, match=r"reshape\(-1\)"):
        policy_gradient_loss(t64(AGG_LOGPS), t64(AGG_LOGPS), AGG_ADV.view(1, 3), AGG_SEQ, 3)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_no_tokens_gives_zero_not_nan(aggregation):
    logps = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_gradient_loss(
        logps,
        logps.detach(),
        t64([1.0, -1.0]),
        torch.zeros(0, dtype=torch.long),
        2,
        aggregation=aggregation,
        max_completion_length=8,
    )
    assert loss.item() == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    loss.backward()


# ---------------------------------------------------------------------------------------------
# Policy-gradient loss: clipping (DAPO clip-higher), KL, gradient routing
# ---------------------------------------------------------------------------------------------


def test_clipping_both_directions_with_decoupled_range():
    # One token per sequence, "dapo" aggregation over M = 5, clip range [0.8, 1.28].
    #   t  ratio   A   objective = min(ratio A, clip(ratio) A)  clipped?  d loss / d logp = -(d obj)/5
    #   0  1.5    +1   min(1.5, 1.28)   = 1.28                  high      0
    #   1  0.5    -1   min(-0.5, -0.8)  = -0.8                  low       0
    #   2  1.5    -1   min(-1.5, -1.28) = -1.5                  no        -(1.5 * -1) / 5 = 0.3
    #   3  1.25   +2   min(2.5, 2.5)    = 2.5 (1.25 <= 1.28)    no        -(1.25 * 2) / 5 = -0.5
    #   4  0.5    +1   min(0.5, 0.8)    = 0.5                   no        -(0.5 * 1) / 5 = -0.1
    # loss = -(1.28 - 0.8 - 1.5 + 2.5 + 0.5) / 5 = -0.396
    # With a symmetric 0.2 range token 3 would be clipped at 1.2 (objective 2.4), so this fails.
    ratios = [1.5, 0.5, 1.5, 1.25, 0.5]
    old = t64([-1.0, -2.0, -0.5, -3.0, -1.5])
    logps = (old + torch.log(t64(ratios))).requires_grad_()
    loss, m = policy_gradient_loss(
        logps,
        old,
        t64([1.0, -1.0, -1.0, 2.0, 1.0]),
        torch.arange(5),
        5,
        clip_low=0.2,
        clip_high=0.28,
        aggregation="dapo",
    )
    close(loss, -0.396)
    loss.backward()
    close(logps.grad, [0.0, 0.0, 0.3, -0.5, -0.1])
    close(m["clip_fraction/high"], 0.2)
    close(m["clip_fraction/low"], 0.2)
    close(m["clip_fraction"], 0.4)
    close(m["ratio_mean"], (1.5 + 0.5 + 1.5 + 1.25 + 0.5) / 5)  # 1.05


def test_kl_term_value_and_gradient():
    # One sequence of 3 tokens at ratio 1, A = 1, grpo (= token mean here), kl_coef = 0.1.
    # delta = ref - logp = [0, 1, -0.5]; k3 = [0, e - 2, e^-0.5 - 0.5]
    # loss = -1 + 0.1 * mean(k3); d k3 / d logp = 1 - e^delta, so
    # d loss / d logp = (-1 + 0.1 * (1 - e^delta)) / 3
    logps = t64([-1.0, -2.0, -0.5]).requires_grad_()
    ref = t64([-1.0, -1.0, -1.0])
    k3 = [0.0, math.e - 2, math.exp(-0.5) - 0.5]
    loss, m = policy_gradient_loss(
        logps, logps.detach().clone(), t64([1.0]), torch.zeros(3, dtype=torch.long), 1, ref_token_logps=ref, kl_coef=0.1
    )
    close(loss, -1 + 0.1 * sum(k3) / 3)
    close(m["kl"], sum(k3) / 3)
    loss.backward()
    close(logps.grad, [(-1 + 0.1 * (1 - math.exp(d))) / 3 for d in (0.0, 1.0, -0.5)])


def test_kl_reported_but_not_added_when_coef_zero():
    logps = t64([-1.0, -2.0, -0.5])
    loss, m = policy_gradient_loss(
        logps, logps, t64([1.0]), torch.zeros(3, dtype=torch.long), 1, ref_token_logps=t64([-1.0, -1.0, -1.0])
    )
    close(loss, -1.0)
    close(m["kl"], (math.e - 2 + math.exp(-0.5) - 0.5) / 3)


def test_kl_coef_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_token_logps"):
        policy_gradient_loss(t64(AGG_LOGPS), t64(AGG_LOGPS), AGG_ADV, AGG_SEQ, 3, kl_coef=0.1)


def test_gradients_flow_through_token_logps_only():
    old = t64([-1.0, -0.4, -2.0]).requires_grad_()
    ref = t64([-1.5, -0.5, -1.0]).requires_grad_()
    adv = t64([1.0, -2.0]).requires_grad_()
    logps = t64([-0.9, -0.6, -2.1]).requires_grad_()
    loss, metrics = policy_gradient_loss(logps, old, adv, torch.tensor([0, 1, 1]), 2, ref_token_logps=ref, kl_coef=0.05)
    loss.backward()
    assert logps.grad is not None and old.grad is None and ref.grad is None and adv.grad is None
    assert not any(v.requires_grad for v in metrics.values())


def _reference_loss(logps, old, adv, seq, S, lo, hi, ref, beta, aggregation, max_len):
    """Independent float64 loop over tokens, straight from the formulas in the docstring."""
    per_seq = {}
    for lp, op, s, rp in zip(logps, old, seq, ref):
        r = math.exp(lp - op)
        a = adv[s]
        obj = min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
        d = rp - lp
        per_seq.setdefault(s, []).append(-obj + beta * (math.exp(d) - d - 1))
    flat = [x for v in per_seq.values() for x in v]
    if aggregation == "grpo":
        return sum(sum(v) / len(v) for v in per_seq.values()) / len(per_seq)
    if aggregation == "dapo":
        return sum(flat) / len(flat)
    return sum(flat) / (S * max_len)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_matches_reference_loop_on_random_tokens(aggregation):
    g = torch.Generator().manual_seed(0)
    S, M = 6, 23
    seq = torch.sort(torch.randint(0, S - 1, (M,), generator=g)).values  # sequence S - 1 stays empty
    old = -3 * torch.rand(M, generator=g, dtype=torch.float64)
    logps = old + (torch.rand(M, generator=g, dtype=torch.float64) - 0.5)  # ratios in ~[0.61, 1.65]
    ref = old + 0.4 * (torch.rand(M, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    kw = dict(
        clip_low=0.1, clip_high=0.15, ref_token_logps=ref, kl_coef=0.3, aggregation=aggregation, max_completion_length=9
    )
    loss, m = policy_gradient_loss(logps, old, adv, seq, S, **kw)
    expected = _reference_loss(
        logps.tolist(), old.tolist(), adv.tolist(), seq.tolist(), S, 0.1, 0.15, ref.tolist(), 0.3, aggregation, 9
    )
    close(loss, expected)
    ratio = (logps - old).exp()
    a = adv[seq]
    n_low = sum(1 for r, x in zip(ratio.tolist(), a.tolist()) if r < 0.9 and x < 0)
    n_high = sum(1 for r, x in zip(ratio.tolist(), a.tolist()) if r > 1.15 and x > 0)
    assert n_low > 0 and n_high > 0  # the draw exercises both clip directions
    close(m["clip_fraction/low"], n_low / M)
    close(m["clip_fraction/high"], n_high / M)


def test_float32_in_float32_out():
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, m = policy_gradient_loss(
        logps,
        logps.detach(),
        torch.tensor([1.0]),
        torch.tensor([0, 0]),
        1,
        ref_token_logps=torch.tensor([-1.0, -1.0]),
        kl_coef=0.1,
    )
    assert loss.dtype == torch.float32 and m["kl"].dtype == torch.float32
    loss.backward()
    assert logps.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Selection: online DPO pairs, best-of-K
# ---------------------------------------------------------------------------------------------

REWARDS = t64(
    [
        [1.0, 3.0, 3.0, 0.0, 0.0],  # best: first 3 (idx 1); worst: first 0 (idx 3)
        [2.0, 2.0, 2.0, 2.0, 2.0],  # all equal: no preference
        [0.5, -1.0, 0.5, 2.0, -1.0],  # best idx 3; worst: first -1 (idx 1)
    ]
)


def test_best_worst_pairs_ties_take_first_index():
    best, worst, valid = best_worst_pairs(REWARDS)
    assert best.tolist() == [1, 0, 3] and worst.tolist() == [3, 0, 1]
    assert valid.tolist() == [True, False, True] and valid.dtype == torch.bool


def test_best_of_k():
    got = best_of_k(REWARDS)
    assert got.tolist() == [1, 0, 3] and got.dtype == torch.long


def test_truncated_importance_weights_by_hand():
    from alignkit.losses.online import truncated_importance_weights

    trainer = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    w, sums = truncated_importance_weights(trainer, sampler, cap=1.5)
    # exp(0.5) = 1.6487 > 1.5 -> 1.5; exp(-1) = 0.3679; exp(0) = 1
    assert w.tolist() == pytest.approx([1.5, math.exp(-1.0), 1.0], abs=1e-12)
    assert float(sums["tis/weight_mean"]) == pytest.approx(1.5 + math.exp(-1.0) + 1.0, abs=1e-12)
    assert float(sums["tis/capped_fraction"]) == 1.0
    assert not w.requires_grad  # a correction of the sampling distribution, not differentiated


def test_masked_importance_weights_by_hand():
    from alignkit.losses.online import masked_importance_weights

    trainer = torch.tensor([-1.0, -2.0, -0.5, -0.3, math.log(2.0), -1.0], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([-1.5, -1.0, -0.5, -0.2, 0.0, -math.inf], dtype=torch.float64)
    m, sums = masked_importance_weights(trainer, sampler, low=0.5, high=2.0)
    # ratios: exp(0.5) = 1.65 (kept), exp(-1) = 0.37 < 0.5 (masked low), 1 (kept), exp(-0.1) = 0.90
    # (kept), exactly 2 = high (kept: bounds included), +inf (sampler log-prob -inf: masked high)
    assert m.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert float(sums["mis/masked_fraction"]) == 2.0
    assert float(sums["mis/masked_low_fraction"]) == 1.0
    assert float(sums["mis/masked_high_fraction"]) == 1.0
    assert not m.requires_grad and m.dtype == torch.float64
    m2, _ = masked_importance_weights(trainer, sampler, low=0.5, high=1.5)  # 1.65 > 1.5 now masked too
    assert m2.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="0 < low < 1 < high"):
        masked_importance_weights(trainer, sampler, low=1.5, high=2.0)


def _pg_term():
    from alignkit.losses.combine import resolve_terms

    (term,) = resolve_terms({"name": "ppo_clip"}, [], data="rollout")
    return term


def test_policy_gradient_mask_then_truncate_by_hand():
    from alignkit.train.rollouts import policy_gradient

    # logps == old: ratio 1, ppo_clip's per-token loss is -A_t; `dapo` sums them (aggregate_sum).
    old = t64([-1.0, -2.0, -0.5, -0.3])
    sampler = t64([-1.5, -1.0, -0.6, -1.3])  # trainer/sampler ratios e^0.5, e^-1, e^0.1, e^1
    adv = t64([1.0, 2.0, 3.0, 4.0])
    segs = torch.tensor([0, 0, 1, 1])
    args = (_pg_term(), old.clone(), old, adv, segs, 2, "dapo", 8)
    loss, m = policy_gradient(*args, sampler_logps=sampler, tis_cap=1.2, is_mask=(0.5, 2.0))
    # mask [0.5, 2]: e^-1 = 0.37 and e^1 = 2.72 dropped; truncate the kept: min(e^0.5, 1.2) = 1.2,
    # min(e^0.1, 1.2) = e^0.1. Weights [1.2, 0, e^0.1, 0].
    close(loss, -(1.0 * 1.2 + 3.0 * math.exp(0.1)))
    close(m["mis/masked_fraction"], 2 / 4)
    close(m["mis/masked_low_fraction"], 1 / 4)
    close(m["mis/masked_high_fraction"], 1 / 4)
    # tis/ metrics over all four tokens, as without the mask: weights 1.2, e^-1, e^0.1, 1.2
    close(m["tis/weight_mean"], (1.2 + math.exp(-1.0) + math.exp(0.1) + 1.2) / 4)
    close(m["tis/capped_fraction"], 2 / 4)
    # each alone: mask only -> weights [1, 0, 1, 0]; truncation only -> [1.2, e^-1, e^0.1, 1.2]
    loss_mis, m_mis = policy_gradient(*args, sampler_logps=sampler, is_mask=(0.5, 2.0))
    close(loss_mis, -(1.0 + 3.0))
    assert not any(k.startswith("tis/") for k in m_mis)
    loss_tis, m_tis = policy_gradient(*args, sampler_logps=sampler, tis_cap=1.2)
    close(loss_tis, -(1.0 * 1.2 + 2.0 * math.exp(-1.0) + 3.0 * math.exp(0.1) + 4.0 * 1.2))
    assert not any(k.startswith("mis/") for k in m_tis)
    # no sampler log-probs: nothing to compare, neither applies
    loss_none, m_none = policy_gradient(*args, tis_cap=1.2, is_mask=(0.5, 2.0))
    close(loss_none, -(1.0 + 2.0 + 3.0 + 4.0))
    assert not any(k.startswith(("tis/", "mis/")) for k in m_none)


def test_policy_gradient_masked_token_has_no_gradient_and_stays_in_the_normaliser():
    from alignkit.train.rollouts import policy_gradient

    # One sequence of three tokens, `grpo` aggregation: mean over its tokens, times 1 sequence.
    # Token 1's ratio e^-1 = 0.37 < 0.5 is masked; tokens 0 and 2 (ratios 1 and e^0.2) are kept.
    old = t64([-1.0, -2.0, -0.5])
    sampler = t64([-1.0, -1.0, -0.7])
    logps = old.clone().requires_grad_(True)
    adv = t64([2.0, 5.0, -1.0])
    segs = torch.tensor([0, 0, 0])
    loss, m = policy_gradient(
        _pg_term(), logps, old, adv, segs, 1, "grpo", 8, sampler_logps=sampler, is_mask=(0.5, 2.0)
    )
    # Masked tokens count in the denominator: (-2 + 0 + 1) / 3, not (-2 + 1) / 2.
    close(loss, (-2.0 + 1.0) / 3)
    loss.backward()
    # d(-ratio * A)/d logp = -A at ratio 1 (unclipped), times 1/3 from the mean; 0 for the masked one
    close(logps.grad, t64([-2.0 / 3, 0.0, 1.0 / 3]))
    close(m["mis/masked_fraction"], 1 / 3)


def test_kl_penalty_in_loss_by_hand():
    from alignkit.losses.online import kl_penalty_in_loss

    per_token = torch.tensor([0.3, -0.2], dtype=torch.float64)
    logps = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    out, kl = kl_penalty_in_loss(per_token, logps, ref, kl_coef=0.1)
    # k3 = exp(d) - d - 1 with d = ref - logp: d = -0.5 and 1.0
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert kl.tolist() == pytest.approx(k3, abs=1e-12)
    assert out.tolist() == pytest.approx([0.3 + 0.1 * k3[0], -0.2 + 0.1 * k3[1]], abs=1e-12)
    out.sum().backward()  # d k3 / d logp = 1 - exp(d)
    assert logps.grad.tolist() == pytest.approx([0.1 * (1 - math.exp(-0.5)), 0.1 * (1 - math.exp(1.0))], abs=1e-12)
    same, kl0 = kl_penalty_in_loss(per_token, logps.detach(), ref, kl_coef=0.0)
    assert torch.equal(same, per_token) and kl0.tolist() == pytest.approx(k3, abs=1e-12)
