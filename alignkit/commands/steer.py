"""`alignkit steer fit`: steering vectors from preference pairs."""

from __future__ import annotations

from alignkit.errors import AlignkitError


def register(sub) -> None:
    p = sub.add_parser("steer", help="representation engineering: fit steering vectors from preference pairs")
    ssub = p.add_subparsers(dest="steer_command", required=True)
    q = ssub.add_parser(
        "fit", help="directions between chosen and rejected hidden states, per layer, with their held-out separation"
    )
    q.add_argument("--model", required=True)
    q.add_argument("--data", required=True, help="preference pairs (any format `alignkit train` reads)")
    q.add_argument("--layers", type=int, nargs="+", required=True)
    q.add_argument("--method", choices=["mean_diff", "pca", "probe"], default="mean_diff")
    q.add_argument("--limit", type=int, default=None, help="use the first N pairs")
    q.add_argument("--heldout-fraction", type=float, default=0.2, help="the last pairs, kept out of the fit")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--out", required=True, help="directory for steering.safetensors and steering.json")
    q.set_defaults(fn=fit)


def fit(args) -> int:
    import json

    from alignkit.config import ModelConfig
    from alignkit.data.formats import load_preference_examples
    from alignkit.eval.steering import fit_from_pairs
    from alignkit.inference.steering import save_vectors, steering_fingerprint
    from alignkit.models import load_model, load_tokenizer

    result = load_preference_examples(args.data, on_bad_record="skip")
    if result.skipped:
        print(
            f"alignkit: {len(result.skipped)} records of {args.data} skipped ({result.skipped[0][0]}: "
            f"{result.skipped[0][1]})"
        )
    examples = result.examples[: args.limit]
    mc = ModelConfig(name_or_path=args.model)
    tokenizer, model = load_tokenizer(mc), load_model(mc, for_training=False)
    try:
        dirs, held = fit_from_pairs(
            model,
            tokenizer,
            examples,
            args.layers,
            method=args.method,
            heldout_fraction=args.heldout_fraction,
            batch_size=args.batch_size,
            progress=True,
        )
    except ValueError as e:  # e.g. chosen and rejected hidden states that do not differ
        if isinstance(e, AlignkitError):
            raise
        raise AlignkitError(f"steer fit on {args.data} ({len(examples)} pairs): {e}") from None
    out = save_vectors(
        args.out,
        {l: d.vector for l, d in dirs.items()},
        {
            "fingerprint": steering_fingerprint(model),
            "method": args.method,
            "source": args.data,
            "model": args.model,
            "n_pairs": len(examples),
            "heldout_fraction": args.heldout_fraction,
            "heldout": {str(l): v for l, v in held.items()},
        },
    )
    print("layer  held-out accuracy  fisher   norm")
    for l in sorted(dirs):
        print(f"{l:>5}  {held[l]['accuracy']:>17.3f}  {held[l]['fisher']:>6.3f}  {dirs[l].norm:>6.3f}")
    print(json.dumps({"vectors": str(out), "layers": sorted(dirs), "method": args.method}))
    return 0
