"""The `alignkit` command.

    alignkit train --config run.yaml [key=value ...] [--resume]
    alignkit data show --config run.yaml [--index N]
    alignkit losses
    alignkit demo
"""

from __future__ import annotations

import argparse
import sys

from alignkit import __version__
from alignkit.errors import AlignkitError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see --help-config)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_steps=10 loss.beta=0.2")
    p.add_argument("--help-config", action="store_true", help="list every config key with its meaning")


def _load(args):
    from alignkit.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from alignkit.train.loop import train

    cfg = _load(args)
    result = train(cfg, resume=args.resume)
    if result.eval_metrics:
        shown = {k: round(v, 4) for k, v in result.eval_metrics.items()}
        print(f"eval: {shown}")
    return 0


def cmd_data_show(args) -> int:
    from alignkit.data.tokenize import explain
    from alignkit.models import load_tokenizer
    from alignkit.train.recipes import make_recipe

    cfg = _load(args)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    data = make_recipe(cfg, tokenizer).prepare()
    for note in data.notes:
        print(note)
    if not 0 <= args.index < len(data.train):
        raise AlignkitError(f"--index {args.index} is out of range: {len(data.train)} training examples.")
    item = data.train[args.index]
    print(f"\nexample {args.index} (recipe {cfg.recipe}):")
    if cfg.recipe == "sft":
        print(explain(tokenizer, item.prompt_ids, item.completion_ids))
    elif cfg.recipe == "negative":  # the samples come from the model at training time
        from alignkit.data.negative import tokenize_groups

        (group,), _ = tokenize_groups([item], [[]], tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
        print(explain(tokenizer, group.prompt_ids, group.completions[0], label="rejected"))
        print(f"\n(+ {cfg.generation.num_samples} completions sampled from the model when training starts)")
    else:
        print(explain(tokenizer, item.prompt_ids, item.chosen_ids, label="chosen"))
        print()
        print(explain(tokenizer, item.prompt_ids, item.rejected_ids, label="rejected"))
    return 0


def cmd_losses(args) -> int:
    from alignkit import losses

    rows = [(s.name, "yes" if s.needs_reference else "no", s.data,
             ", ".join(f"{k}={v}" for k, v in s.params.items()), s.summary, s.citation)
            for s in losses.available()]
    if args.markdown:
        print("| name | reference | data | parameters | what it does | paper |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print("| " + " | ".join((f"`{r[0]}`",) + r[1:]) + " |")
        return 0
    for name, ref, data, params, summary, cite in rows:
        print(f"{name:<10} reference: {ref:<3}  data: {data:<7} {params}")
        print(f"           {summary}")
        print(f"           {cite}")
    return 0


def cmd_demo(args) -> int:
    from alignkit.demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models with human preferences.")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (SFT or the DPO family) from a config")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("data", help="inspect data as the trainer sees it")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("show", help="validate the data and show one tokenized example with its loss mask")
    _add_config_args(q)
    q.add_argument("--index", type=int, default=0, help="which training example to show")
    q.set_defaults(fn=cmd_data_show)

    p = sub.add_parser("losses", help="list the registered loss functions")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(fn=cmd_losses)

    p = sub.add_parser("demo", help="align the bundled SmolLM2-135M-Instruct on CPU and measure before/after")
    p.add_argument("--output-dir", default="runs/demo", help="where the run, results and aligned model go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "help_config", False):
        from alignkit.config import format_help

        print("Config keys (YAML nesting or dotted key=value overrides):\n")
        print(format_help())
        return 0
    try:
        return args.fn(args)
    except AlignkitError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
