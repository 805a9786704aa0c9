"""Training on multi-turn episodes (issue 18): an episode is one sequence whose environment tokens
are context only (their gradient is zero), turns are credited with their own discounted returns,
every online recipe trains on episodes, and `data show --episode` and the report show one."""

import json
import re

import pytest
import torch
from conftest import base_overrides, write_jsonl
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.data.batching import collate_packed_groups
from alignkit.data.negative import TokenizedGroup
from alignkit.errors import ConfigError
from alignkit.generation.multiturn import Episode
from alignkit.report import build_report
from alignkit.train import loop
from alignkit.train.episodes import discounted_returns, token_returns
from alignkit.train.metrics import read_metrics
from alignkit.train.rollouts import Rollout, token_segments

# Two tool turns, then the episode ends; every reply is rewarded by its length, so the samples of
# one prompt differ, and the turns carry intermediate rewards.
ENV = """
from alignkit.envs import StepResult


class Quiz:
    def __init__(self, tool_turns=2):
        self.tool_turns = tool_turns

    def reset(self, record):
        self.left = self.tool_turns
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, message):
        n = len(message["content"])
        if self.left == 0:
            return StepResult([], float(n % 5), True)
        self.left -= 1
        return StepResult([{"role": "tool", "content": "yes no yes"}], 0.1 * (n % 3), False)
"""


def _cfg(model_dir, tmp_path, *extra, out="run"):
    rows = [{"prompt": f"what is {i} yes no ?"} for i in range(12)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "quiz.py").write_text(ENV)
    return load_config(
        None,
        base_overrides(model_dir, data, tmp_path / out, tmp_path / "cache")
        + [
            "recipe=grpo",
            f"env.name={tmp_path / 'quiz.py'}:Quiz",
            "generation.num_samples=2",
            "generation.temperature=1.0",
            "generation.max_new_tokens=5",
            "train.batch_size=2",
            "train.max_steps=2",
            "data.eval_fraction=0",
            "data.max_length=128",
            "train.learning_rate=1e-3",
            *extra,
        ],
    )


def test_returns_are_discounted_per_turn():
    assert discounted_returns([0.5, 0.0, 2.0], 0.5) == pytest.approx([1.0, 1.0, 2.0, 0.0])
    ep = Episode(
        [1],
        token_ids=[5, 6, 7, 8, 9],
        model_mask=[True, True, False, True, True],
        turn_of=[0, 0, 1, 2],
        turn_rewards=[0.5, 0.0, 2.0],
    )
    assert token_returns(ep, 0.5) == pytest.approx([1.0, 1.0, 1.0, 2.0])
    cut = Episode([1], turn_of=[0, 1], turn_rewards=[1.0])  # turn 1 was cut by the token budget: no reward
    assert token_returns(cut, 1.0) == [1.0, 0.0]


def test_environment_tokens_are_context_with_zero_gradient(tiny_model_dir, tmp_path):
    session = loop.setup(_cfg(tiny_model_dir, tmp_path), progress=False)
    recipe, model = session.recipe, session.model
    rollout = recipe.batches(model, session.data.train[:2], key=0)[0]
    batch = rollout.batch
    env_tokens = sum(len(m) - sum(m) for g in rollout.groups for m in g.masks)
    assert env_tokens > 0 and rollout.metrics["episode/turns"] > 1  # tool results really are in the sequences
    assert batch.num_scored == sum(sum(m) for g in rollout.groups for m in g.masks) == rollout.generator_logps.numel()
    # the trainer's log-probs of the model's tokens are the sampler's: the mask lines up with the episode
    captured = []
    handle = model.model.norm.register_forward_hook(lambda mod, inp, out: captured.append(out) or out.retain_grad())
    loss, metrics = recipe.loss(model, rollout, "train")
    handle.remove()
    assert float(metrics["logprob_mismatch_max"]) < 1e-4
    loss.backward()
    (hidden,) = captured
    grad = hidden.grad.abs().sum(-1)  # [R, T]: a final hidden state only feeds the prediction of the next token
    pred, scored = batch.predictor_positions(), batch.segment_ids >= 0
    predicts_scored = torch.zeros_like(scored)
    for r in range(pred.shape[0]):
        predicts_scored[r, pred[r][scored[r]]] = True
    assert grad[~predicts_scored].max() == 0.0  # positions predicting environment (or prompt) tokens: no gradient
    assert (grad[predicts_scored] > 0).float().mean() > 0.9
    # masks and turn returns survive a checkpoint (a run resumed inside `iterations`)
    back = Rollout.from_state_dict(rollout.state_dict())
    assert [g.masks for g in back.groups] == [g.masks for g in rollout.groups]
    assert torch.equal(back.turn_returns, rollout.turn_returns.cpu())


def test_turns_get_their_own_returns_against_the_group_baseline(tiny_model_dir, tmp_path):
    for recipe_name, expected in (("grpo", "std"), ("rloo", "loo")):
        session = loop.setup(
            _cfg(tiny_model_dir, tmp_path, f"recipe={recipe_name}", "env.gamma=0.5", out=recipe_name), progress=False
        )
        recipe = session.recipe
        # one prompt, two episodes: A has 3 model tokens over turns 0, 0, 1; B has 2 tokens, both turn 0
        group = TokenizedGroup(
            [1, 2, 3], [[10, 11, 50, 12], [20, 21]], 0, masks=[[True, True, False, True], [True, True]]
        )
        batch = collate_packed_groups([group], 0, 64)
        segs = token_segments(batch)
        assert segs.tolist() == [0, 0, 0, 1, 1]
        g_a, g_b = discounted_returns([1.0, 2.0], 0.5), discounted_returns([3.0], 0.5)  # [2, 2, 0], [3, 0]
        rollout = Rollout(batch, [group], turn_returns=torch.tensor([g_a[0], g_a[0], g_a[1], g_b[0], g_b[0]]))
        rewards = torch.tensor([[g_a[0], g_b[0]]])
        recipe.fill(session.model, rollout, rewards, [[0, 1]])
        if expected == "std":
            s = float(rewards.std()) + 1e-4
            a, b = (2.0 - 2.5) / s, (3.0 - 2.5) / s
            want = [a, a, a + (2.0 - 2.0) / s, b, b]
        else:
            want = [2.0 - 3.0, 2.0 - 3.0, 2.0 - 3.0, 1.0, 1.0]
        assert rollout.advantages.tolist() == pytest.approx(want, abs=1e-5)
        # a turn whose return differs from the episode's gets its own advantage
        rollout.turn_returns = torch.tensor([2.0, 2.0, 4.0, 3.0, 3.0])
        recipe.fill(session.model, rollout, rewards, [[0, 1]])
        scale = float(rewards.std()) + 1e-4 if expected == "std" else 1.0
        assert float(rollout.advantages[2] - rollout.advantages[0]) == pytest.approx(2.0 / scale, abs=1e-5)


@pytest.mark.parametrize("recipe", ["grpo", "rloo", "reinforce_pp", "online_dpo", "raft", "ppo"])
def test_every_online_recipe_trains_on_episodes(tiny_model_dir, tmp_path, recipe):
    extra = ["ppo.minibatches=1", "ppo.epochs=1"] if recipe == "ppo" else []
    run = loop.train(_cfg(tiny_model_dir, tmp_path, f"recipe={recipe}", *extra), progress=False).run_dir
    rows = read_metrics(run, "train")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for r in rows:
        assert 1 < r["episode/turns"] <= 3 and r["episode/ended_answer"] + r["episode/ended_turn_limit"] + r[
            "episode/ended_token_limit"
        ] == pytest.approx(1.0)
    episodes = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 2 and {m for e in episodes for _, m in e["spans"]} == {True, False}
    assert all(not m for e in episodes for t, m in e["spans"] if "yes no yes" in t)
    if recipe == "grpo":
        html = build_report(run).read_text()
        assert 'id="episode"' in html and '<span class="scored">' in html
        assert re.search(r'<span class="context">[^<]*yes no yes[^<]*</span>', html)  # the tool's reply: context


def test_distill_with_an_environment_scores_the_students_turns_only(tiny_model_dir, tmp_path):
    """`recipe: distill` on episodes (issue 32): the teacher reads the whole episode and the
    divergence is taken at the student's own tokens only; the environment's tokens get no gradient,
    and the run trains and logs the episodes' metrics and rewards."""
    from alignkit.testing import save_tiny_model_dir

    teacher = save_tiny_model_dir(tmp_path / "teacher", seed=1)
    cfg = _cfg(tiny_model_dir, tmp_path, "recipe=distill", f"teacher.name_or_path={teacher}")
    session = loop.setup(cfg, progress=False)
    recipe, model = session.recipe, session.model
    rollout = recipe.batches(model, session.data.train[:2], key=0)[0]
    scored = sum(sum(m) for g in rollout.groups for m in g.masks)
    assert rollout.metrics["episode/turns"] > 1 and scored < sum(len(m) for g in rollout.groups for m in g.masks)
    captured = []
    handle = model.model.norm.register_forward_hook(lambda mod, inp, out: captured.append(out) or out.retain_grad())
    loss, metrics = recipe.loss(model, rollout, "train")
    handle.remove()
    assert float(metrics["logprob_mismatch_max"]) < 1e-4 and metrics["teacher_kl"].numel() == scored
    assert float(metrics["teacher_kl"].mean()) > 0  # a different teacher
    loss.backward()
    grad = captured[0].grad.abs().sum(-1)
    batch = rollout.batch
    pred, is_scored = batch.predictor_positions(), batch.segment_ids >= 0
    predicts_scored = torch.zeros_like(is_scored)
    for r in range(pred.shape[0]):
        predicts_scored[r, pred[r][is_scored[r]]] = True
    assert grad[~predicts_scored].max() == 0.0 and (grad[predicts_scored] > 0).float().mean() > 0.9
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) and r["episode/turns"] > 1 for r in rows)
    assert all("reward" in r for r in rows)


def test_episode_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="online.rewards"):
        _cfg(tiny_model_dir, tmp_path, "online.rewards=length")
    with pytest.raises(ConfigError, match="env.max_turns.*env.name"):
        load_config(
            None,
            [
                f"model.name_or_path={tiny_model_dir}",
                "data.train=x.jsonl",
                "recipe=grpo",
                "online.rewards=length",
                "env.max_turns=3",
            ],
        )
    _cfg(tiny_model_dir, tmp_path, "generation.backend=vllm")  # episodes on vLLM: turn by turn
    _cfg(tiny_model_dir, tmp_path, "generation.backend=vllm", "online.async.mode=one_step_off")
    _cfg(tiny_model_dir, tmp_path, "generation.sampler_server=http://127.0.0.1:1", "online.async.mode=stream")
    with pytest.raises(ConfigError, match="env.args"):
        loop.setup(_cfg(tiny_model_dir, tmp_path, "env.args={turns: 2}"), progress=False)
    with pytest.raises(ConfigError, match="has no `tools`"):
        loop.setup(_cfg(tiny_model_dir, tmp_path, "env.tools=[calculator]"), progress=False)


def test_data_show_samples_one_episode(tiny_model_dir, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg = _cfg(tiny_model_dir, tmp_path)
    from alignkit.config import save_config

    save_config(cfg, cfg_path)
    assert main(["data", "show", "--config", str(cfg_path), "--episode"]) == 0
    out = capsys.readouterr().out
    assert "episode prompt" in out and "[scored]" in out
    assert re.search(r"\[context\] '[^']*yes no yes", out) and not re.search(r"\[scored\] '[^']*yes no yes", out)


def test_episodes_one_step_off_sample_with_the_weights_one_step_behind(tiny_model_dir, tmp_path):
    """online.async with `env.name`: a copy of the policy runs the episodes of rollout t in a thread
    while step t-1 trains. Rollout 0 is what the synchronous run samples (same weights, same seeds);
    later rollouts are one version behind (their log-probs differ from the trainer's); the schedule
    is fixed, so two runs train the same weights."""
    fast = ["train.learning_rate=3e-2", "train.max_steps=3"]
    sync = loop.train(_cfg(tiny_model_dir, tmp_path, *fast, out="sync"), progress=False).run_dir
    runs = [
        loop.train(
            _cfg(tiny_model_dir, tmp_path, *fast, "online.async.mode=one_step_off", out=f"osf{i}"), progress=False
        )
        for i in range(2)
    ]
    rows = read_metrics(runs[0].run_dir, "train")
    assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1]
    assert rows[0]["logprob_mismatch_max"] < 1e-5 < 1e-3 < rows[1]["logprob_mismatch_max"]
    assert all(1 < r["episode/turns"] <= 3 for r in rows)

    def episodes(run):
        return [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]

    assert episodes(runs[0].run_dir)[0] == episodes(sync)[0]
    assert episodes(runs[0].run_dir) == episodes(runs[1].run_dir)
    a, b = (load_file(str(r.final_dir / "model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
