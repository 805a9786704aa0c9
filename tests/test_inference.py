"""Inference-time strategies on tiny models: best-of-N returns the argmax candidate, soft best-of-N
draws with weights exp(r / T), DeAL search meets a keyword constraint that sampling misses,
Transfer Q* commits the candidate whose baseline continuation scores best, controlled decoding
reproduces greedy decoding at strength 0 and follows its value otherwise, URIAL prompts, and the
CLI (`generate`, `fit-value`, `eval --strategy`) end to end."""

import json
import math
import re
import zlib

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
    # Scored here, independently (rewards are held in a float32 tensor, hence the rounding):
    # best-of-n's mean reward is the mean of each prompt's best candidate; sampling's is that of
    # its one draw, the backend's own n=1 sample with the same seed.
    f32 = lambda xs: torch.tensor(xs, dtype=torch.float32).tolist()  # noqa: E731
    best = [max(f32(yes_count(None, c.candidates))) for c in out.choices]
    assert out.mean_reward == pytest.approx(sum(best) / 3, abs=1e-12)
    draws = [g[0].text for g in backend.sample(ids, SamplingParams(10, 1.0, n=1), 1)]
    assert [c.completion for c in base.choices] == draws and [c.candidates for c in base.choices] == [
        [d] for d in draws
    ]
    assert [c.reward for c in base.choices] == f32(yes_count(None, draws))
    assert base.mean_reward == pytest.approx(sum(f32(yes_count(None, draws))) / 3, abs=1e-12)
    assert base.kl == 0.0 and base.kl_kind == "exact"
    assert out.kl == pytest.approx(math.log(6) - 5 / 6) and out.kl_kind == "bound"
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
    e = [1.0, math.e, math.e**2]
    assert torch.allclose(freq, torch.tensor([x / sum(e) for x in e], dtype=torch.float64), atol=0.01)
    # temperature 0.5 doubles the reward gaps: weights 1 : e^2 : e^4
    picks = select_soft(rewards, temperature=0.5, generator=torch.Generator().manual_seed(0))
    e = [1.0, math.e**2, math.e**4]
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
    prompts.write_text(
        "".join(json.dumps({"prompt": f"what is {i} plus 1 ?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    fn = tmp_path / "r.py"
    fn.write_text("def yes(prompts, completions, answer):\n    return [float('yes' in c) for c in completions]\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(prompts),
                "--reward",
                f"{fn}:yes",
                "--n",
                "4",
                "--max-new-tokens",
                "6",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("\n{") + 1 :] if not printed.startswith("{") else printed)
    assert summary["strategy"] == "best-of-n" and summary["prompts"] == 3
    assert summary["kl"] == pytest.approx(math.log(4) - 0.75) and summary["kl_kind"] == "bound"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(
        len(r["candidates"]) == 4 and r["reward"] == max(r["candidate_rewards"]) for r in rows
    )


QUESTIONS = [
    "what is 2 plus 3 ?",
    "tell me about the sky",
    "hello",
    "write a poem",
    "why is the sky blue ?",
    "explain fire",
    "tell me a story",
    "what is the capital city of france ?",
]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model("llama", vocab_size=len(tok)).eval(), tok, [[{"role": "user", "content": q}] for q in QUESTIONS]


def test_deal_meets_a_keyword_constraint_that_sampling_misses(tiny):
    """Over 4 seeds x 8 prompts, a random model says "cat" in about a fifth of its samples; the
    search finds a reply with it almost always (31 of 32 measured)."""
    from alignkit.inference.strategies import StrategyOptions, run_strategy
    from alignkit.rewards.verifiable import Keywords

    model, tok, prompts = tiny
    rw = Keywords(required=["cat"], partial=False)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    opts = StrategyOptions(beam=4, candidates=8, block=4, lookahead=8)
    sampled = [run_strategy("sample", model, tok, rw, prompts, {}, params, seed=s) for s in range(4)]
    searched = [run_strategy("deal", model, tok, rw, prompts, {}, params, opts, seed=s) for s in range(4)]
    sample_rate = sum(r.mean_reward for r in sampled) / 4
    deal_rate = sum(r.mean_reward for r in searched) / 4
    assert sample_rate <= 0.4 and deal_rate >= 0.85, (sample_rate, deal_rate)
    assert all(d.mean_reward > s.mean_reward for d, s in zip(searched, sampled))
    deal = searched[0]
    for c in deal.choices:  # the reported reward is the constraint on the returned text itself
        assert c.reward == float(re.search(r"\bcat\b", c.completion) is not None)
        assert len(tok(c.completion, add_special_tokens=False)["input_ids"]) <= 12
    # 3 steps of 4 tokens, each a choice among 8 samples: KL <= 3 log 8 for a reply that used all steps
    assert max(c.kl for c in deal.choices) == pytest.approx(3 * math.log(8))
    assert deal.kl_kind == "bound" and deal.kl <= 3 * math.log(8) + 1e-9
    assert deal.new_tokens > 10 * sampled[0].new_tokens  # the search's cost is reported, not hidden


def test_transfer_q_commits_the_block_whose_baseline_continuation_scores_best(tiny):
    """One prompt: at each step the reward sees every candidate block followed by the baseline's
    greedy continuation; the committed block must be the one whose text scored highest."""
    from alignkit.generation.decode import sample_batch
    from alignkit.inference.search import SearchParams, block_search

    model, tok, prompts = tiny
    baseline = tiny_model("llama", vocab_size=len(tok), seed=3).eval()
    calls = []

    def spy(ps, completions, **cols):
        # distinct texts get distinct scores (crc32 breaks ties), so "the best" is one text
        scores = [float(c.count("the")) + 0.001 * len(c) + 1e-7 * (zlib.crc32(c.encode()) % 1000) for c in completions]
        calls.append(list(zip(completions, scores)))
        return scores

    from alignkit.generation.hf import encode_prompts

    ids = encode_prompts(tok, prompts[1:2])
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    out = block_search(
        model,
        tok,
        spy,
        prompts[1:2],
        ids,
        {},
        params,
        SearchParams(beam=1, candidates=4, block=4, baseline=baseline, horizon=6),
        seed=0,
        strategy="transfer-q",
    )
    steps = calls[:-1]  # the last call scores the final beam
    assert 1 <= len(steps) <= 3
    tokens = tok(out.choices[0].completion, add_special_tokens=False)["input_ids"]
    for d, group in enumerate(steps[:-1]):
        best_text = max(group, key=lambda t: t[1])[0]
        prefix = tok.decode(tokens[: 4 * (d + 1)])
        assert best_text.startswith(prefix.strip())
        # its tail is the baseline's greedy continuation of the committed prefix
        roll = sample_batch(
            baseline,
            [ids[0] + tokens[: 4 * (d + 1)]],
            SamplingParams(6, 0.0),
            eos_ids=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            tokenizer=tok,
        )[0][0]
        assert best_text == tok.decode(tokens[: 4 * (d + 1)] + roll.token_ids, skip_special_tokens=True).strip()


def _cat_probe(model, tok):
    """A value head that is high right after the token "cat": ridge regression of 'current token is
    cat' on the final hidden state after random tokens."""
    from alignkit.inference.value import ValueHead, prefix_hidden, ridge

    g = torch.Generator().manual_seed(0)
    cat = tok.convert_tokens_to_ids("cat")
    xs, ys = [], []
    for _ in range(6):
        seq = torch.randint(4, len(tok), (40,), generator=g).tolist()
        seq[::5] = [cat] * len(seq[::5])
        xs.append(prefix_hidden(model, [], seq))
        ys.append(torch.tensor([float(t == cat) for t in seq]))
    x, y = torch.cat(xs), torch.cat(ys)
    w, b = ridge(x, y, torch.ones(len(y)), 1e-3)
    return ValueHead(w, b, {"model": "tiny"})


def test_controlled_decoding_at_strength_zero_is_greedy_decoding(tiny):
    """Scoring k candidates from the shared cache and keeping the chosen row must leave decoding
    exactly as the model's own greedy decoding."""
    from alignkit.generation.decode import sample
    from alignkit.generation.hf import encode_prompts
    from alignkit.inference.controlled import controlled_decoding

    model, tok, prompts = tiny
    ids = encode_prompts(tok, prompts)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    greedy = sample(model, ids, params, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, batch_size=3, tokenizer=tok)
    out = controlled_decoding(
        model,
        tok,
        yes_count,
        prompts,
        ids,
        {},
        params,
        _cat_probe(model, tok),
        candidates=5,
        strength=0.0,
        batch_size=3,
    )
    assert [c.completion for c in out.choices] == [g[0].text for g in greedy]
    assert out.prompt_tokens == sum(len(x) for x in ids)


def test_controlled_decoding_follows_its_value(tiny):
    from alignkit.inference.strategies import StrategyOptions, run_strategy
    from alignkit.rewards.verifiable import Keywords

    model, tok, prompts = tiny
    head = _cat_probe(model, tok)
    rw = Keywords(required=["cat"], partial=False)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        head.save(d)
        opts = StrategyOptions(value=d, candidates=len(tok), strength=20.0)
        steered = run_strategy("controlled-decoding", model, tok, rw, prompts, {}, params, opts, seed=0)
        plain = run_strategy("sample", model, tok, rw, prompts, {}, params, seed=0)
    assert plain.mean_reward <= 0.5 and steered.mean_reward == 1.0
    # the KL estimate is the mean of log pi(y) - log p(y): large, since "cat" is improbable under p
    assert steered.kl_kind == "estimate" and steered.kl > 2.0
    assert steered.new_tokens > 0 and steered.new_tokens % len(tok) == 0  # every step scored all candidates


def test_value_head_fit_save_load(tiny, tmp_path):
    from alignkit.errors import ConfigError
    from alignkit.generation.hf import encode_prompts
    from alignkit.inference.value import ValueHead, fit_value_head

    model, tok, prompts = tiny

    def chars(ps, cs, **cols):
        return [len(c) / 10 for c in cs]

    head = fit_value_head(
        model,
        tok,
        chars,
        prompts,
        encode_prompts(tok, prompts),
        {},
        SamplingParams(8, 1.0, n=4),
        progress=False,
        model_name="tiny",
    )
    assert head.weight.shape == (model.config.hidden_size,) and head.meta["completions"] == 32
    assert head.meta["heldout_r2"] <= 1 and 0 <= head.meta["train_r2"] <= 1
    _check_value_fit(model, tok, prompts, head, chars)
    constant = fit_value_head(
        model,
        tok,
        lambda ps, cs, **k: [1.0] * len(cs),
        prompts,
        encode_prompts(tok, prompts),
        {},
        SamplingParams(8, 1.0, n=4),
        progress=False,
    )
    assert constant.meta["heldout_r2"] is None and constant.bias == pytest.approx(0.0, abs=1e-9)
    head.save(tmp_path / "v")
    back = ValueHead.load(tmp_path / "v", model.config.hidden_size)
    torch.testing.assert_close(back.weight, head.weight)
    assert back.bias == pytest.approx(head.bias)
    with pytest.raises(ConfigError, match="hidden size"):
        ValueHead.load(tmp_path / "v", 64)
    with pytest.raises(ConfigError, match="alignkit fit-value"):
        ValueHead.load(tmp_path / "nothing")


def _check_value_fit(model, tok, prompts, head, reward):
    """Redo fit_value_head's fit independently in numpy float64: the same seeded samples, features
    (hidden state after each completion token), standardised reward targets, weights 1/len, every
    fifth completion held out; ridge solved on the bias-augmented normal equations (no centering);
    weighted R^2. The head, the chosen l2 and every reported R^2 must match."""
    import numpy as np

    from alignkit.generation.decode import sample
    from alignkit.generation.hf import encode_prompts
    from alignkit.inference.value import L2_GRID, prefix_hidden

    ids = encode_prompts(tok, prompts)
    groups = sample(
        model,
        ids,
        SamplingParams(8, 1.0, n=4),
        eos_ids=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        batch_size=8,
        seed=0,
        tokenizer=tok,
    )
    flat = np.array([r for i, g in enumerate(groups) for r in reward([prompts[i]] * len(g), [s.text for s in g])])
    mean, std = flat.mean(), flat.std(ddof=1)
    rows = []  # (features [len, H], target, weight) per non-empty completion, in order
    scores = iter(flat)
    for i, g in enumerate(groups):
        for s in g:
            r = next(scores)
            if s.token_ids:
                x = prefix_hidden(model, ids[i], s.token_ids).double().numpy()
                rows.append((x, (r - mean) / std, 1.0 / len(x)))

    def stack(keep):
        x = np.concatenate([x for j, (x, _, _) in enumerate(rows) if keep(j)])
        y = np.concatenate([np.full(len(x), t) for j, (x, t, _) in enumerate(rows) if keep(j)])
        w = np.concatenate([np.full(len(x), w) for j, (x, _, w) in enumerate(rows) if keep(j)])
        return x, y, w

    def fit(x, y, w, l2):
        xa = np.hstack([x, np.ones((len(x), 1))])
        reg = np.diag([l2] * x.shape[1] + [0.0])  # the bias is not penalised
        coef = np.linalg.solve(xa.T @ (w[:, None] * xa) + reg, xa.T @ (w * y))
        return coef[:-1], coef[-1]

    def r2(x, y, w, a, b):
        my = (w * y).sum() / w.sum()
        return 1 - (w * (y - x @ a - b) ** 2).sum() / (w * (y - my) ** 2).sum()

    train, held = stack(lambda j: j % 5 != 0), stack(lambda j: j % 5 == 0)
    heldout = {l2: r2(*held, *fit(*train, l2)) for l2 in L2_GRID}
    best = max(heldout, key=heldout.get)
    every = stack(lambda j: True)
    a, b = fit(*every, best)
    assert head.meta["completions"] == len(rows) and head.meta["prefixes"] == len(every[0])
    # float64 on both sides, two formulations of the same solve; the small-l2 solves are ill-conditioned
    # (a random model's hidden states are nearly collinear): 3e-8 measured there, 1e-11 elsewhere.
    assert head.meta["heldout_r2_by_l2"] == pytest.approx({str(k): v for k, v in heldout.items()}, abs=1e-6)
    assert head.meta["l2"] == best and head.meta["heldout_r2"] == pytest.approx(heldout[best], abs=1e-6)
    assert head.meta["train_r2"] == pytest.approx(r2(*every, a, b), abs=1e-9)
    # The head is stored in float32: its rounding (relative 6e-8) is the tolerance.
    np.testing.assert_allclose(head.weight.double().numpy(), a, rtol=1e-6, atol=1e-6 * np.abs(a).max())
    assert head.bias == pytest.approx(b, abs=1e-6 * max(1.0, abs(b)))


def test_ridge_recovers_a_linear_function():
    from alignkit.inference.value import ridge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    a = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.5])
    w, b = ridge(x, x @ a + 4.0, torch.rand(500, generator=g) + 0.1, 1e-6)
    torch.testing.assert_close(w, a, atol=1e-4, rtol=0)
    assert b == pytest.approx(4.0, abs=1e-4)


def test_urial_prompt_format_and_template_checks(tmp_path):
    from alignkit.errors import ConfigError
    from alignkit.inference.urial import answer_of, load_template, render

    tpl = load_template()
    assert tpl.count("{query}") == 1 and tpl.rstrip().endswith("# Answer:\n```")
    short = load_template("short")
    assert short.count("{query}") == 1 and short.rstrip().endswith("# Answer:\n```") and len(short) < len(tpl) / 2
    assert load_template("default") == tpl
    text = render(
        tpl,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Sky colour?"},
        ],
    )
    assert text.endswith("# Query:\n```\nBe brief.\n\nSky colour?\n```\n\n# Answer:\n```\n")
    assert "# Query:\n```\nHi?\n```\n\n# Answer:\n```\nHello.\n```\n\n# Query:\n```\nBe brief." in text
    assert answer_of("Blue.\n```\n\n# Query:") == "Blue."
    bad = tmp_path / "t.txt"
    bad.write_text("no placeholder")
    with pytest.raises(ConfigError, match="exactly once"):
        load_template(str(bad))
    with pytest.raises(ConfigError, match="not a shipped template"):
        load_template(str(tmp_path / "missing.txt"))
    good = tmp_path / "g.txt"
    good.write_text("Answer well.\n# Query:\n```\n{query}\n```\n# Answer:\n```\n")
    assert render(load_template(str(good)), "2+2?") == "Answer well.\n# Query:\n```\n2+2?\n```\n# Answer:\n```\n"


def test_urial_strategy_on_a_tiny_model(tiny):
    from alignkit.inference.strategies import StrategyOptions, run_strategy

    model, tok, prompts = tiny
    out = run_strategy("urial", model, tok, yes_count, prompts[:3], {}, SamplingParams(10, 1.0), StrategyOptions())
    assert len(out.choices) == 3 and all("```" not in c.completion for c in out.choices)
    assert out.prompt_tokens > 3 * 100  # the template's examples are part of every prompt
    assert out.kl_kind == "estimate" and math.isfinite(out.kl)
    # Recomputed with plain forwards: each answer's KL term is log p(sampled tokens | URIAL prompt)
    # - log p(answer | chat prompt), and the estimate is their mean.
    from alignkit.data.tokenize import encode_text, render_texts
    from alignkit.generation.decode import sample
    from alignkit.inference.urial import FENCE, load_template, render

    ids = [tok(render(load_template(), p), add_special_tokens=True)["input_ids"] for p in prompts[:3]]
    groups = sample(
        model,
        ids,
        SamplingParams(10, 1.0, stop=(FENCE,)),
        eos_ids=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        batch_size=8,
        seed=0,
        tokenizer=tok,
    )

    def logp(prompt_ids, completion_ids):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt_ids + completion_ids])).logits[0].double(), -1)
        return sum(float(lp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(completion_ids))

    terms = []
    for p, g, c in zip(prompts[:3], groups, out.choices):
        p_text, c_text = render_texts(tok, tuple(p), ({"role": "assistant", "content": c.completion},), False)
        terms.append(logp(ids[len(terms)], g[0].token_ids) - logp(*encode_text(tok, p_text, c_text)))
    # The sampler's float32 KV-cached forward against a float32 full forward here: 2.6e-6 measured
    # over ~20 tokens, so 2e-5.
    assert [c.kl for c in out.choices] == pytest.approx(terms, abs=2e-5)
    assert out.kl == pytest.approx(sum(terms) / 3, abs=2e-5)


@pytest.mark.parametrize("strategy", ["sample", "soft-best-of-n", "deal", "transfer-q", "urial"])
def test_generate_cli_strategies(strategy, tiny_model_dir, tmp_path, capsys):
    from alignkit.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS[:3]))
    extra = ["--baseline", str(tiny_model_dir)] if strategy == "transfer-q" else []
    rows_file = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(prompts),
                "--strategy",
                strategy,
                "--reward",
                '{"name": "keywords", "required": ["the"]}',
                "--n",
                "3",
                "--candidates",
                "2",
                "--block",
                "3",
                "--max-new-tokens",
                "6",
                "--horizon",
                "4",
                "--output",
                str(rows_file),
            ]
            + extra
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["strategy"] == strategy and summary["prompts"] == 3 and summary["new_tokens"] > 0
    assert summary["kl_kind"] in ("exact", "bound", "estimate")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    # The reward, scored here: 1 if "the" is a word of the text (keywords is case-insensitive).
    has_the = lambda text: float(re.search(r"\bthe\b", text, re.IGNORECASE) is not None)  # noqa: E731
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    for r in rows:
        assert r["completion"] == r["candidates"][r["chosen"]] and r["reward"] == has_the(r["completion"])
        assert r["candidate_rewards"] == [has_the(c) for c in r["candidates"]]
    assert summary["mean_reward"] == pytest.approx(sum(r["reward"] for r in rows) / 3, abs=1e-12)
    assert summary["new_tokens"] == sum(r["new_tokens"] for r in rows)
    # Each strategy's own settings reach it (--n 3, --candidates 2, --block 3, --horizon 4, 6 tokens).
    if strategy == "sample":
        assert (summary["kl"], summary["kl_kind"]) == (0.0, "exact")
        assert all(len(r["candidates"]) == 1 and 0 < r["new_tokens"] <= 6 for r in rows)
    elif strategy == "soft-best-of-n":
        assert summary["kl"] == pytest.approx(math.log(3)) and summary["kl_kind"] == "bound"
        assert summary["n"] == 3 and all(len(r["candidates"]) == 3 and r["new_tokens"] <= 18 for r in rows)
    elif strategy in ("deal", "transfer-q"):
        # KL bound: mean over prompts of (steps taken) * log(candidates); 6 tokens in blocks of 3 is
        # 1 or 2 steps per prompt, so 3 * kl / log 2 is a whole number from 3 to 6.
        assert summary["kl_kind"] == "bound" and (summary["candidates"], summary["block"]) == (2, 3)
        steps = 3 * summary["kl"] / math.log(2)
        assert steps == pytest.approx(round(steps), abs=1e-9) and 3 <= round(steps) <= 6
        if strategy == "deal":
            assert (summary["beam"], summary["lookahead"]) == (2, 16) and all(len(r["candidates"]) <= 2 for r in rows)
        else:
            assert (summary["beam"], summary["horizon"]) == (1, 4) and all(len(r["candidates"]) == 1 for r in rows)
    else:
        assert summary["kl_kind"] == "estimate" and summary["template"] == "default"
        assert all(len(r["candidates"]) == 1 and 0 < r["new_tokens"] <= 6 for r in rows)


def test_fit_value_then_controlled_decoding_and_eval_cli(tiny_model_dir, tmp_path, capsys):
    from alignkit.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    reward = ["--reward", '{"name": "keywords", "required": ["the"]}']
    assert (
        main(
            [
                "fit-value",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(prompts),
                "--n",
                "3",
                "--max-new-tokens",
                "6",
                "--output",
                str(tmp_path / "value"),
            ]
            + reward
        )
        == 0
    )
    assert (tmp_path / "value" / "value_head.safetensors").is_file()
    capsys.readouterr()
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(prompts),
                "--strategy",
                "controlled-decoding",
                "--value",
                str(tmp_path / "value"),
                "--candidates",
                "3",
                "--max-new-tokens",
                "6",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
            + reward
            + ["--reward", '{"name": "keywords", "required": ["a"]}']
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "strategy controlled-decoding" in printed and "win rate vs sampling" in printed
    st = json.loads((out / "metrics.json").read_text())["strategy"]
    assert st["n_prompts"] == 8 and st["kl"]["kind"] == "estimate"
    # two rewards are summed: each keyword reward is 0 or 1, so sampled rewards are 0, 1 or 2
    assert all(e["sampling_reward"] in (0.0, 1.0, 2.0) for e in st["examples"])
    assert (
        st["win_rate_vs_sampling"]["wins"] + st["win_rate_vs_sampling"]["ties"] + st["win_rate_vs_sampling"]["losses"]
        == 8
    )
    assert st["cost"]["new_tokens"] == st["summary"]["new_tokens"] and st["cost"]["new_tokens_vs_sampling"] > 1
    html = (out / "report.html").read_text()
    assert "Inference-time strategy: controlled-decoding" in html and "win rate vs sampling" in html


def test_deal_with_one_candidate_is_plain_sampling_in_blocks(tiny):
    """One proposal per node leaves nothing to choose: the reply is a sample and the KL bound is 0."""
    from alignkit.inference.strategies import StrategyOptions, run_strategy

    model, tok, prompts = tiny
    out = run_strategy(
        "deal",
        model,
        tok,
        yes_count,
        prompts[:3],
        {},
        SamplingParams(10, 1.0),
        StrategyOptions(beam=1, candidates=1, block=3, lookahead=3),
        seed=0,
    )
    assert out.kl == 0.0 and all(len(c.candidates) == 1 and c.completion for c in out.choices)


def test_eval_strategy_on_the_prompts_of_preference_pairs(tiny_model_dir, pairs_file, tmp_path):
    """Without --prompts, the strategy runs on the distinct prompts of --data (at most --num-prompts),
    with best-of-n's KL bound and about 4x sampling's tokens for n = 4."""
    from alignkit.cli import main

    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(pairs_file),
                "--strategy",
                "best-of-n",
                "--n",
                "4",
                "--num-prompts",
                "6",
                "--max-new-tokens",
                "5",
                "--output-dir",
                str(out),
                "--no-progress",
                "--no-report",
                "--reward",
                '{"name": "keywords", "required": ["the"]}',
            ]
        )
        == 0
    )
    st = json.loads((out / "metrics.json").read_text())["strategy"]
    assert st["n_prompts"] == 6 and st["kl"] == {"value": pytest.approx(math.log(4) - 0.75), "kind": "bound"}
    assert st["cost"]["new_tokens_vs_sampling"] == pytest.approx(4.0, rel=0.3)
    assert "preference" in json.loads((out / "metrics.json").read_text())  # the pair metrics still run
