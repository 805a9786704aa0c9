"""`alignkit fit-value`: a prefix value head for controlled decoding."""

from __future__ import annotations

from alignkit.commands.common import add_prompt_args, sampling_params, strategy_inputs


def register(sub) -> None:
    p = sub.add_parser("fit-value", help="fit a prefix value head for controlled decoding on the model's own samples")
    p.add_argument("--model", required=True, help="the model controlled decoding will steer")
    add_prompt_args(p)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--l2", type=float, help="ridge penalty (default: chosen by the held-out fit from 0.1 to 1e5)")
    p.add_argument("--output", required=True, help="directory for value_head.safetensors and value_head.json")
    p.set_defaults(fn=run)


def run(args) -> int:
    import dataclasses
    import json

    from alignkit.inference.value import fit_value_head

    model, tokenizer, reward, prompts, cols, ids, _ = strategy_inputs(args)
    params = dataclasses.replace(sampling_params(args), n=args.n)
    head = fit_value_head(
        model,
        tokenizer,
        reward,
        prompts,
        ids,
        cols,
        params,
        l2=args.l2,
        seed=args.seed,
        batch_size=args.batch_size,
        model_name=args.model,
    )
    path = head.save(args.output)
    print(json.dumps(head.meta, indent=2))
    r2 = head.meta["heldout_r2"]
    if r2 is None:
        print(
            f"alignkit: value head written to {path}; the held-out rewards were all equal, so the fit cannot "
            "be judged: the reward gives no signal on these samples (try other prompts or a larger --n)"
        )
    else:
        print(
            f"alignkit: value head written to {path} (held-out R^2 {r2:.3f}; near 0 or below means the value "
            "carries little signal: sample more prompts or a larger --n)"
        )
    return 0
