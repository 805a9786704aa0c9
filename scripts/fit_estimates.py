"""The "what fits where" table of docs/fitting.md: estimates from parameter counts and the
activation cost per token measured by bench/memory.py (SmolLM2-135M-Instruct, DPO, 1024 tokens).

    python scripts/fit_estimates.py

Per GPU, with FSDP2 sharding every state over the GPUs of the run:
- full fine-tuning: 16 bytes a parameter (float32 weights, float32 gradients, AdamW's two moments);
- LoRA: the base in bfloat16 (`model.dtype: bfloat16`), 2 bytes a parameter, plus r=16 adapters on
  every linear layer with their gradients and AdamW state (16 bytes each);
- QLoRA: the block linears in NF4 (4.127 bits a weight: 4-bit codes, an int8 absmax per 64 weights
  and a float32 factor per 256 absmax values), embeddings and head in bfloat16, plus the adapters;
- activations, bfloat16: A bytes per token, layer and unit of width, A measured in float32 on
  SmolLM2 with LoRA and halved: 95.2 without gradient checkpointing, 23.8 with it (bench/memory.py:
  the DPO step's live peak less what it started with, over its 3,058 tokens, 30 layers and width
  576; SmolLM2's MLP is 2.67x its width, Llama's 3.5x, so these understate a Llama's somewhat).
Context parallelism over C GPUs divides the activations of a sequence by C.
"""

from __future__ import annotations

GIB = 2**30
BUDGET_GIB = 80.0  # an 80 GB GPU, less nothing: an estimate, not a promise
ACT_FP32 = {"no checkpointing": 95.2, "checkpointing": 23.8}  # bytes / (token x layer x width), measured
MODELS = {  # name: (parameters, of which embeddings + head, width, layers)
    "1B (Llama-3.2-1B)": (1.24e9, 0.26e9, 2048, 16),
    "8B (Llama-3.1-8B)": (8.03e9, 1.05e9, 4096, 32),
    "70B (Llama-3.1-70B)": (70.6e9, 2.10e9, 8192, 80),
}
GPUS = {"1 GPU": 1, "8 GPUs": 8, "2 nodes (16 GPUs)": 16}


def adapters(width: int, layers: int, r: int = 16) -> float:
    """LoRA parameters on q, k, v, o, gate, up, down (Llama's shapes, MLP 3.5x, KV a quarter)."""
    mlp, kv = int(3.5 * width), width // 4
    shapes = [(width, width), (width, kv), (width, kv), (width, width), (width, mlp), (width, mlp), (mlp, width)]
    return layers * sum(r * (a + b) for a, b in shapes)


def static_bytes(kind: str, params: float, embed: float, width: int, layers: int) -> float:
    lora = 16 * adapters(width, layers)
    if kind == "full":
        return 16 * params
    if kind == "LoRA":
        return 2 * params + lora
    return 4.127 / 8 * (params - embed) + 2 * embed + lora


def main() -> None:
    kinds = ("full", "LoRA", "QLoRA")
    print("| model | method | " + " | ".join(f"weights + state per GPU, {g}" for g in GPUS) + " |")
    print("|---|---|" + "---|" * len(GPUS))
    for name, (params, embed, width, layers) in MODELS.items():
        for kind in kinds:
            cells = [f"{static_bytes(kind, params, embed, width, layers) / n / GIB:.1f} GiB" for n in GPUS.values()]
            print(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    print()
    print(
        f"| model | method, GPUs | tokens per micro-batch in {BUDGET_GIB:.0f} GB, no checkpointing | "
        "with checkpointing | with checkpointing and context parallelism over the GPUs |"
    )
    print("|---|---|---|---|---|")
    for name, (params, embed, width, layers) in MODELS.items():
        for kind in ("LoRA", "QLoRA"):
            for n in (1, 8):
                free = BUDGET_GIB * GIB - static_bytes(kind, params, embed, width, layers) / n
                cells = []
                for mode, cp in (("no checkpointing", 1), ("checkpointing", 1), ("checkpointing", n)):
                    per_token = ACT_FP32[mode] / 2 * layers * width / cp
                    cells.append(f"{max(0.0, free / per_token) / 1000:.0f}k" if free > 0 else "does not fit")
                print(f"| {name} | {kind}, {n} GPU{'s' if n > 1 else ''} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
