"""`alignkit average`: the weight average of several fine-tuned models (WARM, arXiv 2401.12187)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "average",
        help="average the weights of models fine-tuned from one initialisation (WARM reward models)",
    )
    p.add_argument("models", nargs="+", help="model directories (e.g. the final/ of reward runs with other seeds)")
    p.add_argument("--output", required=True, help="the directory to write the averaged model to")
    p.set_defaults(fn=run)


def run(args) -> int:
    from alignkit.train.export import average_models

    out = average_models(args.models, args.output)
    print(f"alignkit: the mean of {len(args.models)} models written to {out}")
    return 0
