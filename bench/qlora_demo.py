"""The demo task's held-out score of QLoRA's starting point: SmolLM2-135M-Instruct with its block
linears in NF4 and dequantized (what a QLoRA run trains on, adapters at zero), next to the
full-precision model, on the demo's 200 held-out prompts (greedy, 48 tokens), with a paired
bootstrap interval of the difference. Together with

    LORA="lora.enabled=true lora.r=16 lora.alpha=32 train.learning_rate=1e-4"
    alignkit demo --output-dir runs/demo-lora $LORA
    alignkit demo --output-dir runs/demo-qlora $LORA model.quantization=nf4

it separates what quantization costs from what training gains.

    python bench/qlora_demo.py                      # the NF4 base
    python bench/qlora_demo.py --scheme int8        # the int8 base (model.quantization: int8)
    python bench/qlora_demo.py --loftq-rank 16      # NF4 plus the best rank-16 correction (below)

It prints first whether the model's block linears were rounded to 4 bits before (how many of their
32-weight blocks hold at most 16 distinct values, `quantization.few_valued_blocks`: all, for the
bundled SmolLM2, a GGUF Q4_1 file de-quantized, so a QLoRA run on it rounds its weights to 4 bits a
second time), then the scheme's relative weight error on the model and on Gaussian weights of the
same shapes and spread.

`--sensitivity`: where NF4's damage lies. With NF4 in only some layers (the others as they were),
the extra negative log-likelihood, in nats a token, of the full-precision model's own greedy replies
to the first `--sensitivity-prompts` held-out prompts: all layers; each kind of linear alone and all
but it; all but each block. Asks whether keeping a few layers in the compute dtype (bitsandbytes'
`llm_int8_skip_modules`, mixed-precision 4-bit checkpoints) would save the score. Last line
before the usual one: `<scheme>_nll all=<x> worst_kind=<k> all_but_worst_kind=<x> worst_block=<i>
all_but_worst_block=<x>`.

`--loftq-rank R`: the NF4 base plus the rank-R correction LoftQ (Li et al., arXiv 2310.08659)
would start LoRA adapters from: alternately quantize W - L R and take L R as the top R singular
directions of what quantization lost (`--loftq-iters` rounds). It asks whether the score NF4 loses
lies in an error an adapter of that rank could absorb; it prints the relative weight error
(Frobenius norm over every quantized layer) without and with the correction.

Last line: `qlora_base before=<full precision> <scheme>=<quantized> diff=<d> ci95=<lo>,<hi> n=<n>`.
`--smoke` (examples/smoke.py): the same code on a tiny model and 4 prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import smoke  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model directory (default: the bundled SmolLM2)")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--scheme", choices=["nf4", "int8"], default="nf4", help="model.quantization's scheme")
    ap.add_argument("--loftq-rank", type=int, default=0, help="add LoftQ's rank-R correction to the NF4 base")
    ap.add_argument("--loftq-iters", type=int, default=5)
    ap.add_argument("--sensitivity", action="store_true", help="the extra NLL of the replies, by layer kind and block")
    ap.add_argument("--sensitivity-prompts", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = smoke.parse_args(ap, heldout=4, sensitivity_prompts=2)
    import torch

    from alignkit import demo, demo_task
    from alignkit.config import ModelConfig
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.models import default_model_dir, load_model, load_tokenizer, transformer_blocks
    from alignkit.quantization import dequantized, few_valued_blocks, quantizable, quantize_base

    path = args.model or (smoke.tiny_model_dir(args.out) if args.smoke else str(default_model_dir()))
    mcfg = ModelConfig(name_or_path=path)
    tok, model = load_tokenizer(mcfg), load_model(mcfg, device=torch.device("cpu"), for_training=False)
    heldout = demo_task.heldout_prompts(args.heldout)
    prompts = [i.messages() for i in heldout]
    replies = demo._replies(model, tok, prompts, True, "full precision")
    before = demo._score(heldout, replies)
    layers = quantizable(transformer_blocks(model))
    few, blocks = map(sum, zip(*(few_valued_blocks(layer.weight, limit=None) for _, layer in layers)))
    print(
        "32-weight blocks of the block linears with at most 16 distinct values (rounded to 4 bits before): "
        f"{few} of {blocks}"
    )
    if args.loftq_rank and args.scheme != "nf4":
        ap.error("--loftq-rank corrects the NF4 base: leave --scheme at nf4")
    original = {name: layer.weight.detach().clone() for name, layer in layers}
    gaussian = _gaussian_error(layers, args.scheme)
    report = quantize_base(layers, args.scheme)  # its error is the one a QLoRA run's first lines give
    for _, layer in layers:  # what the QLoRA run computes with: torchao's dequantized weights
        layer.weight = torch.nn.Parameter(dequantized(layer.weight, torch.float32), requires_grad=False)
    print(
        f"relative weight error of the {args.scheme} base: {report['relative_error']:.4f} "
        f"(of Gaussian weights of the same shapes and spread: {gaussian:.4f})"
    )
    if args.sensitivity:
        n = args.sensitivity_prompts
        _sensitivity(model, tok, prompts[:n], replies[:n], layers, original, args.scheme)
    if args.loftq_rank:
        for name, layer in layers:
            layer.weight = torch.nn.Parameter(
                _loftq(original[name], args.loftq_rank, args.loftq_iters), requires_grad=False
            )
        rounds = args.loftq_iters
        print(f"with LoftQ's rank-{args.loftq_rank} correction ({rounds} rounds): {_error(original, layers):.4f}")
    label = args.scheme if not args.loftq_rank else f"{args.scheme}+loftq{args.loftq_rank}"
    quantized = demo._score(heldout, demo._replies(model, tok, prompts, True, f"{label} base"))
    ci = paired_bootstrap(before["passed"], quantized["passed"], seed=0)
    print(f"by constraint: full {before['by_constraint']}, {label} {quantized['by_constraint']}")
    print(
        f"qlora_base before={ci.before:.3f} {args.scheme}={ci.after:.3f} diff={ci.diff:+.3f} "
        f"ci95={ci.lo:+.3f},{ci.hi:+.3f} n={ci.n}"
    )


def _gaussian_error(layers: list, scheme: str) -> float:
    """`quantize_base`'s relative error on Gaussian weights with each layer's shape and standard
    deviation: what the scheme costs weights that no quantizer has rounded before."""
    import torch

    from alignkit.quantization import quantize_base

    gen = torch.Generator().manual_seed(0)
    twins = []
    for name, layer in layers:
        w = layer.weight.detach()
        twin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        twin.weight = torch.nn.Parameter(torch.randn(w.shape, generator=gen) * w.std(), requires_grad=False)
        twins.append((name, twin))
    return quantize_base(twins, scheme)["relative_error"]


def _sensitivity(model, tok, prompts: list, replies: list, layers: list, original: dict, scheme: str) -> None:
    """The extra NLL (nats a reply token) of the full-precision model's greedy replies with the
    `scheme` base in only some layers: where the quantized base loses the model."""
    import torch

    from alignkit.generation.hf import render_prompts

    quantized = {name: layer.weight.detach().clone() for name, layer in layers}
    texts = render_prompts(tok, prompts)
    ids = [tok(t + r, add_special_tokens=False)["input_ids"] for t, r in zip(texts, replies)]
    starts = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def nll(names: set) -> float:
        for name, layer in layers:
            layer.weight.data.copy_(quantized[name] if name in names else original[name])
        total, count = 0.0, 0
        with torch.no_grad():
            for seq, start in zip(ids, starts):
                x = torch.tensor([seq])
                logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
                picked = logp.gather(1, x[0, 1:, None])[:, 0][start - 1 :]
                total, count = total - float(picked.sum()), count + picked.numel()
        return total / max(count, 1)

    every = {name for name, _ in layers}
    clean = nll(set())
    all_q = nll(every) - clean
    print(f"NLL of the full model's replies: {clean:.4f} nats a token; with every layer in {scheme}: {all_q:+.4f}")
    kinds = sorted({name.rsplit(".", 1)[-1] for name in every})
    by_kind = {}
    for kind in kinds:
        part = {name for name in every if name.endswith("." + kind)}
        by_kind[kind] = (nll(part) - clean, nll(every - part) - clean)
        print(f"  {kind:10s} alone {by_kind[kind][0]:+.4f}   all but it {by_kind[kind][1]:+.4f}")
    by_block = {}
    for block in sorted({int(name.split(".", 1)[0]) for name in every}):
        part = {name for name in every if name.split(".", 1)[0] == str(block)}
        by_block[block] = nll(every - part) - clean
        print(f"  all but block {block:2d} {by_block[block]:+.4f}")
    for name, layer in layers:  # back to the quantized base the score below is for
        layer.weight.data.copy_(quantized[name])
    kind = min(by_kind, key=lambda k: by_kind[k][1])
    block = min(by_block, key=by_block.get)
    print(
        f"{scheme}_nll all={all_q:.4f} worst_kind={kind} all_but_worst_kind={by_kind[kind][1]:.4f} "
        f"worst_block={block} all_but_worst_block={by_block[block]:.4f}"
    )


def _error(original: dict, layers: list) -> float:
    """||W - W_q||_F / ||W||_F over every layer together, for the LoftQ-corrected weights (the plain
    quantized base's is `quantize_base`'s report)."""
    lost = sum(float((original[n] - layer.weight).pow(2).sum()) for n, layer in layers)
    return (lost / sum(float(w.pow(2).sum()) for w in original.values())) ** 0.5


def _loftq(w, rank: int, rounds: int):
    """LoftQ's start (arXiv 2310.08659, Algorithm 1) as one weight: Q + L R, where Q is the NF4
    quantization of W - L R and L R the best rank-`rank` fit of W - Q, alternated `rounds` times."""
    import torch

    from alignkit.quantization import NF4_BLOCK, dequantized, scaler_block
    from alignkit.quantization import _torchao as torchao

    lr = torch.zeros_like(w)
    for _ in range(rounds):
        q = dequantized(torchao().to_nf4(w - lr, NF4_BLOCK, scaler_block(w.numel() // NF4_BLOCK)), w.dtype)
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        lr = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    return q + lr


if __name__ == "__main__":
    main()
