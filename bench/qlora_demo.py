"""The demo task's held-out score of QLoRA's starting point: SmolLM2-135M-Instruct with its block
linears in NF4 and dequantized (what a QLoRA run trains on, adapters at zero), next to the
full-precision model, on the demo's 200 held-out prompts (greedy, 48 tokens), with a paired
bootstrap interval of the difference. Together with

    LORA="lora.enabled=true lora.r=16 lora.alpha=32 train.learning_rate=1e-4"
    alignkit demo --output-dir runs/demo-lora $LORA
    alignkit demo --output-dir runs/demo-qlora $LORA model.quantization=nf4

it separates what quantization costs from what training gains.

    python bench/qlora_demo.py

Last line: `qlora_base before=<full precision> nf4=<quantized> diff=<d> ci95=<lo>,<hi> n=<n>`.
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
    quantize_base(layers, "nf4")
    for _, layer in layers:  # what the QLoRA run computes with: torchao's dequantized NF4 weights
        layer.weight = torch.nn.Parameter(dequantized(layer.weight, torch.float32), requires_grad=False)
    nf4 = demo._score(heldout, demo._replies(model, tok, prompts, True, "nf4 base"))
    ci = paired_bootstrap(before["passed"], nf4["passed"], seed=0)
    print(f"by constraint: full {before['by_constraint']}, nf4 {nf4['by_constraint']}")
    print(
        f"qlora_base before={ci.before:.3f} nf4={ci.after:.3f} diff={ci.diff:+.3f} "
        f"ci95={ci.lo:+.3f},{ci.hi:+.3f} n={ci.n}"
    )


if __name__ == "__main__":
    main()
