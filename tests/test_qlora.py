"""QLoRA (`model.quantization`): the frozen base in torchao's NF4 (or int8), LoRA adapters trained
on it, checkpoints of adapters only, `final/` merged into the dequantized base. The 2-process parity
and the SIGKILL resume are in test_distributed.py and test_faults.py (`dpo_qlora`, `grpo_qlora`)."""

import math

import pytest
import torch
from conftest import base_overrides, write_jsonl
from safetensors.torch import load_file

from alignkit.config import LoraConfig, load_config
from alignkit.errors import ConfigError
from alignkit.models import apply_lora, transformer_blocks
from alignkit.quantization import describe, quantizable, quantize_base, scaler_block
from alignkit.testing import save_tiny_model_dir, tiny_model
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

tq = pytest.importorskip("torchao.quantization", reason="QLoRA needs torchao (pip install 'alignkit[qlora]')")

# NF4's 16 levels (QLoRA, arXiv 2305.14314, Appendix E): quantiles of N(0, 1) scaled to [-1, 1]
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


@pytest.fixture(scope="module")
def model64_dir(tmp_path_factory):
    """A tiny model whose block linears hold whole NF4 blocks at every width (hidden 64)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny64") / "llama", hidden=64)


@pytest.fixture
def pairs64(tmp_path):
    from conftest import toy_pairs

    return write_jsonl(tmp_path / "pairs.jsonl", toy_pairs())


def _bases(model) -> dict:
    """{name: linear layer} of the base layers peft wrapped (their names before the wrap)."""
    found = quantizable(transformer_blocks(model))
    return {n.removesuffix(".base_layer"): m for n, m in found if n.endswith(".base_layer")}


def _cfg(model_dir, data, tmp_path, *extra, out="run"):
    return load_config(
        None,
        base_overrides(model_dir, data, tmp_path / out, tmp_path / "cache")
        + [
            "train.learning_rate=2e-2",
            "train.batch_size=4",
            "train.warmup_ratio=0",
            "data.eval_fraction=0.1",
            "lora.enabled=true",
            "lora.r=4",
            "model.quantization=nf4",
            *extra,
        ],
    )


def test_scaler_blocks_split_evenly_at_every_scale():
    assert scaler_block(5184) == 8  # SmolLM2's 576x576: 5,184 absmax values; 648 per eighth
    assert scaler_block(13824) == 64  # its 576x1536 MLP projections
    assert scaler_block(4096 * 4096 // 64) == 256  # an 8B model's 4096x4096: the paper's block
    assert scaler_block(16, 2) == 2 and scaler_block(7, 2) == 0
    for n in (5184, 13824, 1728):
        block = scaler_block(n)
        assert all(n % (p * block) == 0 for p in (1, 2, 4, 8))


def test_nf4_base_is_torchaos_4bit_double_quantized_weight():
    model = tiny_model(hidden=64, seed=3)
    before = {name: layer.weight.detach().clone() for name, layer in quantizable(transformer_blocks(model))}
    head, embed = model.lm_head.weight.detach().clone(), model.get_input_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4), "nf4")
    layers = _bases(peft_model.get_base_model())
    assert set(layers) == set(before) and len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    for name, layer in layers.items():
        w, w0 = layer.weight, before[name]
        assert isinstance(w, tq.NF4Tensor) and not w.requires_grad
        assert w.quantized_data.dtype == torch.uint8 and w.quantized_data.numel() == w0.numel() // 2  # 4 bits
        assert w.quantized_scalers.dtype == torch.int8  # double quantization: the absmax values in int8
        block = scaler_block(w0.numel() // 64)
        reference = tq.to_nf4(w0, 64, block).get_original_weight()  # torchao's own round trip
        deq = w.get_original_weight()
        assert torch.equal(deq, reference)
        # independently: each block of 64 is one scale times NF4 levels; the error is within half
        # the widest gap between levels (0.28) of the block's absmax, plus the scale's int8 error
        blocks, orig = deq.reshape(-1, 64), w0.reshape(-1, 64)
        absmax = orig.abs().amax(dim=1, keepdim=True)
        scale = blocks.abs().amax(dim=1, keepdim=True)
        levels = blocks / scale
        # 1e-4: torchao multiplies its level table by the double-quantized scale in float32 and
        # dividing by the block's largest value does not undo that rounding exactly
        assert (levels[..., None] - NF4_LEVELS).abs().amin(-1).max() < 1e-4
        assert ((blocks - orig).abs() / absmax).max() < 0.16
    lm = peft_model.get_base_model()
    assert torch.equal(lm.lm_head.weight, head) and torch.equal(lm.get_input_embeddings().weight, embed)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_the_report_says_how_far_quantization_moved_the_base(scheme):
    """`quantization_report`: the relative Frobenius error of the base the adapters train on, over
    every quantized layer together, as torchao's own dequantization gives it; the note a run prints
    says it, and for NF4 on a small model what that cost SmolLM2-135M."""
    model = tiny_model(hidden=64, seed=3)
    before = {name: layer.weight.detach().clone() for name, layer in quantizable(transformer_blocks(model))}
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4), scheme)
    report = peft_model.quantization_report
    lost = norm = 0.0
    for name, layer in _bases(peft_model.get_base_model()).items():
        w = layer.weight
        deq = w.get_original_weight() if scheme == "nf4" else w.dequantize()
        lost += float((deq.double() - before[name].double()).pow(2).sum())
        norm += float(before[name].double().pow(2).sum())
    assert report["relative_error"] == pytest.approx(math.sqrt(lost / norm), rel=1e-9)
    assert report["quantized"] == 14 and report["kept"] == []
    assert report["weights"] == sum(w.numel() for w in before.values())
    # NF4's 16 levels against int8's 256: about 10x the error (SmolLM2-135M: 9.35% and 0.85%)
    assert (0.05 < report["relative_error"] < 0.15) if scheme == "nf4" else (report["relative_error"] < 0.01)
    note = describe(report)
    assert f"{report['relative_error']:.2%} from the model's own weights" in note
    assert ("docs/fitting.md#qlora" in note) == (scheme == "nf4")  # the small-model warning is NF4's


def test_a_base_rounded_to_4_bits_before_is_recognised():
    """Weights that gguf's own Q4_1 rounded (as the bundled SmolLM2's were) and then de-quantized hold at
    most 16 distinct values in every block of 32, and the run's note says NF4 rounds them again;
    plain float weights, Q8_0's and a model that only some such layers are not taken for one."""
    gguf = pytest.importorskip("gguf")
    from alignkit.quantization import few_valued_blocks

    def rounded(w: torch.Tensor, kind) -> torch.Tensor:
        x = w.detach().numpy()
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind).copy())

    q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    assert few_valued_blocks(rounded(w, q4_1)) == (192, 192) and few_valued_blocks(w) == (0, 192)
    assert few_valued_blocks(rounded(w, q8_0)) == (0, 192) and few_valued_blocks(w, limit=5) == (0, 5)
    assert few_valued_blocks(torch.zeros(3, 7)) == (0, 0)  # no whole blocks of 32
    nf4 = tq.to_nf4(w, 64, 8).get_original_weight()  # a de-quantized NF4 checkpoint's weights
    assert few_valued_blocks(nf4) == (192, 192)

    def model_rounded(share_of_layers: float) -> dict:
        model = tiny_model(hidden=64, seed=3)
        layers = quantizable(transformer_blocks(model))
        for _, layer in layers[: round(share_of_layers * len(layers))]:
            layer.weight.data.copy_(rounded(layer.weight, q4_1))
        return quantize_base(layers, "nf4")

    report = model_rounded(1.0)
    assert report["rounded_before"] == 1.0
    assert "This base was rounded to 4 bits before: 100% of the 32-weight blocks looked at hold at most 16" in describe(
        report
    )
    assert "rounded to 4 bits before" not in describe({**report, "scheme": "int8"})  # int8 loses 0.9% of it
    for share in (0.0, 0.5):
        report = model_rounded(share)
        assert report["rounded_before"] < 0.9 and "rounded to 4 bits before" not in describe(report)


def test_layers_that_do_not_split_into_blocks_are_named():
    """A weight whose size is not a multiple of NF4's block of 64 keeps its float weight, and the
    run's note names it, so no layer stays unquantized unseen."""
    torch.manual_seed(0)
    layers = [("0.q", torch.nn.Linear(64, 64)), ("0.odd", torch.nn.Linear(36, 36)), ("1.q", torch.nn.Linear(64, 64))]
    report = quantize_base(layers, "nf4")
    assert report["quantized"] == 2 and report["kept"] == ["0.odd"] and report["weights"] == 2 * 64 * 64
    assert isinstance(layers[0][1].weight, tq.NF4Tensor) and type(layers[1][1].weight) is torch.nn.Parameter
    assert "1 kept in the compute dtype (their weights do not split into whole blocks of 64" in describe(report)
    assert describe(report).endswith(
        ": 0.odd. At this size NF4 costs quality before any training: SmolLM2-135M's "
        "NF4 base is 9.4% from its weights and lost most of the demo's score, its int8 base 0.9% and kept most of it "
        "(docs/fitting.md#qlora)."
    )


def test_int8_base_is_torchaos_int8_weight():
    model = tiny_model(hidden=64, seed=3)
    before = {name: layer.weight.detach().clone() for name, layer in quantizable(transformer_blocks(model))}
    wrapped = apply_lora(model, LoraConfig(enabled=True, r=4), "int8")
    for name, layer in _bases(wrapped.get_base_model()).items():
        w = layer.weight
        assert type(w).__name__ == "Int8Tensor"
        per_row = before[name].abs().amax(dim=1, keepdim=True)
        assert ((w.dequantize() - before[name]).abs() / per_row).max() <= 0.5 / 127 + 1e-6  # half an int8 step


def test_an_int8_layer_keeps_no_float_copy_of_its_weight_for_the_backward():
    """torchao's int8 linear saved each layer's dequantized float weight for the backward, so a
    training step held the base in float again; the backward now dequantizes it again: nothing the
    size of the weight is saved, and output and gradients are those of the dequantized weight."""
    from alignkit.quantization import dequantized, quantize_base

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    quantize_base([("l", layer)], "int8")
    w = dequantized(layer.weight, torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved: list = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert all(n < w.numel() for n in saved), saved
    x2, b2 = x.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x2, w, b2)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(layer.bias.grad, b2.grad, atol=1e-5)


def test_qlora_needs_lora():
    with pytest.raises(ConfigError, match="lora.enabled=true"):
        load_config(None, ["model.quantization=nf4", "data.train=x.jsonl"])


def test_qlora_dpo_trains_adapters_and_exports_a_merged_model(model64_dir, pairs64, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignkit.cli import main

    capsys.readouterr()
    result = loop.train(_cfg(model64_dir, pairs64, tmp_path, "train.max_steps=6"), progress=False)
    printed = capsys.readouterr().out
    rows = read_metrics(result.run_dir, "train")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # adapters start at zero
    assert rows[-1]["rewards/margins"] > 0.2 and rows[-1]["loss"] < rows[0]["loss"] - 0.1
    ckpt = result.run_dir / "checkpoint-6"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    # final/: the dequantized NF4 base plus B @ A * alpha / r, in float32, loadable by transformers
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert next(final.parameters()).dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(model64_dir)
    adapters = load_file(str(ckpt / "adapter_model.safetensors"))
    fs, bs = final.state_dict(), base.state_dict()
    lost = norm = 0.0
    for name, layer in quantizable(transformer_blocks(base)):
        key = f"model.layers.{name}.weight"
        deq = tq.to_nf4(layer.weight.detach(), 64, scaler_block(layer.weight.numel() // 64)).get_original_weight()
        prefix = f"base_model.model.model.layers.{name}"
        delta = adapters[f"{prefix}.lora_B.weight"] @ adapters[f"{prefix}.lora_A.weight"] * (32 / 4)
        assert (fs[key] - (deq + delta)).abs().max() < 1e-6, key
        w = layer.weight.detach()
        lost, norm = lost + float((deq - w).pow(2).sum()), norm + float(w.pow(2).sum())
    assert torch.equal(fs["model.embed_tokens.weight"], bs["model.embed_tokens.weight"])
    # the run says how far its base is from the model's weights, and the model card says it too
    moved = f"{math.sqrt(lost / norm):.2%}"
    assert "model.quantization=nf4: 14 linear layers of the transformer blocks hold a frozen" in printed
    assert f"base, {moved} from the model's own weights" in printed, printed
    card = (result.final_dir / "README.md").read_text()
    assert "QLoRA: trained on the base quantized to `nf4`" in card
    assert f"differ from the base model's by {moved} (relative error)" in card, card
    # --adapters-only: a PEFT directory that loads on the base and gives the same adapters
    out = tmp_path / "adapters"
    assert main(["export", str(ckpt), str(out), "--adapters-only"]) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model64_dir), out)
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(adapters) == 2 * 7 * 2
    for k, v in adapters.items():
        assert torch.equal(loaded[k.replace(".weight", ".default.weight")], v), k
    plain = loop.train(
        load_config(
            None,
            base_overrides(model64_dir, pairs64, tmp_path / "plain", tmp_path / "cache")
            + ["train.max_steps=1", "train.batch_size=4"],
        ),
        progress=False,
    )
    capsys.readouterr()
    assert main(["export", str(plain.run_dir / "checkpoint-1"), str(tmp_path / "x"), "--adapters-only"]) != 0
    assert "trained in full (no LoRA adapters); export it without --adapters-only" in capsys.readouterr().err


def test_qlora_reference_is_its_own_and_checkpointing_changes_nothing(model64_dir, pairs64, tmp_path):
    """The cached reference of a QLoRA run is the quantized base's (not a LoRA run's cache), and
    gradient checkpointing recomputes the same numbers."""
    from alignkit.train.session import initial_fingerprint

    qlora = _cfg(model64_dir, pairs64, tmp_path, "train.max_steps=3")
    lora = load_config(None, [f"model.name_or_path={model64_dir}", "lora.enabled=true", f"data.train={pairs64}"])
    assert initial_fingerprint(qlora) != initial_fingerprint(lora)
    a = loop.train(qlora, progress=False)
    b = loop.train(
        _cfg(model64_dir, pairs64, tmp_path, "train.max_steps=3", "model.gradient_checkpointing=true", out="ckpt"),
        progress=False,
    )
    plain = loop.train(
        _cfg(model64_dir, pairs64, tmp_path, "train.max_steps=3", "model.quantization=null", out="lora"),
        progress=False,
    )
    live = loop.train(
        _cfg(model64_dir, pairs64, tmp_path, "train.max_steps=3", "reference=live", out="live"), progress=False
    )
    la, lb, lp, ll = (read_metrics(r.run_dir, "train") for r in (a, b, plain, live))
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], abs=1e-6)
    # the LoRA-off reference computed live is the cached one: the 4-bit base, adapters disabled
    assert [r["loss"] for r in ll] == pytest.approx([r["loss"] for r in la], abs=1e-6)
    # the quantized base is what trains: its log-probs are not the full-precision base's
    assert abs(la[0]["logps/chosen"] - lp[0]["logps/chosen"]) > 1e-3


def test_an_int8_base_trains_its_adapters_with_and_without_checkpointing(model64_dir, pairs64, tmp_path):
    """`model.quantization: int8`: DPO's loss falls from log 2 as the adapters train on the int8
    base, and gradient checkpointing (which re-runs each int8 layer's forward) changes nothing."""
    a = loop.train(_cfg(model64_dir, pairs64, tmp_path, "train.max_steps=4", "model.quantization=int8"), progress=False)
    b = loop.train(
        _cfg(
            model64_dir,
            pairs64,
            tmp_path,
            "train.max_steps=4",
            "model.quantization=int8",
            "model.gradient_checkpointing=true",
            out="ckpt",
        ),
        progress=False,
    )
    la, lb = (read_metrics(r.run_dir, "train") for r in (a, b))
    assert la[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and la[-1]["loss"] < la[0]["loss"] - 0.05
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], abs=1e-6)


def test_qlora_trains_a_reward_model_and_a_ppo_value_model(model64_dir, pairs64, tmp_path, monkeypatch):
    """Every model a recipe trains with LoRA takes the quantized base: a reward model (its score
    head trained in full), and PPO's policy and value model (critic.lora)."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.train import modules as trained_modules

    seen = []
    real = trained_modules.TrainedModule.build.__func__

    def build(cls, name, model, *a, **k):
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]  # peft's wrappers only point at them
        seen.append((name, sum(isinstance(m.weight, tq.NF4Tensor) for m in linears)))
        return real(cls, name, model, *a, **k)

    monkeypatch.setattr(trained_modules.TrainedModule, "build", classmethod(build))
    reward = loop.train(
        _cfg(model64_dir, pairs64, tmp_path, "recipe=reward", "train.max_steps=6", out="rm"), progress=False
    )
    rows = read_metrics(reward.run_dir, "train")
    assert rows[-1]["loss"] < rows[0]["loss"]
    scorer = AutoModelForSequenceClassification.from_pretrained(reward.final_dir)
    assert scorer.score.weight.shape[0] == 1
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {i} plus 1 ?"} for i in range(16)])
    (tmp_path / "r.py").write_text(
        "def chars(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    ppo = _cfg(
        model64_dir,
        prompts,
        tmp_path,
        "recipe=ppo",
        f"online.rewards={tmp_path / 'r.py'}:chars",
        "critic.lora=true",
        "generation.num_samples=2",
        "generation.max_new_tokens=4",
        "train.max_steps=2",
        out="ppo",
    )
    loop.train(ppo, progress=False)
    assert [name for name, _ in seen] == ["policy", "policy", "value"]
    assert all(n == 2 * 7 for _, n in seen), seen  # every block linear of every trained model is 4-bit
