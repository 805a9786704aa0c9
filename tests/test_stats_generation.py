import numpy as np
import pytest
import torch

from alignkit.eval.stats import paired_bootstrap
from alignkit.generation import SamplingParams, generate
from alignkit.testing import tiny_model, tiny_tokenizer


def test_paired_bootstrap_matches_normal_approximation():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 2, 400).astype(float)
    after = np.where(rng.random(400) < 0.3, 1.0, before)  # 30% of prompts forced to succeed
    r = paired_bootstrap(before, after, n_boot=20_000)
    d = after - before
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert r.diff == pytest.approx(d.mean(), abs=1e-12)
    assert r.lo == pytest.approx(d.mean() - 1.96 * se, abs=0.01) and r.hi == pytest.approx(
        d.mean() + 1.96 * se, abs=0.01
    )
    assert r.improved == int((d > 0).sum()) and r.worsened == 0 and r.n == 400


def test_paired_bootstrap_no_change_and_errors():
    r = paired_bootstrap([1, 0, 1], [1, 0, 1])
    assert (r.diff, r.lo, r.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1, 0], [1])


def test_generate_greedy_is_deterministic_and_batch_independent():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=3)
    prompts = [
        [{"role": "user", "content": "what is 2 plus 3 ?"}],
        [{"role": "user", "content": "hello"}],
        "the cat is",
    ]
    p = SamplingParams(max_new_tokens=5)
    together = generate(model, tok, prompts, p, batch_size=3)
    alone = [generate(model, tok, [q], p, batch_size=1)[0] for q in prompts]
    assert together == alone  # left padding does not change greedy output
    assert all(len(x) == 1 for x in together)
    # greedy equals the argmax continuation computed by hand for the raw string prompt
    ids = tok("the cat is", add_special_tokens=True)["input_ids"]
    for _ in range(5):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == tok.eos_token_id:
            break
    n0 = len(tok("the cat is", add_special_tokens=True)["input_ids"])
    assert together[2][0] == tok.decode(ids[n0:], skip_special_tokens=True).strip()


def test_generate_samples_n_per_prompt_seeded():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=3)
    p = SamplingParams(max_new_tokens=6, temperature=1.0, n=4)
    a = generate(model, tok, ["hello", "the sky"], p, seed=1)
    b = generate(model, tok, ["hello", "the sky"], p, seed=1)
    assert a == b and all(len(x) == 4 for x in a)
    assert len(set(a[0])) > 1  # a random tiny model at temperature 1 gives varied samples
