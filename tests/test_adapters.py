"""LoRA updates for samplers (`generation/adapters.py`): a LoRA run publishes its adapters, and the
sampler's merge gives exactly the weights peft's `merge_and_unload` gives the trainer."""

import copy

import pytest
import torch

from alignkit.config import LoraConfig
from alignkit.generation.adapters import AdapterBase, AdapterUpdate, adapter_update, base_weights
from alignkit.generation.backends import TransformersBackend
from alignkit.models import apply_lora
from alignkit.testing import tiny_model, tiny_tokenizer


def _lora_policy(seed: int = 0):
    torch.manual_seed(seed)
    base = tiny_model()
    policy = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # trained adapters: B is no longer zero
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return base, policy


def _merged(policy) -> dict:
    return {k: v for k, v in copy.deepcopy(policy).merge_and_unload().state_dict().items()}


def test_the_sampler_merges_adapters_into_what_merge_and_unload_gives(tmp_path):
    base, policy = _lora_policy()
    update = adapter_update(policy)
    linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(update.modules) == sorted(f"{n}.weight" for n in linear)  # all-linear, the base's names
    full = sum(p.numel() for p in base.parameters())
    assert update.numel() == sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules() if n in linear)
    assert update.numel() < full / 4
    update.save(tmp_path)  # the shared-directory transport: safetensors + scaling and fingerprints
    loaded = AdapterUpdate.load(tmp_path)
    assert loaded.fingerprints == update.fingerprints
    sampler = copy.deepcopy(base)
    AdapterBase(sampler).apply(loaded, "test")
    want, got = _merged(policy), sampler.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # bit for bit, also the layers left alone
    # a second update merges into the base, not into the previous merge
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_A" in name:
                p.mul_(-0.5)
    AdapterBase(sampler, base_weights(policy)).apply(adapter_update(policy), "test")
    want = _merged(policy)
    assert all(torch.equal(want[k], sampler.state_dict()[k]) for k in want)


def test_a_sampler_with_another_base_refuses_the_adapters():
    base, policy = _lora_policy()
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(1e-3)  # e.g. started from another checkpoint
    before = other.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    with pytest.raises(
        ValueError, match="base weights the LoRA adapters apply to differ.*model.layers.0.self_attn.q_proj"
    ):
        AdapterBase(other).apply(adapter_update(policy), "sampler test")
    assert torch.equal(other.state_dict()["model.layers.0.self_attn.q_proj.weight"], before)  # untouched


def test_the_copy_of_a_lora_policy_takes_adapters():
    base, policy = _lora_policy()
    backend = TransformersBackend.detached(policy, tiny_tokenizer())
    assert backend.accepts_adapters
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # a training step
    backend.load_state(adapter_update(policy).copy_to_cpu(), 1)
    want = _merged(policy)
    assert all(torch.equal(want[k], backend.model.state_dict()[k]) for k in want)
    assert not TransformersBackend.detached(base, tiny_tokenizer()).accepts_adapters


def test_a_server_reads_the_base_from_its_checkpoint_after_full_updates(tmp_path):
    """`alignkit sample-serve` may have served a full-weight run before: the base of a LoRA update
    comes from the checkpoint it loaded, not from the weights it holds now."""
    base, policy = _lora_policy()
    base.save_pretrained(tmp_path / "base")
    served = copy.deepcopy(base)
    with torch.no_grad():
        for p in served.parameters():
            p.add_(0.01)  # an earlier run's full update
    sampler = AdapterBase(served, checkpoint=str(tmp_path / "base"))
    sampler.took_full_weights()
    sampler.apply(adapter_update(policy), "test")
    want = _merged(policy)
    assert all(torch.equal(want[k], served.state_dict()[k]) for k in want)  # the layers without adapters too
    again = copy.deepcopy(base)
    with torch.no_grad():
        again.model.norm.weight.add_(1.0)
    without = AdapterBase(again)
    without.took_full_weights()
    with pytest.raises(ValueError, match="holds full weights sent before.*restart it"):
        without.apply(adapter_update(policy), "test")
