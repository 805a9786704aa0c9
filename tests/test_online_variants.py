"""The online variants of issue 17 worked by hand: GSPO's sequence ratio, CISPO's clipped and
detached weights, REINFORCE++'s returns normalised over the batch, DAPO's over-length penalty;
and DAPO's dynamic sampling on a tiny model (what is dropped, refilled and counted)."""

import math

import pytest
import torch
from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.losses import get as get_loss
from alignkit.losses import online as rl
from alignkit.losses import ppo as P
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

D = torch.float64


def test_gspo_uses_one_clipped_ratio_per_sequence():
    # sequence 0: two tokens with log-ratios 0.1 and 0.3 -> s_0 = exp(0.2); sequence 1: one token, log-ratio -0.5
    logps = torch.tensor([-1.0, -2.0, -0.5], dtype=D, requires_grad=True)
    old = torch.tensor([-1.1, -2.3, 0.0], dtype=D)
    seq = torch.tensor([0, 0, 1])
    adv = torch.tensor([1.0, 1.0, -2.0], dtype=D)
    s0, s1 = math.exp(0.2), math.exp(-0.5)
    loss, m = rl.gspo(logps, old, adv, seq, clip_low=0.5, clip_high=0.1)
    # s_0 = 1.221 > 1.1 with A > 0: clipped at 1.1; s_1 = 0.607 > 0.5: inside the range
    assert loss.tolist() == pytest.approx([-1.1, -1.1, 2.0 * s1])
    assert m["clip_fraction"].tolist() == [1.0, 1.0, 0.0] and m["ratio_mean"].tolist() == pytest.approx([s0, s0, s1])
    loss.sum().backward()
    # clipped sequence: no gradient; unclipped: d(-s_1 * A)/d logp = -A * s_1 / |y_1| for its one token
    assert logps.grad.tolist() == pytest.approx([0.0, 0.0, 2.0 * s1])
    # wide range: every token of sequence 0 gets -A * s_0 / 2 (the ratio is a length-normalised mean)
    logps.grad = None
    rl.gspo(logps, old, adv, seq, clip_low=0.9, clip_high=5.0)[0].sum().backward()
    assert logps.grad[:2].tolist() == pytest.approx([-2 * s0 / 2, -2 * s0 / 2])  # two tokens each carry the loss


def test_cispo_clips_the_weight_but_keeps_every_token_gradient():
    logps = torch.tensor([math.log(0.5), 0.0, math.log(2.0)], dtype=D, requires_grad=True)
    old = torch.zeros(3, dtype=D)  # ratios 0.5, 1, 2
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=D)
    loss, m = rl.cispo(logps, old, adv, clip_high=0.2)
    assert loss.tolist() == pytest.approx([-0.5 * math.log(0.5), 0.0, -1.2 * math.log(2.0)])
    assert m["clip_fraction"].tolist() == [0.0, 0.0, 1.0]
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-0.5, 1.0, -1.2])  # -w * A: the capped token still learns
    # PPO's clip gives the same token (ratio 2 > 1.2, A > 0) no gradient at all
    logps2 = logps.detach().clone().requires_grad_(True)
    rl.ppo_clip(logps2, old, adv, clip_low=0.2, clip_high=0.2)[0].sum().backward()
    assert logps2.grad[2].item() == 0.0
    assert get_loss("cispo").data == "rollout" and get_loss("gspo").inputs[-1] == "token_seq"


def test_reinforce_pp_returns_and_batch_normalisation():
    seq = torch.tensor([0, 0, 1])
    kl = torch.tensor([0.1, 0.2, 0.3], dtype=D)
    token_rewards, _ = P.kl_shaped_rewards(torch.tensor([1.0, 0.0], dtype=D), kl, seq, 2, kl_coef=0.5)
    assert token_rewards.tolist() == pytest.approx([-0.05, 0.9, -0.15])
    adv, returns = P.reinforce_pp_advantages(token_rewards, seq, 2)
    assert returns.tolist() == pytest.approx([0.85, 0.9, -0.15])  # rewards still to come, no discount
    mean = (0.85 + 0.9 - 0.15) / 3
    std = math.sqrt(((0.85 - mean) ** 2 + (0.9 - mean) ** 2 + (-0.15 - mean) ** 2) / 3)
    assert adv.tolist() == pytest.approx([(x - mean) / std for x in (0.85, 0.9, -0.15)], rel=1e-6)
    # another process's share changes the statistics: normalised over the whole batch, not this share
    other = torch.tensor([5.0, 5.0], dtype=D)
    adv2, _ = P.reinforce_pp_advantages(token_rewards, seq, 2, gather=lambda r: torch.cat([r, other]))
    full = torch.tensor([0.85, 0.9, -0.15, 5.0, 5.0], dtype=D)
    assert adv2.tolist() == pytest.approx(
        ((torch.tensor([0.85, 0.9, -0.15], dtype=D) - full.mean()) / full.std(unbiased=False)).tolist(), rel=1e-6
    )


def test_overlong_penalty_ramps_to_minus_one_at_the_limit():
    got = rl.overlong_penalty(torch.tensor([3, 6, 7, 8, 10, 12]), max_length=10, buffer=4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        rl.overlong_penalty(torch.tensor([1]), max_length=10, buffer=11)


# A reward that is constant on the first 16 prompts (their groups teach nothing) and varies on the rest.
REWARD = """
def half_flat(prompts, completions, **columns):
    out = []
    for p, c in zip(prompts, completions):
        text = p[-1]["content"] if isinstance(p, list) else p
        flat = int(text.split("#")[1]) < 16
        out.append(1.0 if flat else float(len(c)))  # characters: the samples of a prompt rarely tie
    return out
"""


def _cfg(model_dir, tmp_path, *extra, out="run"):
    rows = [{"prompt": f"{r['prompt']} #{i}"} for i, r in enumerate(toy_pairs(40))]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "r.py").write_text(REWARD)
    return load_config(
        None,
        base_overrides(model_dir, data, tmp_path / out, tmp_path / "cache")
        + [
            "recipe=grpo",
            f"online.rewards={tmp_path / 'r.py'}:half_flat",
            "generation.num_samples=4",
            "generation.max_new_tokens=6",
            "train.batch_size=4",
            "train.max_steps=4",
            "data.eval_fraction=0",
            "train.learning_rate=1e-2",
            *extra,
        ],
    )


def test_dynamic_sampling_drops_flat_groups_and_refills(tiny_model_dir, tmp_path):
    rows = read_metrics(
        loop.train(
            _cfg(tiny_model_dir, tmp_path, "online.dynamic_sampling=true", "online.dynamic_sampling_rounds=4"),
            progress=False,
        ).run_dir,
        "train",
    )
    assert len(rows) == 4
    for r in rows:
        dropped, extra = r["dynamic_sampling/dropped_groups"], r["dynamic_sampling/extra_prompts"]
        flat_first = round(r["zero_variance_groups"] * 4)  # of the batch's own 4 prompts
        assert dropped >= flat_first  # the batch's own flat groups, then any flat fresh ones
        assert extra == dropped  # filled: every dropped group was replaced by exactly one fresh prompt
    assert any(r["dynamic_sampling/dropped_groups"] > 0 for r in rows)
    assert all(r["dynamic_sampling/filled"] == 1.0 for r in rows)  # 24 graded prompts are enough to refill
    # off: the same run trains on every group and logs no counts
    plain = read_metrics(loop.train(_cfg(tiny_model_dir, tmp_path, out="plain"), progress=False).run_dir, "train")
    assert "dynamic_sampling/dropped_groups" not in plain[0]


def test_overlong_penalty_enters_the_training_reward_only(tiny_model_dir, tmp_path):
    run = loop.train(
        _cfg(tiny_model_dir, tmp_path, "online.overlong_buffer=3", "data.eval_fraction=0.2"), progress=False
    ).run_dir
    rows = read_metrics(run, "train")
    for r in rows:  # 6 new tokens, buffer 3: a reply of 4, 5, 6 tokens loses 1/3, 2/3, 1
        assert -1.0 <= r["reward/overlong_penalty"] <= 0.0
        (task,) = [k for k in r if k.startswith("reward/") and k != "reward/overlong_penalty"]
        assert r["reward"] == pytest.approx(r[task] + r["reward/overlong_penalty"], abs=1e-4)
    assert min(r["reward/overlong_penalty"] for r in rows) < 0
    assert all("reward/overlong_penalty" not in e for e in read_metrics(run, "eval"))


def test_variant_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="online.dynamic_sampling"):  # a recipe that does not read it
        _cfg(tiny_model_dir, tmp_path, "recipe=reinforce_pp", "online.dynamic_sampling=true")
    with pytest.raises(ConfigError, match="online.overlong_buffer"):
        _cfg(tiny_model_dir, tmp_path, "online.overlong_buffer=7")
    with pytest.raises(ConfigError, match="dynamic_sampling_rounds"):
        _cfg(tiny_model_dir, tmp_path, "online.dynamic_sampling_rounds=5")
