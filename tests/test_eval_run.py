"""`alignkit eval` end to end on a tiny model, rewards (functions, reward models, transforms)."""

import json
import math

import pytest
from conftest import base_overrides

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.rewards import build_reward as load_reward
from alignkit.rewards import combine_log_sigmoid, log_sigmoid_transform
from alignkit.train import loop

REWARD_PY = """
def says_answer(prompts, completions, **columns):
    return [float("answer" in c) for c in completions]

def wrong_length(prompts, completions, **columns):
    return [1.0]
"""


@pytest.fixture
def reward_file(tmp_path):
    p = tmp_path / "my_rewards.py"
    p.write_text(REWARD_PY)
    return p


def test_log_sigmoid_transform_and_combination():
    """log sigmoid(0) = log 1/2 = -0.693147; log sigmoid(2) = -log(1 + e^-2) = -0.126928."""
    assert log_sigmoid_transform([0.0, 2.0, 1.0], [0.0, 0.0, 3.0]) == pytest.approx(
        [-0.693147, -0.126928, -2.126928], abs=1e-6
    )
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
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / "rm", tmp_path / "c")
        + [
            "recipe=reward",
            "train.learning_rate=2e-3",
            "train.max_steps=20",
            "train.warmup_ratio=0",
            "reward.objectives=[correct,short]",
            "data.eval_fraction=0",
        ],
    )
    final = loop.train(cfg, progress=False).final_dir
    with pytest.raises(ConfigError, match="has 2 rewards \\(correct, short\\); give a direction"):
        load_reward(str(final))
    prompts = ["what is 1 plus 2 ?"] * 2
    replies = ["the answer is 3 .", "sorry i cannot help ."]
    correct = load_reward(str(final), weights={"correct": 1.0})(prompts, replies)
    short = load_reward(str(final), weights={"short": 1.0})(prompts, replies)
    assert correct[0] > correct[1] and short[1] > short[0]  # each direction prefers its own reply


def _completion_logps(model, tokenizer, messages: tuple, completion: tuple, plain: bool = False):
    """(completion token ids, float64 log-softmax rows predicting them [C, V]) from one plain
    transformers forward of prompt + completion, rendered as alignkit renders them."""
    import torch

    from alignkit.data.tokenize import encode_text, render_texts

    p_text, c_text = render_texts(tokenizer, messages, completion, plain)
    p_ids, c_ids = encode_text(tokenizer, p_text, c_text)
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + c_ids])).logits[0].double()
    return c_ids, torch.log_softmax(logits[len(p_ids) - 1 : len(p_ids) + len(c_ids) - 1], -1)


def _pair_logps(model, tokenizer, example) -> tuple[float, float]:
    out = []
    for completion in (example.chosen, example.rejected):
        ids, lp = _completion_logps(model, tokenizer, example.prompt, completion, example.plain_text)
        out.append(float(lp[range(len(ids)), ids].sum()))
    return out[0], out[1]


def test_eval_on_a_run_writes_metrics_and_report(tiny_model_dir, pairs_file, reward_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.formats import load_preference_examples
    from alignkit.data.splits import load_examples

    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, pairs_file, tmp_path / "run", tmp_path / "c")
        + [
            "train.learning_rate=5e-3",
            "train.max_steps=6",
            "train.save_every=2",
            "train.keep_checkpoints=5",
            "train.warmup_ratio=0",
            "data.eval_fraction=0.2",
        ],
    )
    loop.train(cfg, progress=False)
    assert (
        main(
            [
                "eval",
                "--run",
                str(tmp_path / "run"),
                "--reward",
                f"{reward_file}:says_answer",
                "--num-prompts",
                "5",
                "--max-new-tokens",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    pref = m["preference"]
    assert m["n_pairs"] == 8 and m["beta"] == 0.1
    # Trained on these pairs' kind: the policy's implicit reward ranks held-out pairs right.
    assert pref["implicit_reward_accuracy"]["value"] == 1.0 and pref["implicit_margin"]["value"] > 0
    assert pref["likelihood_displacement"]["rejected_logp_change"] < 0
    # Worked out here from the pairs training held out and the reference's log-probs (plain forwards):
    # the optimal policy ranks a pair right iff log pi_ref(y_w)/pi_ref(y_l) > -(1/beta) log 3 (the
    # default alpha 0.75, arXiv 2405.19534); the reference itself iff that log-ratio is > 0.
    held = load_examples(cfg.data, cfg.seed, load_preference_examples)[1]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    z = [c - r for c, r in (_pair_logps(reference, tok, e) for e in held)]
    threshold = -math.log(3) / 0.1
    assert min(abs(x - threshold) for x in z) > 1e-3 and min(abs(x) for x in z) > 1e-3  # no near-tie
    ira = pref["idealized_ranking_accuracy"]
    assert 0 <= ira["value"] <= 1
    assert ira["n"] == 8 and ira["value"] == sum(x > threshold for x in z) / 8
    assert ira["reference_value"] == sum(x > 0 for x in z) / 8
    assert m["length_bias"]["reward"] == "reward_model" and len(m["length_bias"]["points"]) == 8
    gen = m["generation"]
    assert gen["n_prompts"] == 5 and gen["win_rate"]["n"] == 5 and math.isfinite(gen["kl"]["value"])
    lc = gen["length_controlled_win_rate"]
    assert lc["n"] == 5 and lc["raw"] == gen["win_rate"]["value"] and 0 <= lc["value"] <= 1
    # The prompts are the held-out pairs' distinct prompts; with 5 of them, every policy sample is
    # listed, so KL and top-k mass can be recomputed here from plain forwards of final/ and the
    # reference: KL = mean of log pi(y) - log pi_ref(y); top-k mass = mean over the positions
    # predicting the sample's tokens of the 10 largest probabilities' sum (arXiv 2410.11677).
    distinct = list(dict.fromkeys(e.prompt[-1]["content"] for e in held))[:5]
    assert [x["prompt"] for x in gen["examples"]] == distinct
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    kl, mass, positions = [], 0.0, 0
    for x in gen["examples"]:
        messages, reply = ({"role": "user", "content": x["prompt"]},), ({"role": "assistant", "content": x["policy"]},)
        ids, lp = _completion_logps(policy, tok, messages, reply)
        _, ref_lp = _completion_logps(reference, tok, messages, reply)
        kl.append(float(lp[range(len(ids)), ids].sum() - ref_lp[range(len(ids)), ids].sum()))
        mass += float(lp.exp().topk(10, dim=-1).values.sum())
        positions += len(ids)
    # The eval's float32 log-prob sums against float64 here: 4e-7 measured on the KL, hence 5e-6.
    assert gen["kl"]["value"] == pytest.approx(sum(kl) / 5, abs=5e-6)
    assert gen["topk"]["topk_mass"] == pytest.approx(mass / positions, abs=1e-6)
    assert [c["step"] for c in m["checkpoints"]] == [2, 4, 6]
    assert all(0 < c["topk_mass"] <= 1 for c in m["checkpoints"])
    # checkpoint-6 holds final/'s weights and is sampled with the same seed: the same numbers.
    assert m["checkpoints"][-1]["topk_mass"] == pytest.approx(mass / positions, abs=1e-6)
    assert m["checkpoints"][-1]["kl"] == pytest.approx(sum(kl) / 5, abs=5e-6)
    # Training pushes rejected down more and more: the drift grows over checkpoints.
    drops = [c["rejected_logp_change"] for c in m["checkpoints"]]
    assert drops[0] > drops[-1]
    html = (tmp_path / "run" / "report.html").read_text()  # the run's report now shows the evaluation too
    assert 'data-plot="win_rate"' in html and 'data-plot="training"' in html


def test_eval_needs_something_to_do(tiny_model_dir, tmp_path):
    from alignkit.eval.run import EvalConfig, run_eval

    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_eval(EvalConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "e")))


def test_a_rewards_length_bias_is_measured_against_the_whole_reply(tiny_model_dir, tmp_path):
    """A reward reads whole replies, so its length bias is taken against their uncut lengths: a
    reward that is a reply's word count (one token a word in the tiny vocabulary, plus the same end
    tokens on every reply) correlates with them at exactly 1. Measured against lengths cut to
    --max-length 16, every reply longer than the room left would sit at the cap (r 0.66 here)."""
    from conftest import write_jsonl

    rows = [
        {"prompt": "what is 2 plus 2 ?", "chosen": " ".join(["the"] * c), "rejected": " ".join(["sorry"] * r)}
        for c, r in [(2, 5), (30, 3), (4, 40), (25, 60), (7, 1), (50, 9)]
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    words = tmp_path / "words.py"
    words.write_text(
        "def count(prompts, completions, **columns):\n    return [float(len(c.split())) for c in completions]\n"
    )
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--reward", f"{words}:count"]
    assert main([*args, "--max-length", "16", "--output-dir", str(out), "--no-progress", "--no-report"]) == 0
    bias = json.loads((out / "metrics.json").read_text())["length_bias"]
    assert bias["reward"] == "reward_model"
    assert bias["corr_reward_length"] == pytest.approx(1.0, abs=1e-9)
    assert bias["corr_margin_length_diff"] == pytest.approx(1.0, abs=1e-9)
    # chosen longer in pairs 2, 5, 6 (each ranked right by a reward that counts words), shorter in 1, 3, 4
    assert bias["accuracy_chosen_longer"]["n"] == 3 and bias["accuracy_chosen_longer"]["value"] == 1.0
    assert bias["accuracy_chosen_shorter"]["n"] == 3 and bias["accuracy_chosen_shorter"]["value"] == 0.0
