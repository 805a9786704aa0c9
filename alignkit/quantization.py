"""QLoRA's frozen base (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv
2305.14314): the linear layers of the transformer blocks stored in 4-bit NormalFloat with double
quantization (`nf4`) or in int8 (`int8`), while LoRA adapters train in the compute dtype.

The quantized tensors are torchao's (`NF4Tensor`, `Int8Tensor`): they run on CPU and GPU, and NF4
carries FSDP2's all-gather hooks, so a sharded run gathers 4-bit weights (FSDP-QLoRA). This module
is only the glue: which layers, which block sizes, and the way back to plain weights.

Departures from the paper: no paged optimizers (the optimizer holds only the adapters' state, a few
MB at the sizes alignkit trains); the output head and the embeddings stay in the compute dtype, as
in the paper's released code (`llm_int8_skip_modules=["lm_head"]`) and peft's `all-linear`."""

from __future__ import annotations

import math
import types

import torch

from alignkit.errors import ModelError

NF4_BLOCK = 64  # weights per absmax block (the paper's 64)
NF4_SCALER_BLOCK = 256  # absmax values per block of the second quantization (the paper's 256)
# Below this many quantized weights a run is told what NF4 cost a small model (docs/fitting.md):
# QLoRA's finding that NF4 matches 16-bit fine-tuning is for 7B-65B models
SMALL = 10**9
# A base whose 32-weight blocks hold at most 16 distinct values was rounded to 4 bits before
# (a GGUF Q4 file, GPTQ, AWQ or NF4, de-quantized): the share of blocks that says so, and how many
# blocks of each layer are looked at (enough to tell, cheap at 70B)
ROUNDED_BLOCK, ROUNDED_SHARE, ROUNDED_SAMPLE = 32, 0.9, 4096


def _torchao():
    """Import torchao's quantization API (what its import logs on a CPU build: `alignkit.quiet`)."""
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ModelError(
            "model.quantization needs torchao: pip install 'alignkit[qlora]' (or pip install torchao --no-deps)."
        ) from None
    return tq


def scaler_block(n_scalers: int, shards: int = 1) -> int:
    """The largest block of absmax values, at most the paper's 256, such that FSDP2's split of a
    weight along dimension 0 over 1, 2, 4 or 8 processes (and over `shards`) leaves whole blocks:
    torchao's double quantization needs them, and the same block at every process count makes a
    run's base the same whatever its scale (SmolLM2's 576x576 projections have 5,184 absmax values:
    blocks of 8). 0: no block fits."""
    for split in (math.lcm(8, shards), shards):
        if n_scalers % split == 0:
            per_shard, block = n_scalers // split, NF4_SCALER_BLOCK
            while block > 1 and per_shard % block:
                block //= 2
            return block
    return 0


def weight_fingerprint(w: torch.Tensor) -> tuple:
    """(dtype, sum, sum of squares) of a plain weight in float64: what identifies a LoRA base to a
    sampler (`generation.adapters`)."""
    w64 = w.detach().to("cpu", torch.float64)
    return (str(w.dtype).removeprefix("torch."), float(w64.sum()), float((w64 * w64).sum()))


def base_fingerprint(layer: torch.nn.Module) -> tuple:
    """The fingerprint of a linear layer's base weight as it was before quantization: a sampler
    loads the unquantized checkpoint (vLLM its own format), and that is the base it must match."""
    return getattr(layer, "base_fingerprint", None) or weight_fingerprint(layer.weight)


def quantizable(blocks) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers of the transformer blocks (not the head, the embeddings or a reward head)."""
    return [
        (f"{i}.{name}", m)
        for i, block in enumerate(blocks)
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def quantize_base(layers: list, scheme: str, shards: int = 1) -> dict:
    """Replace, in place, the weight of every (name, linear layer) of `layers` (`quantizable`) by its
    frozen `scheme` (nf4 or int8) form; biases stay. Returns {"scheme", "quantized": n, "weights":
    their count, "kept": [names], "relative_error"}: a layer whose shape cannot be split into whole
    blocks on `shards` processes keeps its weight; the error is ||W - dequantized(Q(W))|| / ||W||
    (Frobenius) over the quantized layers together, what the run's base lost (`describe`).

    Quantize after peft wrapped the layers (they are its `base_layer`s): peft then uses its plain
    LoRA layer, whose merge alignkit can run on the dequantized weight (`models.merged_copy`)."""
    tq = _torchao()
    kept, n, weights, lost, norm, rounded, looked = [], 0, 0, 0.0, 0.0, 0, 0
    for name, layer in layers:
        w = layer.weight.detach()
        original = weight_fingerprint(w)
        few, blocks = few_valued_blocks(w)
        rounded, looked = rounded + few, looked + blocks
        if scheme == "nf4":
            n_scalers = w.numel() // NF4_BLOCK
            block = scaler_block(n_scalers, shards) if w.numel() % NF4_BLOCK == 0 else 0
            if block == 0 or w.shape[0] % shards:
                kept.append(name)
                continue
            q = tq.to_nf4(w, NF4_BLOCK, block)
            layer.weight = torch.nn.Parameter(q, requires_grad=False)
        elif scheme == "int8":
            layer.weight.requires_grad_(False)
            tq.quantize_(layer, tq.Int8WeightOnlyConfig())
            layer.forward = types.MethodType(_frozen_forward, layer)
        else:
            raise ModelError(f"model.quantization: unknown scheme {scheme!r}; use nf4 or int8.")
        layer.base_fingerprint = original
        d2, w2 = _squared_sums(dequantized(layer.weight, w.dtype), w)
        lost, norm = lost + d2, norm + w2
        weights += w.numel()
        n += 1
    if n == 0:
        raise ModelError(
            f"model.quantization={scheme}: no linear layer of the transformer blocks could be quantized "
            f"(blocks of {NF4_BLOCK} weights must tile each one); train with LoRA alone."
        )
    error = math.sqrt(lost / norm) if norm else 0.0
    return {
        "scheme": scheme,
        "quantized": n,
        "weights": weights,
        "kept": kept,
        "relative_error": error,
        "rounded_before": rounded / looked if looked else 0.0,
    }


def few_valued_blocks(w: torch.Tensor, limit: int | None = ROUNDED_SAMPLE) -> tuple[int, int]:
    """Of `w`'s first `limit` blocks of 32 consecutive weights (all with None), how many hold at most
    16 distinct values, which weights rounded to 4 bits and de-quantized do and 16- or 32-bit
    weights almost never (32 draws from a weight's spread rarely collide), and how many were looked
    at. A weight whose size is not a multiple of 32 gives (0, 0)."""
    if w.numel() % ROUNDED_BLOCK:
        return 0, 0
    blocks = w.detach().reshape(-1, ROUNDED_BLOCK)
    if limit is not None:
        blocks = blocks[:limit]
    few = 0
    for part in blocks.split(1 << 16):
        ordered = part.sort(dim=1).values
        distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)
        few += int((distinct <= 16).sum())
    return few, blocks.shape[0]


def _squared_sums(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> tuple[float, float]:
    """(sum((a - b)^2), sum(b^2)) in float64, `rows` rows at a time: a 70B model's largest weight in
    float32 is about 1 GB, and the error check should not need a float64 copy of it."""
    lost = norm = 0.0
    for i in range(0, a.shape[0], rows):
        b64 = b[i : i + rows].double()
        d = a[i : i + rows].double() - b64
        lost, norm = lost + float((d * d).sum()), norm + float((b64 * b64).sum())
    return lost, norm


def describe(report: dict) -> str:
    """The run's note on its quantized base (`quantize_base`'s report): how far the weights the
    adapters train on are from the model's own, and which layers stayed in the compute dtype."""
    scheme, kept = report["scheme"], report["kept"]
    text = (
        f"model.quantization={scheme}: {report['quantized']} linear layers of the transformer blocks hold a "
        f"frozen {'4-bit NormalFloat' if scheme == 'nf4' else 'int8'} base, "
        f"{report['relative_error']:.2%} from the model's own weights (relative error); the adapters train "
        "on it and final/ merges them into it"
    )
    if kept:
        shown = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        text += (
            f". {len(kept)} kept in the compute dtype (their weights do not split into whole blocks of "
            f"{NF4_BLOCK} on every process): {shown}"
        )
    if scheme == "nf4" and report["rounded_before"] >= ROUNDED_SHARE:
        text += (
            f". This base was rounded to 4 bits before: {report['rounded_before']:.0%} of the 32-weight blocks "
            "looked at hold at most 16 distinct values, as those of a de-quantized GGUF Q4, GPTQ, AWQ or NF4 "
            "checkpoint do (the bundled SmolLM2-135M is a Q4_1 GGUF's), so NF4 rounds it a second time, on its "
            "own grid; start from the model's 16-bit weights if you have them"
        )
    if scheme == "nf4" and report["weights"] < SMALL:
        text += (
            ". At this size NF4 costs quality before any training: SmolLM2-135M's NF4 base is 9.4% from its "
            "weights and lost most of the demo's score, its int8 base 0.9% and kept most of it "
            "(docs/fitting.md#qlora)"
        )
    return text + "."


class _FrozenLinear(torch.autograd.Function):
    """`F.linear` with a frozen quantized weight that the backward dequantizes again.

    Why: torchao's int8 weight-only tensor dequantizes inside its linear, under autograd, so the
    float copy of every layer's weight was saved for the backward, and a training step's peak held
    the base in float again (bench/memory.py, DPO on SmolLM2-135M: 1.02x LoRA's peak before this,
    for a base a quarter the size at rest). Only the int8 weight is kept now, as torchao's NF4
    linear (`linear_nf4`) does for NF4. The weight is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = (grad @ dequantized(ctx.weight, grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def _frozen_forward(self, x):
    """The forward of a linear layer with an int8 base weight (`quantize_base`)."""
    return _FrozenLinear.apply(x, self.weight, self.bias)


def unsplittable(model: torch.nn.Module) -> set:
    """The quantized weights FSDP2 cannot shard: torchao's int8 tensor implements no `split`, so
    an int8 base is replicated (every process holds it whole, a quarter of float32's bytes); NF4
    carries FSDP2's hooks and is sharded (FSDP-QLoRA)."""
    return {p for p in model.parameters() if is_quantized(p) and not hasattr(p, "get_original_weight")}


def is_quantized(t: torch.Tensor) -> bool:
    """A torchao quantized weight (a tensor subclass), under a DTensor too."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return type(local).__module__.startswith("torchao.")


def dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized weight as a plain tensor of `dtype`, by torchao's own dequantization."""
    if hasattr(t, "get_original_weight"):  # NF4Tensor
        return t.get_original_weight().to(dtype)
    return t.dequantize().to(dtype)


def plain(t: torch.Tensor) -> torch.Tensor:
    """A weight as a plain detached tensor: dequantized if quantized."""
    return dequantized(t, t.dtype) if is_quantized(t) else t.detach()
