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
    ap.add_argument("--out", default=None)
    args = smoke.parse_args(ap, heldout=4)
    import torch

    from alignkit import demo, demo_task
    from alignkit.config import ModelConfig
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.models import default_model_dir, load_model, load_tokenizer, transformer_blocks
    from alignkit.quantization import dequantized, quantizable, quantize_base

    path = args.model or (smoke.tiny_model_dir(args.out) if args.smoke else str(default_model_dir()))
    mcfg = ModelConfig(name_or_path=path)
    tok, model = load_tokenizer(mcfg), load_model(mcfg, device=torch.device("cpu"), for_training=False)
    heldout = demo_task.heldout_prompts(args.heldout)
    prompts = [i.messages() for i in heldout]
    before = demo._score(heldout, demo._replies(model, tok, prompts, True, "full precision"))
    layers = quantizable(transformer_blocks(model))
    if args.loftq_rank and args.scheme != "nf4":
        ap.error("--loftq-rank corrects the NF4 base: leave --scheme at nf4")
    original = {name: layer.weight.detach().clone() for name, layer in layers}
    report = quantize_base(layers, args.scheme)  # its error is the one a QLoRA run's first lines give
    for _, layer in layers:  # what the QLoRA run computes with: torchao's dequantized weights
        layer.weight = torch.nn.Parameter(dequantized(layer.weight, torch.float32), requires_grad=False)
    print(f"relative weight error of the {args.scheme} base: {report['relative_error']:.4f}")
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
