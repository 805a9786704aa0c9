"""`alignkit data show` (one example as the trainer sees it) and the data tools of
`alignkit.datatools` (`data synth|judge|...`, `iterate`)."""

from __future__ import annotations

from alignkit.commands.common import add_config_args, load_run_config
from alignkit.errors import AlignkitError


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect data as the trainer sees it")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("show", help="validate the data and show one tokenized example with its loss mask")
    add_config_args(q)
    q.add_argument("--index", type=int, default=0, help="which training example to show")
    q.add_argument(
        "--episode",
        action="store_true",
        help="with env.name: load the model and sample one multi-turn "
        "episode of the example, showing the scored (model) and context-only (environment) tokens",
    )
    q.set_defaults(fn=show)
    from alignkit.datatools.commands import add_parsers as add_data_tools

    add_data_tools(dsub, sub)


def show(args) -> int:
    from alignkit.models import load_tokenizer
    from alignkit.registries import recipes as registry

    cfg = load_run_config(args)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    recipe = registry.get(cfg.recipe).load()(cfg, tokenizer)
    data = recipe.prepare()
    for note in data.notes:
        print(note)
    if not 0 <= args.index < len(data.train):
        raise AlignkitError(f"--index {args.index} is out of range: {len(data.train)} training examples.")
    print(f"\nexample {args.index} (recipe {cfg.recipe}, {data.sources_of('train', [data.train[args.index]])[0]}):")
    print(recipe.show_example(data, args.index))
    if args.episode:
        if getattr(recipe, "episodes", None) is None:
            raise AlignkitError("--episode samples a multi-turn episode: set `env.name` (e.g. env.name=calculator).")
        from alignkit.models import load_model
        from alignkit.train.episodes import show_episode

        model = load_model(cfg.model, for_training=False, cache_dir=cfg.cache_dir)
        print("\n" + show_episode(recipe, model, args.index))
    return 0
