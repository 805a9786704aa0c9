"""Peak memory of one training step: full fine-tuning, LoRA and QLoRA (`model.quantization: nf4`),
for DPO and for GRPO, on SmolLM2-135M-Instruct at a sequence length of 1024 tokens.

    python bench/memory.py [--recipes dpo,grpo] [--modes full,lora,qlora] [--seq 1024] [--batch 2]

Modes: `full`, `lora` (r=16 on every linear layer), `qlora` (the same on an NF4 base) and
`int8` (the same on an int8 base, `model.quantization: int8`); each quantized mode's peak is printed
as a ratio to LoRA's.

Each (recipe, mode) runs `alignkit train` for 2 steps in its own process; step 2 (the optimizer
state exists by then) is measured:
- on a CPU, `live_peak_mib`: the bytes of live tensors at the step's peak, a tensor census (every
  tensor the garbage collector sees at the step's start, storages counted once, a quantized
  weight by its inner tensors) plus the highest running sum of the allocator's allocation and
  free events during the step (PyTorch's profiler with `profile_memory`, its raw events); and `rss_peak_mib`, the
  process's peak resident memory (VmHWM, which includes loading the model in float32 before it is
  quantized, so it understates what QLoRA saves);
- on a GPU, `torch.cuda.max_memory_allocated` over the step.
DPO: pairs of a 512-token prompt and 512-token completions (1024 tokens a sequence), `--batch`
pairs a micro-batch, the cached reference. GRPO: a prompt of `seq - 24` tokens, 4 samples of 24
new tokens each, so the trainer's sequences are `seq` long. LoRA: r=16 on every linear layer.
Last line: `qlora_vs_lora_peak=<x>` (DPO; the GRPO ratio is printed above it).
`--smoke` (examples/smoke.py): the same code on a tiny model for seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import smoke  # noqa: E402

MODES = {
    "full": [],
    "lora": ["lora.enabled=true", "lora.r=16", "lora.alpha=32"],
    "qlora": ["lora.enabled=true", "lora.r=16", "lora.alpha=32", "model.quantization=nf4"],
    "int8": ["lora.enabled=true", "lora.r=16", "lora.alpha=32", "model.quantization=int8"],
}
WORDS = "the a cat dog sat on mat what is plus answer sorry i cannot help".split()


def _data(out: Path, seq: int, tokenizer) -> dict:
    """Pairs and prompts whose token counts are what the run needs (words of the tokenizer's own vocabulary)."""

    def text(n: int, offset: int) -> str:
        words, k = [], offset
        while len(tokenizer(" ".join(words))["input_ids"]) < n:
            words.append(WORDS[k % len(WORDS)])
            k += 1
        return " ".join(words)

    half = seq // 2
    prompt, completion = text(half - 24, 0), text(half - 8, 3)
    pairs = [{"prompt": prompt + f" {i}", "chosen": completion, "rejected": completion + " sorry"} for i in range(16)]
    prompts = [{"prompt": text(seq - 48, i)} for i in range(4)]
    files = {"dpo": out / "pairs.jsonl", "grpo": out / "prompts.jsonl"}
    files["dpo"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    files["grpo"].write_text("".join(json.dumps(r) + "\n" for r in prompts))
    reward = "def length(prompts, completions, **kw):\n    return [len(c) / 50 for c in completions]\n"
    (out / "reward.py").write_text(reward)
    return files


def _census() -> int:
    """Bytes of the tensors alive now, each storage once (a tensor subclass by its inner tensors)."""
    import torch

    seen, total = set(), 0

    def inner(t) -> list:
        names = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else []
        return [x for x in (getattr(t, n, None) for n in names) if isinstance(x, torch.Tensor)]

    def add(t) -> None:
        nonlocal total
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) and inner(t):
            for x in inner(t):  # a subclass (a quantized weight, a DTensor): its inner tensors
                add(x)
            return
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no storage of its own, or one already released
            for x in inner(t):
                add(x)
            return
        if key and key not in seen:
            seen.add(key)
            total += size

    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                add(obj)
        except ReferenceError:
            continue
    return total


def _vmhwm() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measured_train(cfg) -> dict:
    """Train `cfg` (2 steps) in this process and measure step 2 (the optimizer state exists by then)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from alignkit.train import loop

    measured: dict = {}
    real_step, calls = loop._step, {"n": 0}
    cuda = torch.cuda.is_available()

    def step(run):
        calls["n"] += 1
        if calls["n"] != 2:
            return real_step(run)
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            result = real_step(run)
            measured["live_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            return result
        base = _census()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = real_step(run)
        # every allocation and free of the step, in time order (the raw events: the per-op
        # summaries would hide what an op allocates and frees inside)
        raw = prof.profiler.kineto_results.events()
        events = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]")
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        measured["live_peak_mib"] = (base + peak) / 2**20
        measured["live_at_start_mib"] = base / 2**20
        return result

    loop._step = step
    try:
        loop.train(cfg, progress=False)
    finally:
        loop._step = real_step
    measured["rss_peak_mib"] = _vmhwm()
    return measured


def _common(model: str, out: Path, *extra) -> list:
    return [
        f"model.name_or_path={model}",
        f"output_dir={out / 'run'}",
        f"cache_dir={out / 'cache'}",
        "train.report_to=[]",
        "train.max_steps=2",
        "data.eval_fraction=0",
        "train.save_every=0",
        "health.enabled=false",
        *extra,
    ]


def one(recipe: str, mode: str, args) -> dict:
    """One (recipe, mode) of the QLoRA comparison, in this process."""
    from alignkit.config import load_config
    from alignkit.models import load_tokenizer

    out = Path(args.out) / f"{recipe}-{mode}{'-ckpt' if args.gradient_checkpointing else ''}"
    out.mkdir(parents=True, exist_ok=True)
    files = _data(out, args.seq, load_tokenizer(load_config(None, [f"model.name_or_path={args.model}"]).model))
    common = _common(args.model, out, f"train.batch_size={args.batch}", f"data.max_length={args.seq}", *MODES[mode])
    if args.gradient_checkpointing:
        common.append("model.gradient_checkpointing=true")
    if recipe == "dpo":
        extra = ["recipe=dpo", f"data.train={files['dpo']}", f"data.max_prompt_length={args.seq // 2}"]
    else:
        extra = [
            "recipe=grpo",
            f"data.train={files['grpo']}",
            f"online.rewards={out / 'reward.py'}:length",
            "generation.num_samples=4",
            "generation.max_new_tokens=24",
            "train.batch_size=1",
        ]
    return measured_train(load_config(None, common + extra))


def one_context(length: int, cp: int, args) -> dict:
    """SFT on one sequence of `length` tokens with `dist.context_parallel: cp` (this process is one
    of `cp` under torchrun), on the tiny-width, many-layer model."""
    from alignkit.config import load_config
    from alignkit.testing import save_tiny_model_dir

    out = Path(args.out) / f"context-{length}-{cp}"
    model = Path(args.out) / "wide_deep"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (model / "config.json").is_file():
            save_tiny_model_dir(model, hidden=args.cp_hidden, layers=args.cp_layers)
        clauses = length // 6 + 1  # ~6 tokens a clause in the tiny word-level vocabulary
        prompt = " ".join(f"what is {k % 10} plus {(3 * k) % 10} ?" for k in range(clauses))
        row = {"prompt": prompt, "completion": "the answer is 4 ."}
        (out / "sft.jsonl").write_text(json.dumps(row) + "\n")
    if cp > 1:
        import torch.distributed as tdist

        tdist.init_process_group("gloo")  # alignkit joins this group; the files above exist after the barrier
        tdist.barrier()
    extra = [
        "recipe=sft",
        f"data.train={out / 'sft.jsonl'}",
        f"data.max_length={length}",
        f"data.max_prompt_length={length - 8}",
        "train.batch_size=1",
        "train.packing=false",  # one sequence a row: causal attention, no [T, T] mask
        f"dist.context_parallel={cp}",
    ]
    return measured_train(load_config(None, _common(str(model), out, *extra)))


def _run(cmd: list, what: str) -> list:
    env = dict(os.environ, OMP_NUM_THREADS="1") if "torch.distributed.run" in cmd else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return lines


def context_section(args) -> tuple:
    """Per-process peak at each length, 1 process against `dist.context_parallel: 2` on 2."""
    lengths = [int(x) for x in args.lengths.split(",")]
    peaks: dict = {}
    base = [__file__, "--out", str(args.out), "--cp-hidden", str(args.cp_hidden), "--cp-layers", str(args.cp_layers)]
    for length in lengths:
        for cp in (1, 2):
            if cp == 1:
                cmd = [sys.executable, *base, "--one-context", str(length), "1"]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                cmd += [f"--log-dir={Path(args.out) / 'torchrun-logs'}"]  # not a new directory in /tmp a job
                cmd += [*base, "--one-context", str(length), "2"]
            results = _run(cmd, f"context {length}/{cp}")
            peaks[(length, cp)] = max(r["live_peak_mib"] for r in results)  # the fuller process
            print(f"context length={length:6d} cp={cp} per_process_live_peak_mib={peaks[(length, cp)]:.0f}", flush=True)
    fits = {cp: [n for n in lengths if peaks[(n, cp)] <= args.budget_mib] for cp in (1, 2)}
    longest = {cp: max(fits[cp]) if fits[cp] else 0 for cp in (1, 2)}
    top = lengths[-1]
    return peaks[(top, 2)] / peaks[(top, 1)], longest[1], longest[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--recipes", default="dpo,grpo")
    ap.add_argument("--modes", default="full,lora,qlora")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default="/tmp/alignkit_bench_memory")
    ap.add_argument("--lengths", default="2048,4096,8192,16384", help="sequence lengths of the context section")
    ap.add_argument("--budget-mib", type=float, default=1024.0, help="per-process budget the longest lengths fit")
    ap.add_argument("--cp-hidden", type=int, default=64)
    ap.add_argument("--cp-layers", type=int, default=24)
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="QLoRA section: recompute activations in the backward (as the QLoRA paper trains)",
    )
    ap.add_argument("--skip-qlora", action="store_true")
    ap.add_argument("--skip-context", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("RECIPE", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--one-context", nargs=2, type=int, metavar=("LENGTH", "CP"), help=argparse.SUPPRESS)
    args = smoke.parse_args(ap, seq=64, batch=1, lengths="64", budget_mib=64.0, cp_layers=2)
    if args.smoke and args.model == "smollm2-135m-instruct":
        args.model = smoke.tiny_model_dir(args.out)
    if args.one:
        print("RESULT " + json.dumps(one(*args.one, args)), flush=True)
        return
    if args.one_context:
        print("RESULT " + json.dumps(one_context(*args.one_context, args)), flush=True)
        return
    import platform

    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    ratios: dict = {}
    if not args.skip_qlora:
        ckpt = " gradient_checkpointing" if args.gradient_checkpointing else ""
        print(f"# QLoRA: model={args.model} seq={args.seq} batch={args.batch}{ckpt}")
        results: dict = {}
        for recipe in args.recipes.split(","):
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--one", recipe, mode, "--model", args.model]
                cmd += ["--seq", str(args.seq), "--batch", str(args.batch), "--out", str(args.out)]
                cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                r = results[(recipe, mode)] = _run(cmd, f"{recipe}/{mode}")[-1]
                start = r.get("live_at_start_mib", float("nan"))
                print(
                    f"{recipe:5s} {mode:6s} live_peak_mib={r['live_peak_mib']:.0f} "
                    f"live_at_start_mib={start:.0f} rss_peak_mib={r['rss_peak_mib']:.0f}",
                    flush=True,
                )
        for recipe in args.recipes.split(","):
            for mode in ("qlora", "int8"):
                if (recipe, mode) in results and (recipe, "lora") in results:
                    x = results[(recipe, mode)]["live_peak_mib"] / results[(recipe, "lora")]["live_peak_mib"]
                    print(f"{recipe}: {mode}_vs_lora_peak={x:.3f}")
                    if mode == "qlora":
                        ratios[recipe] = x
    cp_ratio, longest1, longest2 = float("nan"), 0, 0
    if not args.skip_context:
        print(
            f"# context parallelism: width {args.cp_hidden}, {args.cp_layers} layers, budget {args.budget_mib:.0f} MiB"
        )
        cp_ratio, longest1, longest2 = context_section(args)
    first = next(iter(ratios.values()), float("nan"))
    print(
        f"qlora_vs_lora_peak={first:.3f} cp2_vs_cp1_peak_at_longest={cp_ratio:.3f} "
        f"longest_len_cp1={longest1} longest_len_cp2={longest2}"
    )


if __name__ == "__main__":
    main()
