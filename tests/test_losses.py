"""Math-level tests: each loss equals an independent float64 formula, and its gradient is right."""

import math

import pytest
import torch

from alignkit import losses
from alignkit.errors import ConfigError

B = 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: (-30 * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_()
        for name in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }


def _h(x, i):
    return (x["policy_chosen_logps"][i] - x["ref_chosen_logps"][i]) - (
        x["policy_rejected_logps"][i] - x["ref_rejected_logps"][i]
    )


def _log_sigmoid(z):  # written with math.*, independent of torch's implementation
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


# Independent per-example formulas, straight from the papers.
REFERENCE = {
    "dpo": lambda h, beta=0.1, label_smoothing=0.0: (
        -(1 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h)
    ),
    "cdpo": lambda h, beta=0.1, label_smoothing=0.1: (
        -(1 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h)
    ),
    "ipo": lambda h, beta=0.1: (h - 1 / (2 * beta)) ** 2,
    "hinge": lambda h, beta=0.1: max(0.0, 1 - beta * h),
}


@pytest.mark.parametrize(
    "name,params",
    [
        ("dpo", {}),
        ("dpo", {"beta": 0.5, "label_smoothing": 0.2}),
        ("cdpo", {}),
        ("cdpo", {"label_smoothing": 0.3}),
        ("ipo", {}),
        ("ipo", {"beta": 0.05}),
        ("hinge", {}),
        ("hinge", {"beta": 0.02}),
    ],
)
def test_pair_loss_matches_formula(name, params):
    spec, full = losses.resolve({"name": name, **params})
    x = _inputs()
    got, metrics = spec.fn(*(x[k] for k in spec.inputs), **full)
    for i in range(B):
        h = float(_h(x, i).detach())
        assert abs(float(got[i].detach()) - REFERENCE[name](h, **params)) < 1e-10
    beta = full["beta"]
    torch.testing.assert_close(metrics["rewards/margins"], beta * _h(x, slice(None)).detach(), rtol=0, atol=1e-12)
    acc = x["policy_chosen_logps"] - x["ref_chosen_logps"] > x["policy_rejected_logps"] - x["ref_rejected_logps"]
    assert torch.equal(metrics["rewards/accuracies"], acc.double())


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo", "hinge"])
def test_pair_loss_gradcheck(name):
    spec, params = losses.resolve({"name": name, "beta": 0.3})
    x = _inputs(1)
    # keep the hinge away from its kink, where the derivative is undefined
    if name == "hinge":
        with torch.no_grad():
            x["policy_chosen_logps"] += 10 * torch.arange(B, dtype=torch.float64) - 30
    assert torch.autograd.gradcheck(lambda *a: spec.fn(*a, **params)[0], tuple(x[k] for k in spec.inputs))


def test_dpo_gradient_sign():
    """Descending the DPO loss raises log pi(chosen) and lowers log pi(rejected)."""
    spec, params = losses.resolve({"name": "dpo"})
    x = _inputs(2)
    spec.fn(*(x[k] for k in spec.inputs), **params)[0].sum().backward()
    assert (x["policy_chosen_logps"].grad < 0).all() and (x["policy_rejected_logps"].grad > 0).all()


def test_dpo_hand_worked():
    """h = (-10 - -12) - (-14 - -13) = 3; beta = 0.5 -> loss = log(1 + e^-1.5) = 0.201413..."""
    spec, params = losses.resolve({"name": "dpo", "beta": 0.5})
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    got, _ = spec.fn(t(-10.0), t(-14.0), t(-12.0), t(-13.0), **params)
    assert abs(float(got) - 0.20141327798275246) < 1e-12


def test_sft_loss_is_token_nll():
    spec, params = losses.resolve({"name": "sft"})
    logps = torch.tensor([-6.0, -2.0], dtype=torch.float64)
    counts = torch.tensor([3, 1])
    got, metrics = spec.fn(logps, counts, **params)
    assert got.tolist() == [6.0, 2.0] and spec.reduction == "token"
    assert metrics["nll_per_token"].tolist() == [2.0, 2.0]


def test_registry_spec_fields():
    assert losses.get("dpo").needs_reference and losses.get("dpo").data == "paired"
    assert not losses.get("sft").needs_reference
    assert losses.get("dpo").params == {"beta": 0.1, "label_smoothing": 0.0}


def test_unknown_loss_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean `dpo`"):
        losses.resolve({"name": "dpoo"})


def test_unknown_loss_param_suggests_nearest():
    with pytest.raises(ConfigError, match=r"`loss.betta`.*Did you mean `loss.beta`"):
        losses.resolve({"name": "ipo", "betta": 0.1})


def test_loss_param_type_checked():
    with pytest.raises(ConfigError, match="loss.beta"):
        losses.resolve({"name": "dpo", "beta": "high"})
    _, params = losses.resolve({"name": "dpo", "beta": 1})  # ints become floats
    assert params["beta"] == 1.0 and isinstance(params["beta"], float)
