"""PPO (recipe: ppo) on a tiny model: it learns, trains a value model with its own optimizer,
logs its metrics, checkpoints both modules, and a run killed mid-run resumes exactly."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import base_overrides, toy_pairs, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

REWARD = """
def yes_share(prompts, completions, **columns):
    return [c.split().count("yes") / max(1, len(c.split())) for c in completions]

def chars(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]
"""


def _args(model_dir, tmp_path, *extra, out="run", reward="yes_share") -> list:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_pairs(48)])
    fn = tmp_path / "rewards.py"
    fn.write_text(REWARD)
    return base_overrides(model_dir, prompts, tmp_path / out, tmp_path / "cache") + [
        "recipe=ppo",
        f"online.rewards={fn}:{reward}",
        "generation.num_samples=8",
        "generation.max_new_tokens=8",
        "train.batch_size=4",
        "train.warmup_ratio=0",
        "train.learning_rate=3e-2",
        "train.lr_schedule=constant",
        "critic.learning_rate=1e-3",
        "data.eval_fraction=0.25",
        *extra,
    ]


def _cfg(model_dir, tmp_path, *extra, **kw):
    return load_config(None, _args(model_dir, tmp_path, *extra, **kw))


def test_ppo_raises_heldout_reward_and_logs_its_metrics(tiny_model_dir, tmp_path):
    result = loop.train(_cfg(tiny_model_dir, tmp_path, "train.max_steps=24", "online.kl_coef=0.01"), progress=False)
    evals = read_metrics(result.run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 24]
    assert evals[-1]["reward"] > evals[0]["reward"] + 0.5, evals
    rows = read_metrics(result.run_dir, "train")
    for key in (
        "value_loss",
        "policy_loss",
        "value/explained_variance",
        "value_clip_fraction",
        "advantages/mean",
        "advantages/std",
        "returns/mean",
        "value/mean",
        "kl",
        "reward",
        "entropy",
        "clip_fraction",
        "logprob_mismatch",
        "grad_norm",
        "grad_norm/value",
        "lr/value",
        "time/generation_s",
    ):
        assert key in rows[-1], key
    # 2 epochs x 2 minibatches: a rollout every 4 steps, and the ratio moves off 1 after its first update
    assert [r["time/generation_s"] > 0 for r in rows[:8]] == [True, False, False, False] * 2
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-4
    assert all(r["lr/value"] == 1e-3 and r["lr"] == 3e-2 for r in rows)  # two optimizers, two learning rates


def test_ppo_with_truncated_sampling_scores_the_distribution_it_sampled(tiny_model_dir, tmp_path):
    """Temperature 0.7, top-p 0.9, top-k 20 (issue 28): PPO's old log-probs are the sampling
    distribution's, as the sampler's are (mismatch within 1e-4), and the first update's ratio is 1."""
    cfg = _cfg(
        tiny_model_dir,
        tmp_path,
        "train.max_steps=4",
        "online.kl_coef=0.01",
        *("generation.temperature=0.7", "generation.top_p=0.9", "generation.top_k=20"),
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert max(r["logprob_mismatch_max"] for r in rows if "logprob_mismatch_max" in r) < 1e-4
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_the_value_model_trains_and_is_saved_beside_the_policy(tiny_model_dir, tmp_path):
    result = loop.train(
        _cfg(tiny_model_dir, tmp_path, "train.max_steps=8", "train.save_every=4", reward="chars"), progress=False
    )
    run = result.run_dir
    assert (run / "checkpoint-4" / "value" / "model.safetensors").is_file()
    state = torch.load(run / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert set(state["modules"]) == {"policy", "value"} and state["recipe"]["moments"]["count"] == 32
    value = AutoModelForSequenceClassification.from_pretrained(run / "final_value")
    start = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    trunk_moved = [
        n for (n, a), b in zip(value.model.named_parameters(), start.model.parameters()) if not torch.equal(a, b)
    ]
    assert trunk_moved  # the value model's trunk trained (from the policy's weights)
    rows = read_metrics(run, "train")
    # each rollout's second epoch sees the same prompts as its first, with a trained value model
    for r in (0, 4):
        first, second = (sum(x["value_loss"] for x in rows[r + e : r + e + 2]) for e in (0, 2))
        assert second < first


def test_value_model_from_a_reward_model_with_a_frozen_trunk(tiny_model_dir, pairs_file, tmp_path):
    rm = loop.train(
        load_config(
            None,
            base_overrides(tiny_model_dir, pairs_file, tmp_path / "rm", tmp_path / "cache")
            + ["recipe=reward", "train.max_steps=3", "train.batch_size=4"],
        ),
        progress=False,
    )
    result = loop.train(
        _cfg(
            tiny_model_dir,
            tmp_path,
            "train.max_steps=4",
            f"critic.init={rm.final_dir}",
            "critic.freeze_layers=2",
            reward="chars",
        ),
        progress=False,
    )
    start, value = (
        AutoModelForSequenceClassification.from_pretrained(d) for d in (rm.final_dir, result.run_dir / "final_value")
    )
    for (name, a), b in zip(start.model.named_parameters(), value.model.parameters()):
        assert torch.equal(a, b), name  # the trunk (all blocks, embeddings) stayed frozen
    assert not torch.equal(start.score.weight, value.score.weight)  # the reward model's head trained on


def test_value_model_with_lora(tiny_model_dir, tmp_path):
    result = loop.train(
        _cfg(tiny_model_dir, tmp_path, "train.max_steps=4", "critic.lora=true", "lora.r=4", reward="chars"),
        progress=False,
    )
    value = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "final_value")  # merged
    start = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(value.state_dict()[q], start.state_dict()[q])


def test_ptx_mixes_an_nll_term_on_sft_data(tiny_model_dir, sft_file, tmp_path):
    rows = read_metrics(
        loop.train(
            _cfg(
                tiny_model_dir,
                tmp_path,
                "train.max_steps=8",
                "ppo.ptx_coef=0.5",
                f"ppo.ptx_data={sft_file}",
                reward="chars",
            ),
            progress=False,
        ).run_dir,
        "train",
    )
    assert all("ptx_nll" in r for r in rows)
    assert rows[-1]["ptx_nll"] < rows[0]["ptx_nll"]
    with pytest.raises(ConfigError, match="ppo.ptx_data"):
        _cfg(tiny_model_dir, tmp_path, "ppo.ptx_coef=0.5")


def test_ppo_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="cannot exceed `train.batch_size`"):
        _cfg(tiny_model_dir, tmp_path, "ppo.minibatches=8")
    with pytest.raises(ConfigError, match="recipe ppo does not read `online.iterations`"):
        _cfg(tiny_model_dir, tmp_path, "online.iterations=2")


_KILL = r"""
import os, signal, sys
from alignkit.config import load_config
from alignkit.train import checkpoint as ckpt, loop

kill_after = int(sys.argv[1])
real = ckpt.save_checkpoint

def save(run_dir, step, *a, **k):
    path = real(run_dir, step, *a, **k)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no exception handlers
    return path

ckpt.save_checkpoint = save
loop.train(load_config(None, sys.argv[3:]), resume=sys.argv[2] == "resume", progress=False)
"""


def _params(directory) -> dict:
    return load_file(str(directory / "model.safetensors"))


def test_ppo_killed_between_updates_of_a_rollout_resumes_exactly(tiny_model_dir, tmp_path):
    """Killed at step 6 (the 2nd of 4 updates on the 2nd rollout): policy, value model, both
    optimizers, the rollout in progress and the reward statistics all come back."""
    common = ["train.max_steps=12", "train.save_every=3", "online.kl_coef=0.02"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(kill_after, mode, out):
        return subprocess.run(
            [
                sys.executable,
                "-c",
                _KILL,
                str(kill_after),
                mode,
                *_args(tiny_model_dir, tmp_path, *common, out=out, reward="chars"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    full = run(0, "fresh", "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(6, "fresh", "run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run(0, "resume", "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoint-6" in resumed.stdout
    for sub in ("final", "final_value"):
        a, b = _params(tmp_path / "full" / sub), _params(tmp_path / "run" / sub)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, sub
    rows_a, rows_b = (read_metrics(tmp_path / d, "train") for d in ("full", "run"))
    assert [r["step"] for r in rows_b] == list(range(1, 13))
    for ra, rb in zip(rows_a, rows_b):
        assert ra["value_loss"] == pytest.approx(rb["value_loss"], abs=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 12
