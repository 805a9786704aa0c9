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
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(chunk)], capture_output=True, text=True,
                         check=True, env=env)
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
