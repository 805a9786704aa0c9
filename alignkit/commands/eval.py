"""`alignkit eval`: what alignment did to a model, measured."""

from __future__ import annotations

from pathlib import Path

from alignkit.commands.common import (
    Once,
    add_steer_args,
    add_strategy_args,
    check_steer_args,
    make_sampler,
    parse_ints,
    parse_sweep,
    parse_weights,
    print_eval,
    strategy_options,
    tokenizer_of,
    write_report,
)
from alignkit.errors import AlignkitError


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure what alignment did: accuracies, length bias, win rate, KL, drift")
    p.add_argument(
        "--run",
        help="a training run directory: fills in model (final/), reference, data, beta, "
        "checkpoints and output (RUN/eval) from its config",
    )
    p.add_argument("--model", help="the aligned model (directory or hub id)")
    p.add_argument("--reference", help="the model it started from (needed for implicit rewards, win rate, KL)")
    p.add_argument("--data", help="preference pairs (any format `alignkit train` reads)")
    p.add_argument(
        "--reward",
        action="append",
        default=[],
        help="a reward: reward-model directory, or file.py:function "
        "with signature reward(prompts, completions, **columns) -> list[float]; repeat to combine",
    )
    p.add_argument(
        "--reward-weights", help="direction for a multi-objective reward model, e.g. helpful=0.8,harmless=0.6"
    )
    p.add_argument(
        "--reward-transform",
        choices=["none", "log_sigmoid"],
        default="none",
        help="combine several rewards as a plain sum, or as sum of log sigmoid(r - r_reference) (arXiv 2402.00742)",
    )
    p.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's, else 0.1)")
    p.add_argument("--checkpoints", help="a run directory whose checkpoints to track over training")
    p.add_argument("--num-prompts", type=int, default=64, help="held-out prompts to sample from (win rate, KL)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (1.0 keeps the KL estimate unbiased)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens of prompt + completion (default: the run's data.max_length with --run, else 1024)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="where metrics.json and report.html go (default RUN/eval or runs/eval)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--prompts", help="prompt records for --strategy (default: the prompts of --data)")
    add_strategy_args(p, default=None)
    add_steer_args(p)
    p.add_argument(
        "--steer-sweep",
        help="with --steer: strengths to sweep, e.g. -2,-1,0,1,2, or `paper` "
        "(-8..8, both signs, fine steps near 0); measures what --behaviour-prompts, --accuracy, --data "
        "and --helpfulness give, with the paper's fits (arXiv 2401.16332)",
    )
    p.add_argument(
        "--steer-norm",
        choices=["relative", "absolute"],
        default="relative",
        help="--steer-sweep: a "
        "strength is a multiple of each layer's fitted vector (relative) or the norm added at every "
        "layer (absolute)",
    )
    p.add_argument(
        "--behaviour-prompts",
        help="--steer-sweep: harmful prompt records; the behaviour rate is "
        "refusals minus compliances of sampled replies, in [-1, 1]",
    )
    p.add_argument(
        "--behaviour-judge",
        help="--steer-sweep: who decides refusal or compliance: rule (default, "
        "alignkit.rewards.refusal) or file.py:function",
    )
    p.add_argument(
        "--accuracy",
        help="--steer-sweep: questions with known answers (prompt/question, answer, "
        "optional choices); helpfulness is their accuracy",
    )
    p.add_argument(
        "--helpfulness",
        help="--steer-sweep: prompt/completion records whose per-token NLL is a secondary helpfulness diagnostic",
    )
    p.add_argument(
        "--bon-n",
        help="with --reference and --reward: expected best-of-n win rates against the "
        "reference for these n (e.g. 4,8), from rewards calibrated on --calibration-k reference samples "
        "per prompt (InfAlign)",
    )
    p.add_argument("--calibration-k", type=int, default=16, help="--bon-n: samples per prompt of each model")
    p.add_argument(
        "--representation-layers",
        help="per layer (e.g. 0,4,8,12), how separable chosen and rejected "
        "replies of --data are in the hidden states (held-out probe accuracy, Fisher ratio)",
    )
    add_safety_args(p)
    p.set_defaults(fn=run)


SAFETY_OPTIONS = (
    "harmful_prompts",
    "benign_prompts",
    "safety_judge",
    "safety_judge_reward",
    "safety_judge_threshold",
    "judge_labels",
    "depths",
    "jailbreak_n",
    "safety_samples",
)


def add_safety_args(p) -> None:
    g = p.add_argument_group("safety (--safety)")
    g.add_argument(
        "--safety",
        action="store_true",
        help="measure harmful compliance, over-refusal, refusal at depth and jailbreak robustness "
        "(of --model and, with --reference or --run, of the model it started from)",
    )
    g.add_argument(
        "--harmful-prompts",
        help="harmful requests: prompt records (optional `target` column: a compliant reply) or "
        "preference pairs (the rejected reply is the target), e.g. the HH-RLHF harmless pairs",
    )
    g.add_argument("--benign-prompts", help="benign requests that look sensitive (default: the set alignkit ships)")
    g.add_argument(
        "--safety-judge", help="who labels replies refusal or compliance: rule (default) or file.py:function"
    )
    g.add_argument(
        "--safety-judge-reward",
        help="a reward (anything --reward takes) as the judge: at or above the threshold is a refusal",
    )
    g.add_argument("--safety-judge-threshold", type=float, help="--safety-judge-reward's threshold (default 0)")
    g.add_argument("--judge-labels", help="hand-labelled {prompt, reply, label} records (default: the shipped 60)")
    g.add_argument("--depths", help="refusal at depth: prefill lengths in tokens (default 0,5,10,25,50)")
    g.add_argument("--jailbreak-n", help="best-of-N jailbreaking: the N of the curve (default 1,2,4,8,16)")
    g.add_argument("--safety-samples", type=int, help="sampled replies per harmful prompt (default 4)")


def safety_plan_from_args(args, sampling):
    """A SafetyPlan from the --safety options (None without --safety; an option without it is an error)."""
    if not args.safety:
        given = [k for k in SAFETY_OPTIONS if getattr(args, k) is not None]
        if given:
            raise AlignkitError(f"--{given[0].replace('_', '-')} has no effect without --safety.")
        return None
    from alignkit.eval.safety import DEPTHS, JAILBREAK_N, SafetySettings
    from alignkit.eval.safety_inputs import SafetyPlan

    settings = SafetySettings(
        params=sampling,
        samples=4 if args.safety_samples is None else args.safety_samples,
        depths=tuple(parse_ints(args.depths, "--depths", least=0) or DEPTHS),
        jailbreak_n=tuple(parse_ints(args.jailbreak_n, "--jailbreak-n", least=1) or JAILBREAK_N),
        seed=args.seed,
    )
    return SafetyPlan(
        args.harmful_prompts,
        benign_prompts=args.benign_prompts,
        judge=args.safety_judge,
        judge_reward=args.safety_judge_reward,
        judge_threshold=args.safety_judge_threshold,
        judge_labels=args.judge_labels,
        num_prompts=args.num_prompts,
        settings=settings,
    )


def eval_config_from_args(args):
    """Turn `alignkit eval` arguments (and a run directory's config, with --run) into an EvalConfig."""
    from pathlib import Path

    from alignkit.eval.run import EvalConfig, heldout_settings
    from alignkit.generation.hf import SamplingParams
    from alignkit.rewards import build_reward
    from alignkit.rewards.build import parse_reward_arg

    check_steer_args(args)
    model, reference, data, beta, checkpoints, out = (
        args.model,
        args.reference,
        args.data,
        args.beta,
        args.checkpoints,
        args.output_dir,
    )
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
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    safety = safety_plan_from_args(args, sampling)  # its data errors before any model loads
    rewards = [
        build_reward(parse_reward_arg(spec), weights=parse_weights(args.reward_weights), batch_size=args.batch_size)
        for spec in args.reward
    ]
    return EvalConfig(
        model=model,
        reference=reference,
        data=data,
        rewards=rewards,
        reward_transform=args.reward_transform,
        beta=0.1 if beta is None else beta,
        max_length=1024 if max_length is None else max_length,
        batch_size=args.batch_size,
        num_prompts=args.num_prompts,
        checkpoints=checkpoints,
        output_dir=out or "runs/eval",
        seed=args.seed,
        **how,
        sampling=sampling,
        safety=safety,
        cache_dir=cache_dir,
        progress=not args.no_progress,
        strategy=args.strategy,
        strategy_options=strategy_options(args) if args.strategy else None,
        prompts=args.prompts,
        steer=args.steer,
        steer_strength=args.steer_strength,
        steer_positions=args.steer_positions,
        steer_sweep=parse_sweep(args.steer_sweep),
        steer_norm=args.steer_norm,
        behaviour_prompts=args.behaviour_prompts,
        behaviour_judge=args.behaviour_judge,
        accuracy=args.accuracy,
        helpfulness=args.helpfulness,
        representation_layers=parse_ints(args.representation_layers, "--representation-layers", least=0),
        bon_n=parse_ints(args.bon_n, "--bon-n", least=1),
        calibration_k=args.calibration_k,
    )


def run(args) -> int:
    import dataclasses

    from alignkit.config import DistConfig
    from alignkit.distributed import Dist, env_rank, under_torchrun
    from alignkit.eval.run import run_eval
    from alignkit.models import resolve_device

    cfg = eval_config_from_args(args)
    if args.vllm_server:
        raise AlignkitError(
            "alignkit eval samples from two models (the policy and the reference), and a vLLM server "
            "serves one: drop --vllm-server to start an engine for each in turn (--backend vllm)."
        )
    if args.backend == "vllm":  # engines are started when first needed, one at a time
        from alignkit.models import resolve_model_path

        policy = Once(lambda: make_sampler(args, cfg.model, tokenizer_of(cfg.model)))
        same = cfg.reference and resolve_model_path(cfg.reference) == resolve_model_path(cfg.model)
        cfg = dataclasses.replace(
            cfg,
            sampler=policy,
            reference_sampler=policy
            if same
            else ((lambda: make_sampler(args, cfg.reference, tokenizer_of(cfg.reference))) if cfg.reference else None),
        )
    if under_torchrun():  # the log-prob passes split over the processes
        device = Dist.local_device(resolve_device(cfg.device))
        cfg = dataclasses.replace(
            cfg,
            device=str(device),
            parallel=Dist.from_env(DistConfig(), device, "fp32"),
            progress=cfg.progress and env_rank() == 0,
        )
    try:
        result = run_eval(cfg)
    finally:
        if isinstance(cfg.sampler, Once):
            cfg.sampler.close()  # the engine's processes end with the command
    if cfg.parallel is not None and not cfg.parallel.is_main:
        return 0
    print_eval(result)
    if not args.no_report:  # for a run: one report with its training curves and this evaluation
        write_report(args.run if args.run and Path(cfg.output_dir) == Path(args.run) / "eval" else cfg.output_dir)
    return 0
