"""`alignkit generate`: an inference-time alignment strategy, its reward and its cost."""

from __future__ import annotations

from alignkit.commands.common import (
    add_prompt_args,
    add_steer_args,
    add_strategy_args,
    check_steer_args,
    make_sampler,
    sampling_params,
    steered,
    strategy_inputs,
    strategy_options,
)
from alignkit.errors import AlignkitError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate with an inference-time alignment strategy and report reward and cost")
    p.add_argument("--model", required=True, help="a model directory or hub id")
    add_prompt_args(p)
    add_strategy_args(p)
    add_steer_args(p)
    p.add_argument("--output", help="write one JSON line per prompt: completion, reward, candidates")
    p.set_defaults(fn=run)


def run(args) -> int:
    import json

    from alignkit.inference.strategies import run_strategy

    check_steer_args(args)
    model, tokenizer, reward, prompts, cols, ids, cut = strategy_inputs(args)
    if args.steer and getattr(args, "backend", "transformers") == "vllm":
        raise AlignkitError(
            "--steer adds vectors inside alignkit's own forward passes; a vLLM engine runs its own: "
            "use --backend transformers."
        )
    sampler = make_sampler(args, args.model, tokenizer)
    try:
        with steered(args, model):
            result = run_strategy(
                args.strategy,
                model,
                tokenizer,
                reward,
                prompts,
                cols,
                sampling_params(args),
                strategy_options(args),
                seed=args.seed,
                batch_size=args.batch_size,
                prompt_ids=ids,
                progress=True,
                sampler=sampler,
            )
    finally:
        if sampler is not None:
            sampler.close()  # the engine's processes end with the command, not at interpreter exit
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for p, c in zip(prompts, result.choices):
                f.write(
                    json.dumps(
                        {
                            "prompt": p,
                            "completion": c.completion,
                            "reward": c.reward,
                            "chosen": c.chosen,
                            "candidates": c.candidates,
                            "candidate_rewards": c.candidate_rewards,
                            "new_tokens": c.tokens,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    summary = result.summary()
    summary["prompts_truncated"] = cut
    print(json.dumps(summary, indent=2))
    return 0
