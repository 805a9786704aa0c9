"""Module-level parity: our chunked sequence log-probs equal a plain transformers forward."""

import pytest
import torch

from alignkit.data.batching import collate_pairs
from alignkit.data.tokenize import TokenizedPair
from alignkit.logprobs import chunked_token_logps, segment_logps
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
