"""ODIN (`reward.disentangle: length`, arXiv 2402.07319): a quality and a length head whose sum
fits the preferences, the quality head uncorrelated with length and the only reward at use time."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import base_overrides

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.losses.reward import odin_terms, pearson
from alignkit.rewards.model import RewardModel
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


def test_odin_terms_match_a_float64_formula():
    q = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.5], dtype=torch.float64)
    ln = torch.tensor([0.1, 0.4, -0.3, 1.2, 0.8, 0.0], dtype=torch.float64)
    lengths = torch.tensor([12.0, 30.0, 7.0, 55.0, 41.0, 20.0], dtype=torch.float64)
    wq = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    wl = torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64)
    term, metrics = odin_terms(q, ln, lengths, wq, wl, length_coef=0.7, orthogonal_coef=0.3)
    rho_q = np.corrcoef(q.numpy(), lengths.numpy())[0, 1]
    rho_l = np.corrcoef(ln.numpy(), lengths.numpy())[0, 1]
    ortho = abs(1.0 * 0.5 + 2.0 * -0.5 + -1.0 * 2.0)  # |w_q . w_l| = |0.5 - 1 - 2| = 2.5
    assert float(term) == pytest.approx(0.7 * (abs(rho_q) - rho_l) + 0.3 * ortho, abs=1e-9)
    assert float(metrics["odin/quality_length_corr"]) == pytest.approx(rho_q, abs=1e-9)
    assert float(metrics["odin/orthogonality"]) == pytest.approx(2.5)
    assert float(pearson(torch.ones(4), torch.arange(4.0))) == 0.0  # a constant has no correlation


def _synthetic(n: int, seed: int):
    """Pairs of responses with features [length, quality, noise, noise]; the preference is a known
    mix of the two (equal weights), so a plain reward model learns length as much as quality."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 2, 4, generator=g)
    lengths = 40 + 15 * feats[..., 0]
    logit = 2.0 * (feats[:, 0, 1] - feats[:, 1, 1]) + 2.0 * (feats[:, 0, 0] - feats[:, 1, 0])
    first_wins = torch.rand(n, generator=g) < torch.sigmoid(logit)
    chosen = torch.where(first_wins[:, None], feats[:, 0], feats[:, 1])
    rejected = torch.where(first_wins[:, None], feats[:, 1], feats[:, 0])
    lc = torch.where(first_wins, lengths[:, 0], lengths[:, 1])
    lr = torch.where(first_wins, lengths[:, 1], lengths[:, 0])
    return chosen, rejected, lc, lr


def _fit(odin: bool, steps: int = 400):
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2 if odin else 1, bias=False)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    chosen, rejected, lc, lr = _synthetic(512, seed=1)
    for _ in range(steps):
        rc, rr = head(chosen), head(rejected)
        loss = -F.logsigmoid(rc.sum(-1) - rr.sum(-1)).mean()
        if odin:
            heads = torch.cat([rc, rr])
            term, _ = odin_terms(heads[:, 0], heads[:, 1], torch.cat([lc, lr]), head.weight[0], head.weight[1])
            loss = loss + term
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def test_the_quality_head_recovers_the_hidden_quality_and_ignores_length():
    chosen, rejected, lc, lr = _synthetic(1024, seed=2)  # held-out pairs
    feats, lengths = torch.cat([chosen, rejected]), torch.cat([lc, lr])
    plain_head, odin_head = _fit(odin=False), _fit(odin=True)
    with torch.no_grad():
        plain, heads = plain_head(feats)[:, 0], odin_head(feats)
    quality, length_head = heads[:, 0], heads[:, 1]
    assert float(pearson(plain, lengths)) > 0.5  # the plain model pays for length
    assert abs(float(pearson(quality, lengths))) < 0.05  # the quality head does not
    assert float(pearson(quality, feats[:, 1])) > 0.95  # it reads the hidden quality feature
    assert float(pearson(length_head, lengths)) > 0.95  # and the length head took length


@pytest.fixture
def pairs(tmp_path):
    from conftest import toy_pairs, write_jsonl

    rows = toy_pairs(32)
    for i, r in enumerate(rows):  # chosen is the longer reply half of the time
        if i % 2:
            r["chosen"], r["rejected"] = "the answer is " + r["chosen"].split()[-2] + " .", r["rejected"] + " sorry ."
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.mark.parametrize("mode", [["model.freeze_layers=2"], ["lora.enabled=true", "lora.r=4"]])
def test_a_disentangled_reward_model_trains_and_rewards_with_its_quality_head(tiny_model_dir, pairs, tmp_path, mode):
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, pairs, tmp_path / "run", tmp_path / "cache")
        + [
            "recipe=reward",
            "reward.disentangle=length",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.learning_rate=2e-2",
            "data.eval_fraction=0.25",
            *mode,
        ],
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    for key in ("odin/quality_length_corr", "odin/length_head_corr", "odin/orthogonality", "accuracy/quality"):
        assert key in rows[-1], key
    rm = RewardModel(result.final_dir, device="cpu")
    assert rm.names == ["quality", "length"]
    prompts, replies = ["what is 1 plus 2 ?"] * 2, ["the answer is 3 .", "sorry i cannot help ."]
    both = rm.score_all(prompts, replies)  # [2, 2]: quality, length
    assert rm(prompts, replies) == pytest.approx(both[:, 0].tolist())  # the quality head alone
    full = RewardModel(result.final_dir, device="cpu", weights={"quality": 1.0, "length": 1.0})
    assert full(prompts, replies) == pytest.approx(both.sum(1).tolist(), abs=1e-5)


def test_disentangle_settings_that_cannot_work(tiny_model_dir, pairs, tmp_path):
    base = base_overrides(tiny_model_dir, pairs, tmp_path / "r", tmp_path / "c") + ["recipe=reward"]
    with pytest.raises(ConfigError, match="several reward.objectives"):
        load_config(None, base + ["reward.disentangle=length", "reward.objectives=[helpful, harmless]"])
    with pytest.raises(ConfigError, match="no effect without `reward.disentangle: length`"):
        load_config(None, base + ["reward.length_coef=2.0"])
    with pytest.raises(ConfigError, match="recipe dpo does not read"):
        load_config(None, base + ["recipe=dpo", "reward.disentangle=length"])
