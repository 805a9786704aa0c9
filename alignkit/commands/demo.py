"""`alignkit demo`: align the bundled model on CPU and measure before/after."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="align the bundled SmolLM2-135M-Instruct on CPU and measure before/after")
    p.add_argument("--output-dir", default="runs/demo", help="where the run, results and aligned model go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="training settings on top of the demo's, e.g. lora.enabled=true lora.r=16 model.quantization=nf4",
    )
    p.set_defaults(fn=run)


def run(args) -> int:
    from alignkit.demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, progress=not args.no_progress, overrides=args.overrides)
    return 0
