import pytest
import torch
from conftest import base_overrides

from alignkit import losses
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = {
        k: -20 * torch.rand(5, generator=g, dtype=torch.float64)
        for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    x["chosen_counts"] = torch.tensor([3, 5, 8, 1, 4])
    x["rejected_counts"] = torch.tensor([2, 2, 9, 7, 4])
    return x


def test_weighted_sum_of_dpo_and_chosen_nll():
    x = _inputs()
    terms = resolve_terms({"name": "dpo"}, [{"name": "dpo", "beta": 0.2}, {"name": "sft", "weight": 0.5}], "paired")
    total, metrics = apply_terms(terms, x)
    dpo, _ = losses.get("dpo").fn(
        x["policy_chosen_logps"],
        x["policy_rejected_logps"],
        x["ref_chosen_logps"],
        x["ref_rejected_logps"],
        beta=0.2,
        label_smoothing=0.0,
    )
    nll_per_token = -x["policy_chosen_logps"] / x["chosen_counts"]
    torch.testing.assert_close(total, dpo + 0.5 * nll_per_token, rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics["loss/sft"], nll_per_token, rtol=0, atol=1e-12)
    assert "rewards/margins" in metrics and "loss/dpo" in metrics


def test_single_loss_when_no_list():
    terms = resolve_terms({"name": "ipo", "beta": 0.3}, [], "paired")
    assert len(terms) == 1 and terms[0].spec.name == "ipo" and terms[0].params["beta"] == 0.3


def test_bad_terms_are_clear_errors():
    with pytest.raises(ConfigError, match=r"losses\[1\]"):
        resolve_terms({"name": "dpo"}, [{"name": "dpo"}, {"weight": 2}], "paired")
    with pytest.raises(ConfigError, match=r"losses\[0\].weight"):
        resolve_terms({"name": "dpo"}, [{"name": "dpo", "weight": "big"}], "paired")
    with pytest.raises(ConfigError, match="Did you mean `dpo`"):
        resolve_terms({"name": "dpo"}, [{"name": "dp"}], "paired")


def test_training_with_combined_losses(tiny_model_dir, pairs_file, tmp_path):
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, pairs_file, tmp_path / "r", tmp_path / "c")
        + [
            "losses=[{name: dpo, weight: 1.0}, {name: sft, weight: 0.5}]",
            "train.max_steps=6",
            "train.learning_rate=5e-3",
            "train.batch_size=4",
            "data.eval_fraction=0",
        ],
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(first["loss/dpo"] + 0.5 * first["loss/sft"], abs=1e-5)
    assert last["loss/sft"] < first["loss/sft"] and last["rewards/margins"] > 0
