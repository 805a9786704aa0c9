"""Prefix sharing and packing give the same log-probs as plain padded rows (float32, CPU, 1e-5),
for Llama- and Qwen2-style models, with masks, groups and SFT, under SDPA and eager attention."""

import pytest
import torch

from alignkit.data.batching import collate_groups, collate_packed_groups, collate_packed_sft, collate_pairs, collate_sft
from alignkit.data.negative import TokenizedGroup
from alignkit.data.tokenize import TokenizedPair, TokenizedSFT
from alignkit.logprobs import segment_logps
from alignkit.testing import tiny_model


def _rand(g, n):
    return torch.randint(4, 100, (n,), generator=g).tolist()


def _pairs(masked=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (p, c, r) in enumerate([(5, 3, 7), (2, 6, 1), (9, 4, 4), (1, 1, 2), (12, 8, 3)]):
        chosen, rejected = _rand(g, c), _rand(g, r)
        masks = ([j % 2 == 0 for j in range(c)], [j != 0 for j in range(r)]) if masked else (None, None)
        out.append(TokenizedPair(_rand(g, p), chosen, rejected, i, chosen_mask=masks[0], rejected_mask=masks[1]))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("capacity", [1, 24, 4096])  # one pair per row, a few per row, all in one row
@pytest.mark.parametrize("masked", [False, True])
def test_packed_prefix_shared_pairs_equal_padded(family, attn, capacity, masked):
    model = tiny_model(family, vocab_size=128).eval()
    model.config._attn_implementation = attn
    pairs = _pairs(masked)
    with torch.no_grad():
        plain = segment_logps(model, collate_pairs(pairs, pad_id=1))
        packed_batch = collate_packed_groups(pairs, pad_id=1, capacity=capacity)
        packed = segment_logps(model, packed_batch)
    assert torch.allclose(packed.logps, plain.logps, atol=1e-5, rtol=0)
    assert torch.equal(packed.counts, plain.counts)
    # Each prompt appears once: the packed batch holds fewer tokens than the padded one.
    assert packed_batch.num_tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    if capacity == 4096:
        assert packed_batch.input_ids.shape[0] == 1
    # Throughput counts the sequences as written out one by one, whatever the layout.
    assert packed_batch.num_sequence_tokens == collate_pairs(pairs, pad_id=1).num_tokens


def test_packed_groups_and_sft_equal_padded():
    model = tiny_model("llama", vocab_size=128).eval()
    g = torch.Generator().manual_seed(1)
    groups = [
        TokenizedGroup(_rand(g, 4), [_rand(g, 3), _rand(g, 5), _rand(g, 2)], 0),
        TokenizedGroup(_rand(g, 6), [_rand(g, 1), _rand(g, 4), _rand(g, 6)], 1),
    ]
    sft = [
        TokenizedSFT(_rand(g, 3), _rand(g, 5), 0),
        TokenizedSFT([], _rand(g, 4), 1),
        TokenizedSFT(_rand(g, 7), _rand(g, 2), 2),
    ]
    with torch.no_grad():
        for plain, packed in (
            (collate_groups(groups, 1), collate_packed_groups(groups, 1, 64)),
            (collate_sft(sft, 1), collate_packed_sft(sft, 1, 64)),
        ):
            a, b = segment_logps(model, plain), segment_logps(model, packed)
            assert torch.allclose(a.logps, b.logps, atol=1e-5, rtol=0) and torch.equal(a.counts, b.counts)


def test_packed_gradients_equal_padded():
    model = tiny_model("qwen2", vocab_size=128)
    pairs = _pairs()
    grads = []
    for batch in (collate_pairs(pairs, 1), collate_packed_groups(pairs, 1, 32)):
        model.zero_grad()
        segment_logps(model, batch).logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_rejected_cannot_see_chosen():
    """Changing a chosen token must not move any rejected log-prob in the shared layout."""
    model = tiny_model("llama", vocab_size=128).eval()
    pairs = _pairs()
    other = [TokenizedPair(p.prompt_ids, [5] * len(p.chosen_ids), p.rejected_ids, p.index) for p in pairs]
    with torch.no_grad():
        a = segment_logps(model, collate_packed_groups(pairs, 1, 4096)).logps
        b = segment_logps(model, collate_packed_groups(other, 1, 4096)).logps
    n = len(pairs)
    assert torch.allclose(a[n:], b[n:], atol=1e-6) and not torch.allclose(a[:n], b[:n])


def _tiny_classifier(family: str, num_labels: int = 2):
    from transformers import AutoModelForSequenceClassification

    base = tiny_model(family, vocab_size=128)
    cfg = base.config
    cfg.num_labels = num_labels
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("capacity", [1, 24, 4096])
def test_packed_reward_model_equals_transformers_classifier(family, capacity):
    """Packed, prefix-shared reward batches score each completion as transformers' own classifier
    does on padded rows, including completions that end in (or consist of) pad-id tokens (SmolLM2's
    pad is its end-of-turn token, so this is the common case)."""
    from alignkit.heads import sequence_rewards

    model = _tiny_classifier(family).eval()
    pairs = _pairs()
    pairs[0].chosen_ids[-1] = 1  # ends with the pad id
    pairs[3].rejected_ids[:] = [1, 1]  # nothing but pad ids: pools the prompt's last token
    with torch.no_grad():
        plain = sequence_rewards(model, collate_pairs(pairs, pad_id=1), pad_id=1)
        packed = sequence_rewards(model, collate_packed_groups(pairs, pad_id=1, capacity=capacity), pad_id=1)
    assert plain.shape == packed.shape == (10, 2)
    assert torch.allclose(packed, plain, atol=1e-5, rtol=0)


def test_packed_reward_gradients_equal_padded():
    from alignkit.heads import sequence_rewards

    model = _tiny_classifier("llama", num_labels=1)
    pairs = _pairs()
    grads = []
    for batch in (collate_pairs(pairs, 1), collate_packed_groups(pairs, 1, 32)):
        model.zero_grad()
        r = sequence_rewards(model, batch, pad_id=1)[:, 0]
        torch.nn.functional.logsigmoid(r[:5] - r[5:]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
