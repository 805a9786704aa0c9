"""The sampling loop: greedy equals transformers' generate, recorded log-probs equal a full
forward, top-k / top-p / temperature give the intended distributions, stops and seeds work."""

import pytest
import torch

from alignkit.data.batching import collate_packed_groups
from alignkit.data.negative import TokenizedGroup
from alignkit.generation.decode import SamplingParams, pick_tokens, sample
from alignkit.logprobs import in_segment_order, segment_logps
from alignkit.testing import tiny_model

PROMPTS = [[5, 9, 14, 3 + 20], [7], [11, 12, 13, 40, 41, 42, 43]]


def test_greedy_equals_transformers_generate():
    model = tiny_model("llama", vocab_size=64).eval()
    ours = sample(model, PROMPTS, SamplingParams(max_new_tokens=6), eos_ids=[3], pad_id=1)
    for prompt, (s,) in zip(PROMPTS, ours):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=3)
        assert s.token_ids == ref[0, len(prompt) :].tolist()
        assert s.finish_reason == ("stop" if s.token_ids[-1] == 3 else "length")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_recorded_logprobs_equal_a_full_forward(family):
    """The generator's log-probs (KV cache, left padding, shared prefill over n samples) equal the
    log-softmax of one plain forward over prompt + completion: the trainer/generator agreement."""
    model = tiny_model(family, vocab_size=64).eval()
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, n=3)
    out = sample(model, PROMPTS, params, eos_ids=[2], pad_id=1, seed=3)
    for prompt, group in zip(PROMPTS, out):
        assert len(group) == 3
        for s in group:
            ids = torch.tensor([prompt + s.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            full = [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(s.token_ids)]
            assert s.logprobs == pytest.approx(full, abs=1e-5)
            assert (s.finish_reason == "stop") == (s.token_ids[-1] == 2)
            assert 2 not in s.token_ids[:-1]  # nothing after the end of sequence


def test_pick_tokens_distributions():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(40000, 3).contiguous()
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        toks = pick_tokens(logits, SamplingParams(**kw), g)
        return torch.bincount(toks, minlength=3).float() / len(toks)

    assert torch.allclose(freq(temperature=1.0), torch.tensor([0.5, 0.3, 0.2]), atol=0.01)
    # top-p 0.7: the nucleus is {0, 1} (0.5 < 0.7, 0.5 + 0.3 reaches it), renormalised 0.625 / 0.375
    assert torch.allclose(freq(temperature=1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0.0]), atol=0.01)
    assert torch.allclose(freq(temperature=1.0, top_k=2), torch.tensor([0.625, 0.375, 0.0]), atol=0.01)
    # temperature 0.5 squares the odds: 0.25 : 0.09 : 0.04 over 0.38
    assert torch.allclose(freq(temperature=0.5), torch.tensor([0.25, 0.09, 0.04]) / 0.38, atol=0.01)
    assert freq(temperature=0.0)[0] == 1.0 and freq(temperature=1.0, top_p=0.01)[0] == 1.0


def test_stop_strings_and_seeds():
    from alignkit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok)).eval()
    prompts = [tok("what is 2 plus 3 ?")["input_ids"]] * 2
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4)
    a = sample(model, prompts, params, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=7, tokenizer=tok)
    b = sample(model, prompts, params, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=7, tokenizer=tok)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    words = [w for g in a for s in g for w in s.text.split()]
    stop = max(set(words), key=words.count)  # a word some samples produce
    stopped = sample(
        model,
        prompts,
        SamplingParams(max_new_tokens=12, temperature=1.0, n=4, stop=(stop,)),
        eos_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        seed=7,
        tokenizer=tok,
    )
    hits = [s for g in stopped for s in g if stop in s.text]
    assert hits and all(s.finish_reason == "stop" and s.text.endswith(stop) for s in hits)


def test_prompt_prefill_runs_once_for_its_n_samples():
    model = tiny_model("llama", vocab_size=64).eval()
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    sample(model, PROMPTS, SamplingParams(max_new_tokens=3, temperature=1.0, n=4), eos_ids=[], pad_id=1)
    hook.remove()
    assert shapes[0] == (3, 7)  # 3 prompts, left-padded to 7 tokens, once
    assert shapes[1:] == [(12, 1), (12, 1)]  # then 3 x 4 samples, one token per step


def test_prompt_seeds_make_samples_independent_of_the_batch():
    """With a seed per prompt, a prompt's samples are the same whether it is sampled alone, with
    other prompts, or in another batch order: a run split over processes samples what one would."""
    model = tiny_model("llama", vocab_size=64).eval()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=3)
    seeds = [101, 202, 303]
    together = sample(model, PROMPTS, params, eos_ids=[2], pad_id=1, prompt_seeds=seeds, batch_size=3)
    for i, prompt in enumerate(PROMPTS):
        alone = sample(model, [prompt], params, eos_ids=[2], pad_id=1, prompt_seeds=[seeds[i]])
        assert [s.token_ids for s in alone[0]] == [s.token_ids for s in together[i]]
    reordered = sample(model, PROMPTS[::-1], params, eos_ids=[2], pad_id=1, prompt_seeds=seeds[::-1], batch_size=2)
    assert [[s.token_ids for s in g] for g in reordered[::-1]] == [[s.token_ids for s in g] for g in together]
    assert len({tuple(s.token_ids) for s in together[1]}) > 1  # the n samples of a prompt differ


def test_per_row_sampling_follows_the_distribution():
    """Inverse-CDF sampling with one generator per row draws each token with its probability."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = torch.cat([pick_tokens(logits, SamplingParams(temperature=1.0), [g]) for g in gens])
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    # 4000 draws: a frequency's standard error is at most sqrt(0.25 / 4000) = 0.008; 0.03 is > 3.5 of them
    assert freq.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.03)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_processed_logprobs_are_the_ones_the_trainer_scores(family):
    """Online training's sampler/trainer agreement under temperature 0.7, top-p 0.9, top-k 20
    (issue 28): the sampler's processed log-probs (the distribution each token was drawn from)
    equal the trainer's `segment_logps(..., sampling=params)` on the packed, prefix-shared batch
    `OnlineRecipe.batches` builds, within 1e-4 per token (float32 on CPU; measured ~1e-6), and
    differ from the raw ones (a transform missing on either side would show)."""
    model = tiny_model(family, vocab_size=128).eval()
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, n=3, logprobs="processed")
    out = sample(model, PROMPTS, params, eos_ids=[2], pad_id=1, prompt_seeds=[7, 8, 9])
    raw = sample(model, PROMPTS, params.but(logprobs="raw"), eos_ids=[2], pad_id=1, prompt_seeds=[7, 8, 9])
    assert [[s.token_ids for s in g] for g in raw] == [[s.token_ids for s in g] for g in out]  # same draws
    groups = [TokenizedGroup(p, [s.token_ids for s in g], i) for i, (p, g) in enumerate(zip(PROMPTS, out))]
    batch = collate_packed_groups(groups, pad_id=1, capacity=48)
    # segment of sample k of prompt j is k * P + j, as in `OnlineRecipe.batches`
    order = [(j, k) for k in range(params.n) for j in range(len(PROMPTS))]
    sampler = torch.tensor([lp for j, k in order for lp in out[j][k].logprobs])
    raw_lps = torch.tensor([lp for j, k in order for lp in raw[j][k].logprobs])
    with torch.no_grad():
        trainer = in_segment_order(segment_logps(model, batch, chunk_size=5, sampling=params))[0]
        trainer_raw = in_segment_order(segment_logps(model, batch, chunk_size=5))[0]
    assert trainer.shape == sampler.shape and len(sampler) > 50
    assert (trainer - sampler).abs().max() < 1e-4
    assert (trainer_raw - raw_lps).abs().max() < 1e-4
    assert (sampler - raw_lps).abs().min() > 0.1  # processed is not raw: every token's differs


def test_processed_greedy_logprobs_are_the_raw_ones():
    """Greedy reads the model's own distribution (as vLLM does for a greedy request)."""
    model = tiny_model("llama", vocab_size=64).eval()
    greedy = SamplingParams(max_new_tokens=6, top_p=0.5, top_k=3)
    a = sample(model, PROMPTS, greedy, eos_ids=[2], pad_id=1)
    b = sample(model, PROMPTS, greedy.but(logprobs="processed"), eos_ids=[2], pad_id=1)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]
    for x, y in zip(a, b):
        assert y[0].logprobs == pytest.approx(x[0].logprobs, abs=1e-6)
    with pytest.raises(ValueError, match="logprobs must be one of raw, processed"):
        SamplingParams(logprobs="sampled")
