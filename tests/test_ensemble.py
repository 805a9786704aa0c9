"""Reward ensembles (`{name: ensemble, members: [...], combine: ...}`, arXiv 2310.02743): the
combinations by hand, the errors, and an online run that logs the members' disagreement."""

import math

import pytest
from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.rewards import build_reward
from alignkit.rewards.ensemble import EnsembleReward
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

MEMBERS = """
def chars(prompts, completions, **kw):
    return [len(c) / 10 for c in completions]

def words(prompts, completions, **kw):
    return [float(len(c.split())) for c in completions]

def const(prompts, completions, **kw):
    return [1.0 for _ in completions]
"""


@pytest.fixture
def members(tmp_path):
    path = tmp_path / "members.py"
    path.write_text(MEMBERS)
    return [f"{path}:chars", f"{path}:words", f"{path}:const"]


def test_the_combinations_by_hand(members):
    texts = ["a bb ccc", "dddd"]  # chars/10: 0.8, 0.4; words: 3, 1; const: 1, 1
    prompts = ["p", "p"]
    for combine, expected in (
        ("mean", [(0.8 + 3 + 1) / 3, (0.4 + 1 + 1) / 3]),
        ("min", [0.8, 0.4]),
    ):
        reward = build_reward({"name": "ensemble", "members": members, "combine": combine})
        assert reward(prompts, texts) == pytest.approx(expected)
    reward = build_reward({"name": "ensemble", "members": members, "combine": "mean_minus_std", "k": 2.0})
    parts = reward.components(prompts, texts)
    mean0, mean1 = (0.8 + 3 + 1) / 3, (0.4 + 1 + 1) / 3
    std0 = math.sqrt(((0.8 - mean0) ** 2 + (3 - mean0) ** 2 + (1 - mean0) ** 2) / 3)
    std1 = math.sqrt(((0.4 - mean1) ** 2 + 2 * (1 - mean1) ** 2) / 3)
    assert parts["ensemble_std"] == pytest.approx([std0, std1])
    assert parts["member2"] == [3.0, 1.0]
    assert reward(prompts, texts) == pytest.approx([mean0 - 2 * std0, mean1 - 2 * std1])


def test_ensemble_errors_name_the_fix(members):
    with pytest.raises(ConfigError, match="two or more rewards"):
        build_reward({"name": "ensemble", "members": members[:1]})
    with pytest.raises(ConfigError, match="combine: mean_minus_std"):
        build_reward({"name": "ensemble", "members": members, "k": 2})
    with pytest.raises(ConfigError, match="must be one of mean, min, mean_minus_std"):
        build_reward({"name": "ensemble", "members": members, "combine": "max"})
    with pytest.raises(ConfigError, match="member 2 has a `weight`"):
        build_reward({"name": "ensemble", "members": [members[0], {"name": members[1], "weight": 2.0}]})
    with pytest.raises(ConfigError, match="unknown option"):
        build_reward({"name": "ensemble", "members": members, "combin": "min"})
    assert isinstance(build_reward({"name": "ensemble", "members": members}), EnsembleReward)


def test_an_online_run_logs_each_member_and_their_disagreement(tiny_model_dir, members, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_pairs(16)])
    spec = "{name: ensemble, members: [" + ", ".join(f'"{m}"' for m in members[:2]) + "], combine: min}"
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, prompts, tmp_path / "run", tmp_path / "cache")
        + [
            "recipe=grpo",
            f"online.rewards={spec}",
            "generation.num_samples=2",
            "generation.max_new_tokens=4",
            "train.batch_size=2",
            "train.max_steps=2",
            "data.eval_fraction=0",
        ],
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    for key in ("reward/member1", "reward/member2", "reward/ensemble_std"):
        assert key in rows[-1], key
    assert rows[-1]["reward"] <= min(rows[-1]["reward/member1"], rows[-1]["reward/member2"]) + 1e-6


def test_alignkit_average_writes_the_mean_of_the_weights(tmp_path, capsys):
    """WARM: the element-wise mean, in each weight's dtype, loadable as a reward model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from alignkit.cli import main
    from alignkit.testing import save_tiny_model_dir

    dirs = []
    for seed in (1, 2, 3):
        base = save_tiny_model_dir(tmp_path / f"lm{seed}", seed=seed)
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        rm.save_pretrained(tmp_path / f"rm{seed}")
        for f in base.iterdir():
            if f.name.startswith(("tokenizer", "special", "chat")):
                (tmp_path / f"rm{seed}" / f.name).write_bytes(f.read_bytes())
        dirs.append(str(tmp_path / f"rm{seed}"))
    assert main(["average", *dirs, "--output", str(tmp_path / "warm")]) == 0
    states = [load_file(f"{d}/model.safetensors") for d in dirs]
    avg = load_file(str(tmp_path / "warm" / "model.safetensors"))
    for k, v in avg.items():
        assert torch.allclose(v, (states[0][k] + states[1][k] + states[2][k]) / 3, atol=1e-7), k
    rm = build_reward(str(tmp_path / "warm"))
    assert len(rm(["what is 1 plus 2 ?"], ["the answer is 3 ."])) == 1
    other = save_tiny_model_dir(tmp_path / "wide", hidden=64)
    capsys.readouterr()
    assert main(["average", dirs[0], str(other), "--output", str(tmp_path / "bad")]) != 0
    assert "not the same architecture" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
