"""`alignkit w2s`: train a strong model on a weak model's labels and measure the gap it recovers."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "w2s",
        help="weak-to-strong: weak supervisor, its labels, strong students (plain and with the confidence "
        "loss), the strong ceiling; accuracies, PGR and the deception splits",
    )
    p.add_argument("--weak", required=True, help="the weak model (directory or hub id)")
    p.add_argument("--strong", required=True, help="the strong model (directory or hub id)")
    p.add_argument("--data", required=True, help="preference pairs (any format `alignkit train` reads)")
    p.add_argument("--output-dir", required=True, help="the run directory (every stage; run again to resume)")
    p.add_argument("--split", default="0.4,0.4,0.2", help="shares of the pairs: weak_train,transfer,test")
    p.add_argument(
        "--config", help="a YAML training config the stages share (recipe, data and model are set per stage)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every stage")
    p.add_argument("--weak-set", action="append", default=[], help="key=value for the weak model's stage")
    p.add_argument("--strong-set", action="append", default=[], help="key=value for the strong model's stages")
    p.add_argument("--alpha", type=float, default=0.75, help="the confidence loss's alpha (paper: 0.75)")
    p.add_argument("--warmup", type=float, default=0.2, help="share of training over which alpha warms up")
    p.add_argument("--limit", type=int, help="use at most this many pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=run)


def run(args) -> int:
    from alignkit.distributed import env_rank
    from alignkit.errors import AlignkitError
    from alignkit.w2s import W2SConfig, run_w2s, summary_lines

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise AlignkitError(f"--split {args.split!r}: three shares, e.g. 0.4,0.4,0.2") from None
    cfg = W2SConfig(
        weak=args.weak,
        strong=args.strong,
        data=args.data,
        output_dir=args.output_dir,
        split=split,
        config=args.config,
        overrides=args.overrides,
        weak_overrides=args.weak_set,
        strong_overrides=args.strong_set,
        alpha=args.alpha,
        warmup=args.warmup,
        limit=args.limit,
        seed=args.seed,
        progress=not args.no_progress,
    )
    summary = run_w2s(cfg)
    if env_rank() == 0:
        for line in summary_lines(summary):
            print(line)
        print(f"alignkit: weak-to-strong summary in {args.output_dir}/summary.json")
    return 0
