"""How often SmolLM2-135M-Instruct calls the calculator before any training, by prompt: the tool
description alone (alignkit's fallback system message, SmolLM2's template having no tools), with
one demonstration episode before the question, and with two. Why `examples/tools_cpu.py` puts one
demonstration in its prompts: GRPO can only reinforce a behaviour the model sometimes samples.

    python bench/tools_prompts.py [--prompts 8] [--samples 4]

Each variant: the held-out sums of the example (three 3-digit numbers), the first model turn only,
up to 40 new tokens; greedy and at temperature 1.0. A reply "calls" when it has a `<tool_call>`
block that parses. Last line: `greedy_calls description=<k>/<n> one_demo=<k>/<n> two_demos=<k>/<n>`.
`--smoke` (examples/smoke.py): the same prompts in seconds, with a tiny random-init model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import smoke  # noqa: E402
import tools_cpu  # noqa: E402

SECOND = [
    {"role": "user", "content": "What is 318 + 240 + 97?"},
    {"role": "assistant", "content": tools_cpu.CALL % "318 + 240 + 97"},
    {"role": "tool", "content": "655"},
    {"role": "assistant", "content": "655"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument(
        "--out",
        help="--smoke only: where its tiny model goes (default: a temporary directory); the full run writes nothing",
    )
    args = smoke.parse_args(ap, prompts=2, samples=2)

    import torch

    from alignkit.config import load_config
    from alignkit.data.prompts import PromptExample
    from alignkit.envs.toolcalls import ToolCall, parse_tool_calls
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import default_model_dir, load_model, load_tokenizer
    from alignkit.train.episodes import EpisodeSampler

    torch.manual_seed(0)
    model = smoke.tiny_model_dir(args.out) if args.smoke else default_model_dir()
    cfg = load_config(
        None, [f"model.name_or_path={model}", "data.train=unused.jsonl", "recipe=grpo", "env.name=calculator"]
    )
    tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model, for_training=False)
    sampler = EpisodeSampler(cfg, tokenizer)
    rows = tools_cpu.sums(args.prompts, seed=2)
    question = lambda r: r["prompt"][-1]  # noqa: E731
    variants = [
        ("description", "tool description only", lambda r: [question(r)]),
        ("one_demo", "+ one demonstration", lambda r: tools_cpu.DEMO + [question(r)]),
        ("two_demos", "+ two demonstrations", lambda r: tools_cpu.DEMO + SECOND + [question(r)]),
    ]
    start = time.perf_counter()
    greedy = {}
    print("| prompt | greedy calls | sampled calls (T=1.0) |\n| --- | --- | --- |")
    for key, name, build in variants:
        convs = [
            sampler.start(sampler.make(), PromptExample(tuple(build(r)), {"answer": r["answer"]}))[0] for r in rows
        ]
        calls = {}
        for label, params in (
            ("greedy", SamplingParams(max_new_tokens=40)),
            ("sampled", SamplingParams(max_new_tokens=40, temperature=1.0, n=args.samples)),
        ):
            replies = [s for group in generate(model, tokenizer, convs, params, batch_size=8, seed=0) for s in group]
            ok = sum(any(isinstance(c, ToolCall) for c in parse_tool_calls(s, "hermes")) for s in replies)
            calls[label] = f"{ok}/{len(replies)}"
        print(f"| {name} | {calls['greedy']} | {calls['sampled']} |")
        greedy[key] = calls["greedy"]
    print(f"\n{time.perf_counter() - start:.0f} s")
    print("greedy_calls " + " ".join(f"{k}={v}" for k, v in greedy.items()))


if __name__ == "__main__":
    main()
