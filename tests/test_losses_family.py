"""Math-level tests for the DPO family beyond DPO/IPO/hinge: each registered loss equals an
independent float64 formula written here with `math` (never by calling the library), its gradient
passes gradcheck, and descending it moves the log-probs the way the paper says."""

import math

import pytest
import torch

from alignkit import losses
from alignkit.errors import ConfigError

B, K = 7, 3
DTYPE = torch.float64
PAIR_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _inputs(seed=0, near=False):
    """Every input any loss may ask for. `near`: the policy within +-3 nats of the reference,
    where every method's descent direction is the paper's; otherwise the two are independent."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g, dtype=DTYPE)  # noqa: E731
    ref = lambda *shape: -3 - 30 * u(*shape)  # noqa: E731  (so that a near policy stays below 0)
    x = {
        "ref_chosen_logps": ref(B),
        "ref_rejected_logps": ref(B),
        "ref_logps": ref(B),
        "ref_kl_logps": ref(B),
        "ref_sample_logps": ref(B, K),
    }
    for name in ("chosen_logps", "rejected_logps", "logps", "kl_logps", "sample_logps"):
        ref = x[f"ref_{name}"]
        x[f"policy_{name}"] = ref + (6 * u(*ref.shape) - 3) if near else -30 * u(*ref.shape)
    x["chosen_counts"] = torch.randint(1, 40, (B,), generator=g)
    x["rejected_counts"] = torch.randint(1, 40, (B,), generator=g)
    x["labels"] = torch.tensor([True, False, True, True, False, False, True])
    x["reward_shift"] = torch.full((B,), 0.3 * (2 * float(u(1)) - 1), dtype=DTYPE)
    for side in ("chosen", "rejected"):  # mask_dpo's masked sums: any [B] log-probs will do
        x[f"policy_{side}_masked_logps"] = x[f"policy_{side}_logps"]
        x[f"ref_{side}_masked_logps"] = x[f"ref_{side}_logps"]
    for k, v in x.items():
        if v.is_floating_point():
            v.requires_grad_()
    return x


# ---- independent per-example formulas, straight from the papers (python floats, math only) ----


def logsig(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sig(z):
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _pair(x, i):
    f = {k: float(x[k][i]) for k in PAIR_LOGPS + ("chosen_counts", "rejected_counts", "reward_shift")}
    f["rw"] = f["policy_chosen_logps"] - f["ref_chosen_logps"]
    f["rl"] = f["policy_rejected_logps"] - f["ref_rejected_logps"]
    f["h"] = f["rw"] - f["rl"]
    f["mw"] = f["policy_chosen_logps"] / f["chosen_counts"]
    f["ml"] = f["policy_rejected_logps"] / f["rejected_counts"]
    return f


def ref_dpo(p, beta=0.1):
    return -logsig(beta * p["h"])


def ref_robust_dpo(p, beta=0.1, label_smoothing=0.1):
    e, z = label_smoothing, beta * p["h"]
    return ((1 - e) * -logsig(z) - e * -logsig(-z)) / (1 - 2 * e)


def ref_f_dpo(p, beta=0.1, divergence="reverse_kl", alpha=0.5):
    uw, ul = math.exp(p["rw"]), math.exp(p["rl"])
    fprime = {  # f'(u) from the f-DPO paper, for each divergence
        "reverse_kl": lambda u: math.log(u) + 1,
        "forward_kl": lambda u: -1 / u,
        "js_divergence": lambda u: math.log(2 * u / (1 + u)),
        "alpha_divergence": lambda u: (1 - u ** (-alpha)) / alpha,
    }[divergence]
    return -logsig(beta * (fprime(uw) - fprime(ul)))


def ref_exo(p, beta=0.1, label_smoothing=1e-3):
    pw, pl = sig(beta * p["h"]), sig(-beta * p["h"])  # softmax of beta*r over the pair
    return pw * math.log(pw / (1 - label_smoothing)) + pl * math.log(pl / label_smoothing)


def ref_nca(p, beta=0.1):
    return -logsig(beta * p["rw"]) - 0.5 * (logsig(-beta * p["rw"]) + logsig(-beta * p["rl"]))


def ref_bco_pair(p, beta=0.1):
    d = p["reward_shift"]
    return -logsig(beta * p["rw"] - d) - logsig(-(beta * p["rl"] - d))


def ref_dpop(p, beta=0.1, lambda_penalty=50.0):
    penalty = max(0.0, p["ref_chosen_logps"] - p["policy_chosen_logps"])
    return -logsig(beta * (p["h"] - lambda_penalty * penalty))


def ref_rdpo(p, beta=0.1, alpha=0.05):
    return -logsig(beta * p["h"] + alpha * (p["chosen_counts"] - p["rejected_counts"]))


def ref_apo_zero(p, beta=0.1):
    return 1 - sig(beta * p["rw"]) + sig(beta * p["rl"])


def ref_apo_down(p, beta=0.1):
    return sig(beta * p["rw"]) + 1 - sig(beta * (p["rw"] - p["rl"]))


def ref_rpo(p, beta=0.1, alpha=1.0):
    return -logsig(beta * p["h"]) + alpha * -p["policy_chosen_logps"] / p["chosen_counts"]


def ref_sppo_hard(p, beta=0.1):
    eta = 1 / beta
    return (p["rw"] - eta * (1 - 0.5)) ** 2 + (p["rl"] - eta * (0 - 0.5)) ** 2


def ref_simpo(p, beta=2.0, gamma_beta_ratio=0.5):
    return -logsig(beta * p["mw"] - beta * p["ml"] - gamma_beta_ratio * beta)


def ref_orpo(p, beta=0.1):
    def log_odds(m):  # log(P / (1 - P)), P = exp(mean log-prob)
        return math.log(math.exp(m) / -math.expm1(m))

    return -p["mw"] + beta * -logsig(log_odds(p["mw"]) - log_odds(p["ml"]))


def ref_cpo(p, beta=0.1, alpha=1.0):
    return (
        -logsig(beta * (p["policy_chosen_logps"] - p["policy_rejected_logps"]))
        + alpha * -p["policy_chosen_logps"] / p["chosen_counts"]
    )


PAIR_REFERENCE = {
    "robust_dpo": ref_robust_dpo,
    "f_dpo": ref_f_dpo,
    "exo": ref_exo,
    "nca": ref_nca,
    "bco_pair": ref_bco_pair,
    "dpop": ref_dpop,
    "rdpo": ref_rdpo,
    "apo_zero": ref_apo_zero,
    "apo_down": ref_apo_down,
    "rpo": ref_rpo,
    "sppo_hard": ref_sppo_hard,
    "simpo": ref_simpo,
    "orpo": ref_orpo,
    "cpo": ref_cpo,
    "mask_dpo": ref_dpo,
}


def ref_kto(x, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    kl = [float(a) - float(b) for a, b in zip(x["policy_kl_logps"], x["ref_kl_logps"])]
    z0 = max(0.0, sum(kl) / len(kl))
    out = []
    for i in range(B):
        r = float(x["policy_logps"][i]) - float(x["ref_logps"][i])
        if bool(x["labels"][i]):
            out.append(desirable_weight - desirable_weight * sig(beta * (r - z0)))
        else:
            out.append(undesirable_weight - undesirable_weight * sig(beta * (z0 - r)))
    return out


def ref_bco(x, beta=0.1):
    out = []
    for i in range(B):
        r = beta * (float(x["policy_logps"][i]) - float(x["ref_logps"][i])) - float(x["reward_shift"][i])
        out.append(-logsig(r) if bool(x["labels"][i]) else -logsig(-r))
    return out


def ref_d2o(x, beta=0.1, alpha=0.1):
    out = []
    for i in range(B):
        samples = [float(a) - float(b) for a, b in zip(x["policy_sample_logps"][i], x["ref_sample_logps"][i])]
        neg = float(x["policy_rejected_logps"][i]) - float(x["ref_rejected_logps"][i])
        out.append(-logsig(beta / K * sum(samples) - alpha * neg))
    return out


BATCH_REFERENCE = {"kto": ref_kto, "bco": ref_bco, "d2o": ref_d2o}

CASES = [
    ("robust_dpo", {}),
    ("robust_dpo", {"beta": 0.3, "label_smoothing": 0.25}),
    ("f_dpo", {}),
    ("f_dpo", {"divergence": "forward_kl"}),
    ("f_dpo", {"divergence": "js_divergence", "beta": 0.5}),
    ("f_dpo", {"divergence": "alpha_divergence"}),
    ("f_dpo", {"divergence": "alpha_divergence", "alpha": 0.2}),
    ("exo", {}),
    ("exo", {"beta": 0.2, "label_smoothing": 0.1}),
    ("nca", {}),
    ("nca", {"beta": 0.05}),
    ("bco_pair", {}),
    ("bco_pair", {"beta": 0.3}),
    ("dpop", {}),
    ("dpop", {"beta": 0.2, "lambda_penalty": 5.0}),
    ("rdpo", {}),
    ("rdpo", {"alpha": 0.5}),
    ("apo_zero", {}),
    ("apo_zero", {"beta": 0.4}),
    ("apo_down", {}),
    ("apo_down", {"beta": 0.4}),
    ("rpo", {}),
    ("rpo", {"alpha": 0.3, "beta": 0.2}),
    ("sppo_hard", {}),
    ("sppo_hard", {"beta": 0.02}),
    ("simpo", {}),
    ("simpo", {"beta": 2.5, "gamma_beta_ratio": 0.55}),
    ("orpo", {}),
    ("orpo", {"beta": 0.5}),
    ("cpo", {}),
    ("cpo", {"beta": 0.05, "alpha": 0.5}),
    ("mask_dpo", {}),
    ("mask_dpo", {"beta": 0.4}),
    ("kto", {}),
    ("kto", {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.8}),
    ("bco", {}),
    ("bco", {"beta": 0.5}),
    ("d2o", {}),
    ("d2o", {"beta": 0.3, "alpha": 0.05}),
]
NEW_LOSSES = sorted({name for name, _ in CASES})


def _call(name, x, **params):
    spec, full = losses.resolve({"name": name, **params})
    return spec.fn(*(x[k] for k in spec.inputs), **full)


def _close(got, want):
    # relative 1e-10 for large values (forward KL reaches ~1e12 on the "far" inputs), else absolute
    return abs(got - want) <= 1e-10 * max(1.0, abs(want))


@pytest.mark.parametrize("near", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_loss_matches_paper_formula(name, params, near):
    x = _inputs(seed=3, near=near)
    got, metrics = _call(name, x, **params)
    got, x = got.detach(), {k: v.detach() for k, v in x.items()}
    if name in BATCH_REFERENCE:
        want = BATCH_REFERENCE[name](x, **params)
    else:
        want = [PAIR_REFERENCE[name](_pair(x, i), **params) for i in range(B)]
    assert got.shape == (B,) and got.dtype == DTYPE
    for i in range(B):
        assert _close(float(got[i]), want[i]), (i, float(got[i]), want[i])
    for key, value in metrics.items():  # the loop averages metrics per example
        assert value.shape == (B,) and not value.requires_grad, key


GRAD_INPUTS = {  # inputs with a gradient; the rest (counts, labels, detached anchors) are constants
    "kto": ("policy_logps", "ref_logps"),
    "bco": ("policy_logps", "ref_logps"),
    "bco_pair": PAIR_LOGPS,
}


@pytest.mark.parametrize("name,params", [(n, p) for n, p in CASES if not p or n == "f_dpo"])  # every loss
def test_loss_gradcheck(name, params):
    spec, full = losses.resolve({"name": name, **params})
    x = {k: v.detach()[:3].requires_grad_(v.requires_grad) for k, v in _inputs(seed=5, near=True).items()}
    if name == "dpop":  # keep log pi(y_w) at least 0.5 away from log pi_ref(y_w), the penalty's kink
        with torch.no_grad():
            x["policy_chosen_logps"] += torch.where(x["policy_chosen_logps"] > x["ref_chosen_logps"], 0.5, -0.5)
    grad_names = [k for k in GRAD_INPUTS.get(name, spec.inputs) if x[k].is_floating_point()]

    def fn(*args):
        y = dict(x, **dict(zip(grad_names, args)))
        return spec.fn(*(y[k] for k in spec.inputs), **full)[0]

    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in grad_names))


@pytest.mark.parametrize("name", [n for n in NEW_LOSSES if losses.get(n).data in ("paired", "masked")])
def test_descent_widens_the_margin_near_the_reference(name):
    """A small step down the loss raises log pi(y_w) - log pi(y_l) (first order) for every pair."""
    spec = losses.get(name)
    x = _inputs(seed=7, near=True)
    _call(name, x)[0].sum().backward()
    w, l = spec.inputs[0], spec.inputs[1]  # the policy's chosen and rejected log-probs
    assert "policy" in w and "chosen" in w and "policy" in l and "rejected" in l
    assert (x[l].grad - x[w].grad > 0).all()


def test_apo_zero_raises_chosen_and_lowers_rejected():
    x = _inputs(seed=8)
    _call("apo_zero", x)[0].sum().backward()
    assert (x["policy_chosen_logps"].grad < 0).all() and (x["policy_rejected_logps"].grad > 0).all()


def _descend(name, steps=300, lr=50.0, **params):
    """Plain gradient descent on free policy log-probs, starting at the reference; returns r_w, r_l."""
    zero = torch.zeros(1, dtype=DTYPE)
    pw, pl = zero.clone().requires_grad_(), zero.clone().requires_grad_()
    for _ in range(steps):
        loss = _call(
            name,
            {
                "policy_chosen_logps": pw,
                "policy_rejected_logps": pl,
                "ref_chosen_logps": zero,
                "ref_rejected_logps": zero,
            },
            **params,
        )[0].sum()
        gw, gl = torch.autograd.grad(loss, (pw, pl))
        with torch.no_grad():
            pw -= lr * gw
            pl -= lr * gl
    return float(pw.detach()), float(pl.detach())


def test_apo_down_lowers_both_likelihoods():
    """APO-down from the reference: both log-ratios fall, the rejected one further."""
    rw, rl = _descend("apo_down")
    assert rl < rw < 0
    rw, rl = _descend("apo_zero")
    assert rl < 0 < rw


def test_unpaired_descent_directions():
    """KTO and BCO raise desirable completions and lower undesirable ones; D2O raises the samples
    and lowers the negative."""
    for name in ("kto", "bco"):
        x = _inputs(seed=9, near=True)
        _call(name, x)[0].sum().backward()
        grad, labels = x["policy_logps"].grad, x["labels"]
        assert (grad[labels] < 0).all() and (grad[~labels] > 0).all(), name
    x = _inputs(seed=9, near=True)
    _call("d2o", x)[0].sum().backward()
    assert (x["policy_sample_logps"].grad < 0).all() and (x["policy_rejected_logps"].grad > 0).all()


@pytest.mark.parametrize(
    "name,params",
    [
        ("f_dpo", {"divergence": "reverse_kl"}),
        ("robust_dpo", {"label_smoothing": 0.0}),
        ("rpo", {"alpha": 0.0}),
        ("mask_dpo", {}),
    ],
)
def test_reduces_to_dpo_exactly(name, params):
    x = _inputs(seed=11)
    got, got_metrics = _call(name, x, beta=0.3, **params)
    want, want_metrics = _call("dpo", x, beta=0.3)
    assert torch.equal(got, want)
    for key, value in want_metrics.items():
        assert torch.equal(got_metrics[key], value), key


def test_kto_reference_point_is_clamped_and_detached():
    x = _inputs(seed=12)
    with torch.no_grad():  # mismatched pairs less likely under the policy: mean KL < 0 -> z0 = 0
        x["policy_kl_logps"].copy_(x["ref_kl_logps"] - 1.0)
    losses_, metrics = _call("kto", x)
    assert torch.equal(metrics["kl"], torch.zeros(B, dtype=DTYPE))
    losses_.sum().backward()
    assert x["policy_kl_logps"].grad is None or (x["policy_kl_logps"].grad == 0).all()
    with torch.no_grad():
        x["policy_kl_logps"].copy_(x["ref_kl_logps"] + 2.0)
    assert torch.allclose(_call("kto", x)[1]["kl"], torch.full((B,), 2.0, dtype=DTYPE), rtol=0, atol=1e-12)


def test_bco_reward_mean_metric_is_the_batch_mean_reward():
    """The recipe folds the step's mean of `bco/reward_mean` into the running shift: for pairs it must
    be the mean over all 2B chosen and rejected rewards, for unpaired data the mean over B."""
    x = _inputs(seed=13)
    beta = 0.2
    metrics = _call("bco_pair", x, beta=beta)[1]
    all_rewards = torch.cat(
        [
            beta * (x["policy_chosen_logps"] - x["ref_chosen_logps"]),
            beta * (x["policy_rejected_logps"] - x["ref_rejected_logps"]),
        ]
    ).detach()
    assert abs(float(metrics["bco/reward_mean"].mean()) - float(all_rewards.mean())) < 1e-12
    metrics = _call("bco", x, beta=beta)[1]
    want = float((beta * (x["policy_logps"] - x["ref_logps"])).mean().detach())
    assert abs(float(metrics["bco/reward_mean"].mean()) - want) < 1e-12


def test_orpo_is_finite_at_extreme_likelihoods():
    """log(1 - P) near P = 1 (mean log-prob -> 0) and P -> 0, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        pw = torch.tensor([0.0, -1e-9, -1e-3, -5000.0], dtype=dtype, requires_grad=True)
        pl = torch.tensor([-4000.0, 0.0, -2e-3, -1e-9], dtype=dtype, requires_grad=True)
        counts = torch.tensor([1, 3, 1, 10])
        got, metrics = _call(
            "orpo",
            {
                "policy_chosen_logps": pw,
                "policy_rejected_logps": pl,
                "chosen_counts": counts,
                "rejected_counts": counts,
            },
        )
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(pw.grad).all() and torch.isfinite(pl.grad).all()
    # far from the cap, float64 agrees with the formula at mean log-probs -1e-3 and -2e-3 (P ~ 0.999)
    assert _close(float(got[2].detach()), ref_orpo({"mw": -1e-3, "ml": -2e-3}))


def test_f_dpo_stays_finite_in_float32_far_from_the_reference():
    for divergence in ("forward_kl", "alpha_divergence"):
        pw = torch.tensor([-500.0, -10.0], requires_grad=True)
        pl = torch.tensor([-10.0, -900.0], requires_grad=True)
        zero = torch.zeros(2)
        got, _ = _call(
            "f_dpo",
            {
                "policy_chosen_logps": pw,
                "policy_rejected_logps": pl,
                "ref_chosen_logps": zero,
                "ref_rejected_logps": zero,
            },
            divergence=divergence,
        )
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(pw.grad).all() and torch.isfinite(pl.grad).all()


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("robust_dpo", {"label_smoothing": 0.5}, "label_smoothing"),
        ("exo", {"label_smoothing": 0.0}, "label_smoothing"),
        ("f_dpo", {"divergence": "kl"}, "divergence"),
        ("f_dpo", {"divergence": "alpha_divergence", "alpha": 1.5}, "alpha"),
    ],
)
def test_bad_hyper_parameters_are_config_errors(name, params, match):
    with pytest.raises(ConfigError, match=match):
        _call(name, _inputs(), **params)


def test_registry_entries():
    for name in NEW_LOSSES:
        spec = losses.get(name)
        assert "arXiv" in spec.citation and spec.summary and "|" not in spec.summary  # a markdown table cell
        assert spec.data in {"paired", "unpaired", "negative", "masked"}
        assert spec.fn.__doc__ and "arXiv" in spec.fn.__doc__
    assert not any(losses.get(n).needs_reference for n in ("simpo", "orpo", "cpo"))
    assert losses.get("kto").data == "unpaired" and losses.get("d2o").data == "negative"
    assert losses.get("mask_dpo").data == "masked" and losses.get("bco_pair").inputs[-1] == "reward_shift"
