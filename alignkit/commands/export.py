"""`alignkit export`: a checkpoint as one Hugging Face model directory."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint (sharded or not) as one Hugging Face model directory")
    p.add_argument("checkpoint", help="a checkpoint-N directory of a run")
    p.add_argument("output", help="the directory to write (AutoModelForCausalLM.from_pretrained loads it)")
    p.add_argument(
        "--module",
        default="policy",
        help="which trained module: policy (default) or another a recipe trains, e.g. value (PPO)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model that needs the code of its "
        "repository (the checkpoint's saved config alone never turns that on)",
    )
    p.add_argument(
        "--adapters-only",
        action="store_true",
        help="write the LoRA adapters as a PEFT adapter directory instead of a merged model",
    )
    p.set_defaults(fn=run)


def run(args) -> int:
    from alignkit.train.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        args.output,
        args.module,
        trust_remote_code=args.trust_remote_code,
        adapters_only=args.adapters_only,
    )
    what = "LoRA adapters" if args.adapters_only else args.module
    print(f"alignkit: {what} of {args.checkpoint} written to {out}")
    return 0
