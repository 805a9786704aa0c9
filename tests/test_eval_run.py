"""`alignkit eval` end to end on a tiny model, rewards (functions, reward models, transforms)."""

import json
import math

import pytest

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.rewards import combine_log_sigmoid, load_reward, log_sigmoid_transform
from alignkit.train import loop
from conftest import base_overrides

REWARD_PY = '''
def says_answer(prompts, completions, **columns):
    return [float("answer" in c) for c in completions]

def wrong_length(prompts, completions, **columns):
    return [1.0]
'''


@pytest.fixture
def reward_file(tmp_path):
    p = tmp_path / "my_rewards.py"
    p.write_text(REWARD_PY)
    return p


def test_log_sigmoid_transform_and_combination():
    """log sigmoid(0) = log 1/2 = -0.693147; log sigmoid(2) = -log(1 + e^-2) = -0.126928."""
    assert log_sigmoid_transform([0.0, 2.0, 1.0], [0.0, 0.0, 3.0]) == pytest.approx(
        [-0.693147, -0.126928, -2.126928], abs=1e-6)
    both = combine_log_sigmoid({"a": [2.0], "b": [0.0]}, {"a": [0.0], "b": [0.0]}, weights={"b": 2.0})
    assert both == pytest.approx([-0.126928 - 2 * 0.693147], abs=1e-6)
    # Far above the reference saturates at 0: one reward cannot buy the AND of the others.
    assert log_sigmoid_transform([50.0], [0.0])[0] == pytest.approx(0.0, abs=1e-12)


def test_reward_function_interface(reward_file):
    fn = load_reward(f"{reward_file}:says_answer")
    assert fn(["p", "q"], ["the answer is 4", "no"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        load_reward(f"{reward_file}:wrong_length")(["p", "q"], ["a", "b"])
    with pytest.raises(ConfigError, match="has no function 'nope'; callables found: says_answer, wrong_length"):
        load_reward(f"{reward_file}:nope")


def test_reward_model_scores_like_training_and_needs_a_direction(tiny_model_dir, tmp_path):
    from conftest import toy_pairs, write_jsonl

    rows = [dict(r, labels={"correct": 1, "short": -1}) for r in toy_pairs()]
    data = write_jsonl(tmp_path / "mo.jsonl", rows)
    cfg = load_config(None, base_overrides(tiny_model_dir, data, tmp_path / "rm", tmp_path / "c") + [
        "recipe=reward", "train.learning_rate=2e-3", "train.max_steps=20", "train.warmup_ratio=0",
        "reward.objectives=[correct,short]", "data.eval_fraction=0"])
    final = loop.train(cfg, progress=False).final_dir
    with pytest.raises(ConfigError, match="has 2 rewards \\(correct, short\\); give a direction"):
        load_reward(str(final))
    prompts = ["what is 1 plus 2 ?"] * 2
    replies = ["the answer is 3 .", "sorry i cannot help ."]
    correct = load_reward(str(final), weights={"correct": 1.0})(prompts, replies)
    short = load_reward(str(final), weights={"short": 1.0})(prompts, replies)
    assert correct[0] > correct[1] and short[1] > short[0]  # each direction prefers its own reply


def test_eval_on_a_run_writes_metrics_and_report(tiny_model_dir, pairs_file, reward_file, tmp_path):
    cfg = load_config(None, base_overrides(tiny_model_dir, pairs_file, tmp_path / "run", tmp_path / "c") + [
        "train.learning_rate=5e-3", "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5",
        "train.warmup_ratio=0", "data.eval_fraction=0.2"])
    loop.train(cfg, progress=False)
    assert main(["eval", "--run", str(tmp_path / "run"), "--reward", f"{reward_file}:says_answer",
                 "--num-prompts", "6", "--max-new-tokens", "5", "--no-progress"]) == 0
    m = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    pref = m["preference"]
    assert m["n_pairs"] == 8 and m["beta"] == 0.1
    # Trained on these pairs' kind: the policy's implicit reward ranks held-out pairs right.
    assert pref["implicit_reward_accuracy"]["value"] == 1.0 and pref["implicit_margin"]["value"] > 0
    assert pref["likelihood_displacement"]["rejected_logp_change"] < 0
    assert 0 <= pref["idealized_ranking_accuracy"]["value"] <= 1
    assert m["length_bias"]["reward"] == "reward_model" and len(m["length_bias"]["points"]) == 8
    gen = m["generation"]
    assert gen["n_prompts"] == 6 and gen["win_rate"]["n"] == 6 and math.isfinite(gen["kl"]["value"])
    assert [c["step"] for c in m["checkpoints"]] == [2, 4, 6]
    assert all(0 < c["topk_mass"] <= 1 for c in m["checkpoints"])
    # Training pushes rejected down more and more: the drift grows over checkpoints.
    drops = [c["rejected_logp_change"] for c in m["checkpoints"]]
    assert drops[0] > drops[-1]
    html = (tmp_path / "run" / "report.html").read_text()  # the run's report now shows the evaluation too
    assert 'data-plot="win_rate"' in html and 'data-plot="training"' in html


def test_eval_needs_something_to_do(tiny_model_dir, tmp_path):
    from alignkit.eval.run import EvalConfig, run_eval

    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_eval(EvalConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "e")))
