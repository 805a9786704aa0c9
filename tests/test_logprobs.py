"""Module-level parity: our chunked sequence log-probs equal a plain transformers forward."""

import math
from dataclasses import dataclass

import pytest
import torch

from alignkit.data.batching import collate_pairs
from alignkit.data.tokenize import TokenizedPair
from alignkit.logprobs import chunked_token_logps, is_model_distribution, sampling_scores, segment_logps
from alignkit.testing import tiny_model


def _pairs():
    g = torch.Generator().manual_seed(0)
    r = lambda n: torch.randint(4, 100, (n,), generator=g).tolist()
    return [TokenizedPair(r(5), r(3), r(7), 0), TokenizedPair(r(2), r(6), r(1), 1), TokenizedPair(r(9), r(4), r(4), 2)]


def _plain_logps(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids).logits.float(), -1)[0]  # [T, V]
    return sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(completion))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_segment_logps_match_plain_forward(family, chunk):
    model = tiny_model(family, vocab_size=128).eval()
    pairs = _pairs()
    with torch.no_grad():
        out = segment_logps(model, collate_pairs(pairs, pad_id=1), chunk_size=chunk)
        for i, p in enumerate(pairs):
            assert abs(float(out.logps[i]) - _plain_logps(model, p.prompt_ids, p.chosen_ids)) < 1e-5
            assert abs(float(out.logps[3 + i]) - _plain_logps(model, p.prompt_ids, p.rejected_ids)) < 1e-5
    assert out.counts.tolist() == [3, 6, 4, 7, 1, 4]


def test_chunked_gradients_equal_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(13, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    chunked = chunked_token_logps(head, hidden, targets, chunk_size=4)
    g1 = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    g2 = torch.autograd.grad(full.sum(), [hidden, head.weight])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_padding_does_not_change_logps():
    model = tiny_model("llama", vocab_size=128).eval()
    pairs = _pairs()
    with torch.no_grad():
        together = segment_logps(model, collate_pairs(pairs, 1)).logps
        alone = segment_logps(model, collate_pairs(pairs[1:2], 1)).logps
    torch.testing.assert_close(together[[1, 4]], alone, atol=1e-5, rtol=0)


_PEAK_SCRIPT = """
import resource, sys, torch
from alignkit.data.batching import collate_packed_groups
from alignkit.data.tokenize import TokenizedPair
from alignkit.logprobs import segment_logps
from alignkit.testing import tiny_model
torch.set_num_threads(1)
model = tiny_model("llama", vocab_size=65536, hidden=32)
g = torch.Generator().manual_seed(0)
r = lambda n: torch.randint(4, 65536, (n,), generator=g).tolist()
pairs = [TokenizedPair(r(24), r(512), r(512), i) for i in range(2)]  # 2048 scored tokens
batch = collate_packed_groups(pairs, 1, 4096)
segment_logps(model, collate_packed_groups(pairs[:1], 1, 64), 8).logps.sum().backward()  # warm kernels up
model.zero_grad(set_to_none=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
segment_logps(model, batch, int(sys.argv[1])).logps.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def _peak_growth_mib(chunk: int) -> float:
    import os
    import subprocess
    import sys

    # Large blocks straight from mmap, so a freed block leaves the RSS at once: with glibc's
    # adaptive threshold, freed blocks are reused from the heap and the high-water mark depends on
    # fragmentation (a 128-position run measured 0 MiB here and 160 MiB on the CI machine).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(chunk)], capture_output=True, text=True, check=True, env=env
    )
    return float(out.stdout.split()[-1])


def test_logprob_step_peak_memory_is_bounded():
    """Forward + backward of the log-prob step over 2048 scored tokens with a 65,536-token vocabulary.
    Whole [tokens, vocab] float32 logits would be 2048 x 65536 x 4 B = 512 MiB, plus as much for their
    log-softmax and gradient. In chunks of 32 positions (8 MiB of logits each) the step's peak memory
    (process RSS high-water mark, measured in a fresh process) grows by less than 128 MiB (about 60 MiB
    measured); with one chunk for everything it grows by more than 1 GiB (about 2.5 GiB), which shows
    that the measurement sees the logits."""
    chunked, whole = _peak_growth_mib(32), _peak_growth_mib(4096)
    assert whole > 1024, whole
    assert chunked < 128, chunked


# ---------------------------------------------------------------- segment sums without float64 (mps)


def _realistic_token_logps(n: int, seed: int) -> torch.Tensor:
    """[n] float32 log-probs shaped like a trained model's: mostly confident tokens (|log p| < 0.1),
    some uncertain ones, a few very unlikely ones (down to about -25)."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.rand(n, generator=g, dtype=torch.float64)
    confident = -torch.rand(n, generator=g, dtype=torch.float64) * 0.1
    uncertain = -torch.rand(n, generator=g, dtype=torch.float64) * 4
    unlikely = -torch.rand(n, generator=g, dtype=torch.float64) * 25
    return torch.where(kind < 0.7, confident, torch.where(kind < 0.97, uncertain, unlikely)).float()


def _long_segments():
    """Token log-probs [N] of segments from 1 to 20,000 tokens, interleaved in a random order (the
    sum must not rely on a segment's tokens being contiguous), with their segment ids [N]."""
    lengths = [1, 7, 300, 1000, 4096, 20000]
    values = torch.cat([_realistic_token_logps(n, seed=i) for i, n in enumerate(lengths)])
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(0))
    return values[order], segments[order], len(lengths)


def _half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the float32 spacing at each |x|: the error of the float64 sum correctly rounded to float32."""
    x = x.float().abs()
    return (torch.nextafter(x, torch.tensor(float("inf"))) - x).double() / 2


def test_segment_sum_without_float64_is_as_exact_as_float64():
    # The mps path (float64 unsupported there) forced on CPU. The result is float32, so the best any
    # method can do is the exact sum rounded to float32: we ask for that within half an ulp (plus
    # 1e-9 for the float64 reference's own round-off), i.e. as exact as the float64 path.
    from alignkit.logprobs import sum_by_segment

    values, segments, n = _long_segments()
    exact = torch.zeros(n, dtype=torch.float64).index_add(0, segments, values.double())
    got = sum_by_segment(values, segments, n, float64=False)
    assert got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= _half_ulp(exact) + 1e-9).all(), (got.double() - exact).tolist()
    assert torch.equal(got, sum_by_segment(values, segments, n, float64=True))
    # The test can tell: a plain float32 index_add over the same tokens is off by far more.
    naive = torch.zeros(n).index_add(0, segments, values)
    assert (naive.double() - exact).abs().max() > 50 * _half_ulp(exact).max()


def test_segment_sum_without_float64_keeps_non_finite_values_and_empty_segments():
    from alignkit.logprobs import sum_by_segment

    values = torch.tensor([-1.5, float("-inf"), -0.25, float("nan"), -2.0, 0.0])
    segments = torch.tensor([0, 1, 1, 2, 0, 4])
    got = sum_by_segment(values, segments, 5, float64=False)
    assert got[0] == -3.5 and got[1] == float("-inf") and got[2].isnan() and got[3] == 0 and got[4] == 0


def test_segment_logps_on_a_device_without_float64_match_and_carry_gradients(monkeypatch):
    """segment_logps with the no-float64 path forced on CPU: no float64 tensor is made, forward or
    backward, and the sums and the gradients equal those of the float64 path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import alignkit.logprobs as lp

    class Float64Spy(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.seen.append(func)
            return out

    model = tiny_model("llama", vocab_size=128)
    batch = collate_pairs(_pairs(), pad_id=1)

    def run():
        model.zero_grad(set_to_none=True)
        out = segment_logps(model, batch, chunk_size=4).logps
        (out * torch.arange(1.0, 7.0)).sum().backward()  # a distinct weight per segment
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    reference, ref_grads = run()
    monkeypatch.setattr(lp, "FLOAT64_UNSUPPORTED_DEVICES", frozenset({"mps", "cpu"}))
    with Float64Spy() as spy:
        forced, grads = run()
    assert spy.seen == []
    torch.testing.assert_close(forced, reference, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the sampling distribution: temperature, top-k, top-p (issue 28) ----------------------------------


@dataclass
class Settings:  # an `alignkit.logprobs.SamplingSettings`
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    banned: tuple = ()


def _f64_sampling_logps(row: list, temperature: float, top_k: int, top_p: float) -> dict:
    """{token: log-prob} over the tokens the sampling distribution keeps, in float64, written out
    from the definition: scale by 1 / temperature, keep the top_k highest, then walk them most
    likely first and keep each while the mass before it is below top_p; renormalise."""
    z = [x / temperature for x in row]
    top = sorted(range(len(z)), key=lambda i: -z[i])[: top_k or len(z)]
    w = {i: math.exp(z[i] - z[top[0]]) for i in top}
    total, before, kept = sum(w.values()), 0.0, []
    for i in top:
        if before >= top_p:
            break
        kept.append(i)
        before += w[i] / total
    norm = sum(w[i] for i in kept)
    return {i: math.log(w[i] / norm) for i in kept}


ROW = [0.5, 2.0, -3.0, 1.0, 0.0, 1.5, -1.0]


def test_sampling_scores_equal_the_definition_in_float64():
    """Temperature 0.7, top-k 5, top-p 0.9 on one row. By hand: top-5 drops the logits -3 and -1
    (tokens 2, 6); at temperature 0.7 the other five have probabilities 0.525, 0.257, 0.126, 0.062,
    0.030 (logits 2, 1.5, 1, 0.5, 0), so the mass before the fourth, 0.908, reaches 0.9: the
    nucleus is tokens 1, 5, 3, with log-probs -0.5477, -1.2619, -1.9762 renormalised over them."""
    s = Settings(temperature=0.7, top_p=0.9, top_k=5)
    expected = _f64_sampling_logps(ROW, 0.7, 5, 0.9)
    assert sorted(expected) == [1, 3, 5]
    assert [round(expected[i], 4) for i in (1, 5, 3)] == [-0.5477, -1.2619, -1.9762]
    x = sampling_scores(torch.tensor([ROW]), s)[0]
    assert torch.isinf(x[[0, 2, 4, 6]]).all() and torch.isfinite(x[[1, 3, 5]]).all()
    # the trainer's path: an identity head turns each hidden row into the logits
    targets = torch.tensor([1, 5, 3])
    hidden = torch.tensor([ROW] * 3)
    lp, ent = chunked_token_logps(torch.nn.Identity(), hidden, targets, chunk_size=2, entropy=True, sampling=s)
    for got, t in zip(lp.tolist(), targets.tolist()):
        assert abs(got - expected[t]) < 1e-6  # float32 against float64
    entropy = -sum(math.exp(v) * v for v in expected.values())  # of the renormalised nucleus
    assert ent.tolist() == pytest.approx([entropy] * 3, abs=1e-6)
    # each rule alone, and the first token always kept
    for t, k, p in ((1.0, 2, 1.0), (1.0, 0, 0.7), (2.0, 0, 0.95), (0.5, 3, 0.01)):
        ref = _f64_sampling_logps(ROW, t, k, p)
        x = sampling_scores(torch.tensor([ROW]), Settings(t, p, k))[0]
        got = (x - torch.logsumexp(x, -1)).tolist()
        assert sorted(i for i, v in enumerate(got) if math.isfinite(v)) == sorted(ref)
        assert all(abs(got[i] - v) < 1e-6 for i, v in ref.items())
    assert sorted(_f64_sampling_logps(ROW, 0.5, 3, 0.01)) == [1]


def test_banned_tokens_leave_the_distribution_before_top_k():
    """A vision-language model's image-layout tokens are banned (vLLM: by logit bias, before
    top-k). By hand, ROW with token 1 (logit 2.0) banned and top-k 2: tokens 5 and 3 (logits 1.5,
    1.0) remain, log-probs -log(1 + e^-0.5) = -0.4741 and -0.9741. Greedy with the ban keeps every
    other token at its logit (the greedy pick is token 5), and neither is the model's distribution."""
    x = sampling_scores(torch.tensor([ROW]), Settings(1.0, top_k=2, banned=(1,)))[0]
    got = (x - torch.logsumexp(x, -1)).tolist()
    assert [i for i, v in enumerate(got) if math.isfinite(v)] == [3, 5]
    assert round(got[5], 4) == -0.4741 and round(got[3], 4) == -0.9741
    g = sampling_scores(torch.tensor([ROW]), Settings(0.0, top_p=0.5, top_k=1, banned=(1,)))[0]
    assert torch.isinf(g[1]) and torch.equal(g[[0, 2, 3, 4, 5, 6]], torch.tensor(ROW)[[0, 2, 3, 4, 5, 6]])
    assert int(g.argmax()) == 5
    assert not is_model_distribution(Settings(1.0, banned=(1,))) and not is_model_distribution(
        Settings(0.0, banned=(1,))
    )
    assert is_model_distribution(Settings(0.0, top_k=3)) and is_model_distribution(None)


def test_a_scored_token_outside_the_set_stays_finite():
    """The trainer keeps the scored token in the set (`keep`): where the sampler's set had it but
    the trainer's logits put it just outside, its log-prob is renormalised over the set plus it, not -inf."""
    s = Settings(temperature=0.7, top_p=0.9, top_k=5)
    lp = chunked_token_logps(torch.nn.Identity(), torch.tensor([ROW]), torch.tensor([0]), chunk_size=4, sampling=s)
    z = {i: ROW[i] / 0.7 for i in (1, 5, 3, 0)}
    expected = z[0] - math.log(sum(math.exp(v) for v in z.values()))
    assert abs(float(lp[0]) - expected) < 1e-6


def test_sampling_settings_of_the_model_distribution_change_nothing():
    """Temperature 1 without top-k / top-p, and greedy (temperature 0 reads the model's own
    distribution, as vLLM does): the trainer's log-probs and entropies are bit for bit those of a
    call without settings, so default online runs are unchanged."""
    model = tiny_model("llama", vocab_size=128).eval()
    batch = collate_pairs(_pairs(), pad_id=1)
    with torch.no_grad():
        plain = segment_logps(model, batch, chunk_size=4, entropy=True)
        for s in (Settings(1.0), Settings(0.0, top_p=0.9, top_k=20), Settings(1.0, top_k=128)):
            out = segment_logps(model, batch, chunk_size=4, entropy=True, sampling=s)
            assert torch.equal(out.token_logps, plain.token_logps) and torch.equal(out.logps, plain.logps)
            assert torch.equal(out.token_entropy, plain.token_entropy)
        other = segment_logps(model, batch, chunk_size=4, sampling=Settings(0.7, top_p=0.9, top_k=20))
    assert (other.token_logps - plain.token_logps).abs().min() > 0.1  # a transform that ran


def test_chunked_gradients_equal_unchunked_under_a_sampling_distribution():
    torch.manual_seed(0)
    s = Settings(temperature=0.8, top_p=0.9, top_k=20)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(13, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))  # some outside the set: kept, with a gradient
    chunked = chunked_token_logps(head, hidden, targets, chunk_size=4, sampling=s)  # checkpointed chunks
    g1 = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    x = sampling_scores(head(hidden), s, keep=targets)
    full = x.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(x, -1)
    g2 = torch.autograd.grad(full.sum(), [hidden, head.weight])
    torch.testing.assert_close(chunked, full)
    assert torch.isfinite(chunked).all()
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
