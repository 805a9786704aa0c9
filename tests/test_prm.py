"""Process reward models (`recipe: prm`): the step loss by hand, step positions, data errors, and a
toy task whose right and wrong steps are known, scored as a reward afterwards."""

import json
import math
import random

import pytest
import torch
from conftest import base_overrides, write_jsonl

from alignkit.config import load_config
from alignkit.data.formats import RecordError
from alignkit.data.steps import encode_steps, load_step_examples
from alignkit.errors import ConfigError
from alignkit.losses.reward import step_bce
from alignkit.rewards import build_reward
from alignkit.testing import tiny_tokenizer
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


def test_step_bce_by_hand():
    z = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.25], dtype=torch.float64)
    owner = torch.tensor([0, 0, 0, 2])
    loss, metrics = step_bce(z, y, owner, 3)

    def bce(zi, yi):
        return -(yi * math.log(1 / (1 + math.exp(-zi))) + (1 - yi) * math.log(1 / (1 + math.exp(zi))))

    assert float(loss[0]) == pytest.approx((bce(2, 1) + bce(-1, 0) + bce(0.5, 1)) / 3, abs=1e-12)
    assert float(loss[1]) == 0.0  # a reply without steps adds nothing
    assert float(loss[2]) == pytest.approx(bce(3, 0.25), abs=1e-12)
    assert metrics["step_accuracy"].tolist() == [1.0, 1.0, 1.0, 0.0]  # 3 > 0 but 0.25 < 1/2


def test_each_step_is_scored_at_its_last_token():
    tok = tiny_tokenizer()
    steps = ["what is 1 plus 2 ?", "the answer is 3 .", "sorry i cannot help ."]
    prompt_ids, reply_ids, ends = encode_steps(tok, "what is 1 plus 2 ?", steps, "\n")
    assert [tok.convert_ids_to_tokens(reply_ids[e]) for e in ends] == ["?", ".", "."]
    assert ends == sorted(ends) and len(set(ends)) == 3
    assert reply_ids[ends[1] - 1] == tok.convert_tokens_to_ids("3")


def test_step_records_name_their_line(tmp_path):
    path = write_jsonl(
        tmp_path / "steps.jsonl",
        [
            {"prompt": "p", "steps": ["a", "b"], "labels": [1, 0]},
            {"prompt": "p", "completion": "a\nb\n\nc", "labels": [1, 0.5, True]},
            {"prompt": "p", "steps": ["a", "b"], "labels": [1]},
        ],
    )
    with pytest.raises(RecordError, match=r"steps.jsonl:3.*one label per step \(2 steps\)"):
        load_step_examples(str(path))
    ok = load_step_examples(str(path), on_bad_record="skip")
    assert [e.steps for e in ok.examples] == [("a", "b"), ("a", "b", "c")] and ok.examples[1].labels == (1.0, 0.5, 1.0)


def _toy(n: int, seed: int) -> list:
    """Sums worked in steps; a wrong step (a wrong sum) is labelled 0, and so is every step after it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        wrong = rng.random() < 0.5
        answer = a + b + (1 if wrong else 0)
        steps = [f"what is {a} plus {b} ?", f"the answer is {answer} .", "the answer is . ."]
        rows.append(
            {"prompt": f"what is {a} plus {b} ?", "steps": steps, "labels": [1, 0 if wrong else 1, 0 if wrong else 1]}
        )
    return rows


def test_a_prm_learns_which_steps_are_wrong_and_is_a_reward(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "steps.jsonl", _toy(64, seed=0))
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / "run", tmp_path / "cache")
        + [
            "recipe=prm",
            "train.max_steps=40",
            "train.batch_size=8",
            "train.learning_rate=1e-2",
            "data.eval_fraction=0.25",
        ],
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert rows[-1]["loss"] < rows[0]["loss"] and "step_accuracy" in rows[-1]
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["alignkit_step_separator"] == "\n"
    prm = build_reward(str(result.final_dir), device="cpu")
    right = ["what is 1 plus 2 ?\nthe answer is 3 .\nthe answer is . ."]
    wrong = ["what is 1 plus 2 ?\nthe answer is 4 .\nthe answer is . ."]
    scores = prm.step_scores(["what is 1 plus 2 ?"] * 2, right + wrong)
    assert len(scores[0]) == 3 and all(0 < s < 1 for s in scores[0])
    assert prm(["what is 1 plus 2 ?"], right)[0] == pytest.approx(min(scores[0]), abs=1e-6)
    last = build_reward({"name": str(result.final_dir), "aggregate": "last"}, device="cpu")
    prod = build_reward({"name": str(result.final_dir), "aggregate": "prod"}, device="cpu")
    assert last(["what is 1 plus 2 ?"], right)[0] == pytest.approx(scores[0][-1], abs=1e-6)
    assert prod(["what is 1 plus 2 ?"], right)[0] == pytest.approx(math.prod(scores[0]), abs=1e-6)
    # held out: the second step of a wrong sum scores below the second step of a right one, on average
    held = _toy(40, seed=1)
    texts = ["\n".join(r["steps"]) for r in held]
    second = [s[1] for s in prm.step_scores([r["prompt"] for r in held], texts)]
    good = [v for v, r in zip(second, held) if r["labels"][1] == 1]
    bad = [v for v, r in zip(second, held) if r["labels"][1] == 0]
    assert sum(good) / len(good) > sum(bad) / len(bad)


def test_prm_settings_that_cannot_work(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="recipe reward does not read `reward.step_separator`"):
        load_config(None, ["recipe=reward", "data.train=x.jsonl", "reward.step_separator=STEP"])
    rm = tmp_path / "rm"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    with pytest.raises(ConfigError, match="scores whole replies"):
        build_reward({"name": str(rm), "aggregate": "min"}, device="cpu")


def _random_prm(model_dir, path):
    """A process reward model directory with an untrained head (scores are arbitrary but fixed),
    whose steps are words (the separator a space), so every sampled reply has several."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.alignkit_step_separator = " "
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


def test_step_returns_credit_each_token_with_the_steps_from_its_own():
    from alignkit.generation.decode import Sample
    from alignkit.train.online import step_returns

    tok = tiny_tokenizer()
    ids = [tok.convert_tokens_to_ids(w) for w in ("yes", "no", "\n", "the", "cat", "\n", "sky")]
    sample = Sample(ids, [0.0] * 7, "stop", step_rewards=[0.5, 0.25, 1.0])
    # a newline ends no step of its own: it starts the next one's text
    assert step_returns(tok, sample, "\n") == [1.75, 1.75, 1.25, 1.25, 1.25, 1.0, 1.0]
    masked = Sample(ids, [0.0] * 6, "stop", mask=[True] * 5 + [False, True], step_rewards=[0.5, 0.25, 1.0])
    assert step_returns(tok, masked, "\n") == [1.75, 1.75, 1.25, 1.25, 1.25, 1.0]  # scored tokens only
    odd = Sample(ids, [0.0] * 7, "stop", step_rewards=[0.5, 0.25])  # scores that do not line up
    assert step_returns(tok, odd, "\n") == [0.75] * 7


def test_grpo_credits_each_step_with_per_step_process_rewards(tiny_model_dir, tmp_path):
    """`{name: PRM, per_step: true}` (issue 31): a reply's reward is the sum of its step scores and
    each token's advantage adds its step's return against the reply's, A_t = A + (G_t - G_0) / std."""
    prm = _random_prm(tiny_model_dir, tmp_path / "prm")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i} plus {i} ?"} for i in range(8)])
    spec = json.dumps({"name": str(prm), "per_step": True})
    args = base_overrides(tiny_model_dir, data, tmp_path / "run", tmp_path / "cache") + [
        "recipe=grpo",
        f"online.rewards={spec}",
        "generation.num_samples=4",
        "generation.max_new_tokens=24",
        "generation.temperature=1.0",
        "train.batch_size=4",
        "train.max_steps=2",
        "data.eval_fraction=0",
    ]
    session = loop.setup(load_config(None, args), progress=False)
    rollout = session.recipe.batches(session.model, session.data.train[:4], key=0)[0]
    assert rollout.turn_returns is not None and rollout.turn_returns.numel() == rollout.advantages.numel()
    assert len(set(rollout.turn_returns.tolist())) > len(rollout.groups) * 4  # several steps per reply
    rows = read_metrics(loop.train(load_config(None, args), progress=False).run_dir, "train")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    for bad, why in (
        (["recipe=raft"], "work with recipe grpo, rloo"),
        ([f"online.rewards=[{spec}, length]".replace("length", '{"name": "length", "max_words": 5}')], "only reward"),
    ):
        with pytest.raises(ConfigError, match=why):
            loop.setup(load_config(None, args + bad), progress=False)
    with pytest.raises(ConfigError, match="drop `aggregate`"):
        build_reward({"name": str(prm), "per_step": True, "aggregate": "min"}, device="cpu")


def test_step_rewards_land_on_each_steps_last_token():
    from alignkit.losses.ppo import step_rewards_from_returns

    returns = torch.tensor([1.75, 1.75, 1.25, 1.25, 1.0, 0.5, 0.5], dtype=torch.float64)
    segs = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    got = step_rewards_from_returns(returns, segs, 2)
    assert got.tolist() == [0.0, 0.5, 0.0, 0.25, 1.0, 0.0, 0.5]  # steps 0.5, 0.25, 1.0 | one step 0.5
    assert float(got[:5].sum()) == 1.75  # a sequence's rewards add up to its return


def test_ppo_takes_per_step_process_rewards(tiny_model_dir, tmp_path, monkeypatch):
    """PPO with `per_step`: the step rewards (on each step's last token, scaled by the running std of
    the replies' rewards) enter GAE in place of the reply's single reward; the run trains."""
    prm = _random_prm(tiny_model_dir, tmp_path / "prm")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i} plus {i} ?"} for i in range(8)])
    args = base_overrides(tiny_model_dir, data, tmp_path / "run", tmp_path / "cache") + [
        "recipe=ppo",
        f"online.rewards={json.dumps({'name': str(prm), 'per_step': True})}",
        "generation.num_samples=2",
        "generation.max_new_tokens=12",
        "generation.temperature=1.0",
        "train.batch_size=4",
        "train.max_steps=2",
        "ppo.minibatches=1",
        "ppo.epochs=1",
        "data.eval_fraction=0",
    ]
    from alignkit.losses import ppo as P

    real, seen = P.step_rewards_from_returns, []

    def spy(returns, segs, num):
        out = real(returns, segs, num)
        seen.append((returns.clone(), out.clone(), segs.clone(), num))
        return out

    monkeypatch.setattr(P, "step_rewards_from_returns", spy)
    rows = read_metrics(loop.train(load_config(None, args), progress=False).run_dir, "train")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert len(seen) == 2  # one rollout per step, each with its steps' rewards
    for returns, rewards, segs, num in seen:  # several steps per reply; a reply's step rewards add up to its reward
        assert (rewards != 0).sum() > num
        sums = torch.zeros(num, dtype=rewards.dtype).index_add_(0, segs, rewards)
        first = [int((segs == s).nonzero()[0]) for s in range(num) if (segs == s).any()]
        assert sums[segs[first]].tolist() == pytest.approx(returns[first].tolist(), abs=1e-5)
