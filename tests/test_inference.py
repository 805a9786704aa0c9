"""Inference-time strategies: best-of-N returns the argmax candidate, soft best-of-N draws with
weights exp(r / T), the KL bound, and `alignkit generate` end to end on a tiny model."""

import json
import math

import pytest
import torch

from alignkit.generation.backends import TransformersBackend
from alignkit.generation.decode import SamplingParams
from alignkit.inference.best_of_n import best_of_n, best_of_n_kl_bound, sample_once, select_soft, soft_best_of_n
from alignkit.testing import tiny_model, tiny_tokenizer


def yes_count(prompts, completions, **columns):
    return [float(c.split().count("yes")) + 0.01 * len(c.split()) for c in completions]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok)).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("what is 2 plus 3 ?", "tell me about the sky", "hello")]
    from alignkit.generation.hf import encode_prompts

    ids = encode_prompts(tok, prompts)
    return TransformersBackend(model, tok, batch_size=2), prompts, ids


def test_best_of_n_returns_the_argmax_candidate(setup):
    backend, prompts, ids = setup
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=6)
    out = best_of_n(backend, yes_count, prompts, ids, {}, params, seed=1)
    for c in out.choices:
        assert len(c.candidates) == 6 and c.reward == max(c.candidate_rewards)
        assert c.completion == c.candidates[c.candidate_rewards.index(max(c.candidate_rewards))]
    base = sample_once(backend, yes_count, prompts, ids, {}, params, seed=1)
    assert out.mean_reward >= base.mean_reward
    assert out.kl_bound == pytest.approx(math.log(6) - 5 / 6)
    assert out.prompt_tokens == sum(len(x) for x in ids)  # each prompt processed once for its 6 candidates
    assert out.new_tokens == sum(c.tokens for c in out.choices) > 0


def test_kl_bound_values():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl_bound(8) == pytest.approx(2.0794415 - 0.875, abs=1e-7)


def test_soft_best_of_n_selection_frequencies_match_the_weights():
    rewards = torch.tensor([[0.0, 1.0, 2.0]]).expand(30000, 3)
    picks = select_soft(rewards, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=3).double() / len(picks)
    e = [1.0, math.e, math.e ** 2]
    assert torch.allclose(freq, torch.tensor([x / sum(e) for x in e], dtype=torch.float64), atol=0.01)
    # temperature 0.5 doubles the reward gaps: weights 1 : e^2 : e^4
    picks = select_soft(rewards, temperature=0.5, generator=torch.Generator().manual_seed(0))
    e = [1.0, math.e ** 2, math.e ** 4]
    assert float((picks == 2).double().mean()) == pytest.approx(e[2] / sum(e), abs=0.01)
    with pytest.raises(ValueError, match="temperature > 0"):
        select_soft(rewards, 0.0, torch.Generator())


def test_soft_best_of_n_picks_among_candidates(setup):
    backend, prompts, ids = setup
    out = soft_best_of_n(backend, yes_count, prompts, ids, {}, SamplingParams(8, 1.0, n=4), seed=2, temperature=0.5)
    for c in out.choices:
        assert c.completion == c.candidates[c.chosen] and c.reward == c.candidate_rewards[c.chosen]


def test_generate_cli(tiny_model_dir, tmp_path, capsys):
    from alignkit.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} plus 1 ?", "answer": str(i + 1)}) + "\n"
                               for i in range(3)))
    fn = tmp_path / "r.py"
    fn.write_text("def yes(prompts, completions, answer):\n    return [float('yes' in c) for c in completions]\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--reward", f"{fn}:yes",
                 "--n", "4", "--max-new-tokens", "6", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("\n{") + 1:] if not printed.startswith("{") else printed)
    assert summary["strategy"] == "best-of-n" and summary["prompts"] == 3
    assert summary["kl_bound"] == pytest.approx(math.log(4) - 0.75)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["candidates"]) == 4 and r["reward"] == max(r["candidate_rewards"]) for r in rows)
