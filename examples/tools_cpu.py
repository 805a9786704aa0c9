"""GRPO with a calculator tool on a 2-core CPU: SmolLM2-135M-Instruct learns to call the calculator
on sums of three 3-digit numbers, which it gets wrong when it answers alone.

    python examples/tools_cpu.py [--steps 30] [--out runs/example_tools_cpu] [--backend vllm]

Each episode (`env.name=calculator`, up to 2 model turns of up to 40 tokens): the model's reply
is parsed for `<tool_call>{"name": "calculator", ...}</tool_call>` blocks; a call is answered
with the calculator's result (a `tool` message) and the model goes on; a reply without a call is
its final answer, rewarded 1 when its last number is the sum. SmolLM2's chat template has no tool
support, so the tools are described in a system message (alignkit's fallback), and the prompt
holds one demonstration episode (a question, the call, the result, the answer) before the
question: with the system message alone the model never called the tool in 32 samples (see
BENCHMARKS.md). Held-out: 48 unseen sums, each one greedy episode before and after training;
success with a 95% paired bootstrap interval, and the share of episodes that called the tool.
Last line: `heldout_success before=<b> after=<a> n=<n>`. `--backend vllm`: the training episodes
are sampled turn by turn on vLLM's engine in the process (tokens in, tokens out); the held-out
episodes stay on alignkit's sampler, so the two runs are measured alike. `--smoke` (smoke.py): the
same run in seconds, with a tiny random-init model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import smoke

ROOT = Path(__file__).resolve().parents[1]
N_HELDOUT = 48
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'
DEMO = [
    {"role": "user", "content": "What is 25 + 17 + 8?"},
    {"role": "assistant", "content": CALL % "25 + 17 + 8"},
    {"role": "tool", "content": "50"},
    {"role": "assistant", "content": "50"},
]


def sums(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = (rng.randint(100, 999) for _ in range(3))
        rows.append(
            {"prompt": DEMO + [{"role": "user", "content": f"What is {a} + {b} + {c}?"}], "answer": str(a + b + c)}
        )
    return rows


def heldout(cfg, model_dir: str, held_file: Path) -> tuple[list, list, list]:
    """Greedy episodes on the held-out sums: (success per prompt, called the tool per prompt, texts)."""
    from alignkit.config import ModelConfig
    from alignkit.data.prompts import load_prompt_examples
    from alignkit.generation.decode import sampling_params
    from alignkit.models import load_model, load_tokenizer
    from alignkit.train.episodes import EpisodeSampler

    mc = ModelConfig(name_or_path=model_dir)
    tokenizer, model = load_tokenizer(mc), load_model(mc, for_training=False)
    examples = load_prompt_examples(str(held_file)).examples
    sampler = EpisodeSampler(cfg, tokenizer)
    samples, rewards = sampler.sample(
        model, examples, list(range(len(examples))), sampling_params(cfg.generation, n=1, greedy=True), cfg.seed, 16
    )
    called = [float(g[0].episode.counts.get("tool_calls", 0) > 0) for g in samples]
    texts = [[m["content"] for m in g[0].episode.messages[len(DEMO) + 2 :]] for g in samples]
    return rewards[:, 0].tolist(), called, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="GRPO steps of 4 prompts x 4 episodes")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--out", default="runs/example_tools_cpu")
    ap.add_argument("--heldout", type=int, default=N_HELDOUT, help="held-out sums")
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers", help="who samples episodes")
    args = smoke.parse_args(ap, steps=1, heldout=4)

    from alignkit.config import load_config
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.models import default_model_dir
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    train_file, held_file = out / "train.jsonl", out / "heldout.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in sums(400, seed=1)))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in sums(args.heldout, seed=2)))
    model = smoke.tiny_model_dir(out) if args.smoke else str(default_model_dir())
    cfg = load_config(
        None,
        [
            "recipe=grpo",
            f"model.name_or_path={model}",
            f"data.train={train_file}",
            "data.eval_fraction=0",
            "data.max_length=448",
            "env.name=calculator",
            "env.max_turns=2",
            "generation.num_samples=4",
            "generation.max_new_tokens=40",
            "generation.temperature=1.0",
            "generation.batch_size=4",
            "train.batch_size=4",
            f"train.max_steps={args.steps}",
            f"train.learning_rate={args.lr}",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "train.log_every=1",
            "train.report_to=[]",
            f"output_dir={out / 'run'}",
            f"generation.backend={args.backend}",
            *(["generation.vllm_kv_cache_gib=0.5"] if args.backend == "vllm" else []),
        ],
    )
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    rows = read_metrics(result.run_dir, "train")
    before, called_before, _ = heldout(cfg, model, held_file)
    after, called_after, texts = heldout(cfg, str(result.run_dir / "final"), held_file)
    d = paired_bootstrap(before, after)
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    print(
        f"\n{args.steps} GRPO steps in {minutes:.1f} min (sampling "
        f"{100 * sum(r['time/generation_s'] for r in rows) / sum(r['step_time_s'] for r in rows):.0f}% of step time)"
    )
    print(
        f"training episodes, first 5 steps -> last 5: reward {mean(first, 'reward'):.3f} -> "
        f"{mean(last, 'reward'):.3f}, "
        f"tool calls per episode {mean(first, 'episode/tool_calls'):.2f} -> {mean(last, 'episode/tool_calls'):.2f}, "
        f"turns {mean(first, 'episode/turns'):.2f} -> {mean(last, 'episode/turns'):.2f}"
    )
    print(
        f"held-out tool-call rate before={sum(called_before) / len(called_before):.3f} "
        f"after={sum(called_after) / len(called_after):.3f}"
    )
    print(f"held-out example after: {texts[0]}")
    print(
        f"change {d.diff:+.3f}, 95% paired bootstrap interval [{d.lo:+.3f}, {d.hi:+.3f}]; "
        f"{d.improved} prompts improved, {d.worsened} got worse"
    )
    print(f"heldout_success before={d.before:.3f} after={d.after:.3f} n={d.n}")


if __name__ == "__main__":  # vLLM's engine starts worker processes that import this file
    main()
