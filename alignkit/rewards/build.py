"""The one way to turn a reward spec into a reward callable, for training, evaluation and generation.

A spec is what a user writes in `online.rewards` or after `--reward`:
- a built-in name: `"numeric_match"`, `"regex"`, `"length"`, `"keywords"`, `"reasoning_format"`
  (`alignkit.rewards.verifiable`);
- a Python function: `"my_rewards.py:score"` or `"package.module:score"`;
- a reward-model directory, or a hub id `org/name`: `"runs/rm/final"` (`alignkit.rewards.model.RewardModel`);
- a mapping with parameters: `{name: keywords, required: [please]}`, `{name: runs/rm/final,
  weights: {helpful: 0.8, harmless: 0.6}}` (a multi-objective model's direction);
- a judge model asked whether replies follow written principles: `{name: judge, principles:
  principles.yaml, model: PATH_OR_ID, endpoint: URL}` (`alignkit.rewards.judge`; `model` defaults to
  the bundled model, `endpoint` to none: a local model);
- a calibrated reward for inference-aware alignment (InfAlign, arXiv 2412.19792): `{name: calibrated,
  reward: INNER_SPEC, k: 16, transform: bon|won|identity, n: 4, t: null, model: PATH_OR_ID,
  max_new_tokens: 64, temperature: 1.0}` (`alignkit.rewards.calibration`; `k` reference samples per
  prompt from `model`, default the bundled model);
- an ensemble of rewards combined conservatively: `{name: ensemble, members: [SPEC, ...], combine:
  mean|min|mean_minus_std, k: 1.0}` (`alignkit.rewards.ensemble`; arXiv 2310.02743);
- a list of those, each with an optional `weight` (default 1.0): a `WeightedSum`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from alignkit.errors import ConfigError
from alignkit.rewards.functions import load_reward_function
from alignkit.rewards.verifiable import BUILTINS, WeightedSum, is_number, require
from alignkit.suggest import did_you_mean


def parse_reward_arg(text: str):
    """A --reward value on a command line: a name or path, or a JSON mapping such as
    '{"name": "keywords", "required": ["cat"]}' or '{"name": "judge", "principles": "p.yaml"}'."""
    import json

    from alignkit.errors import AlignkitError

    if text.lstrip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise AlignkitError(
                f"--reward {text!r} is not valid JSON ({e.msg} at column {e.colno}); write it as "
                '\'{"name": "keywords", "required": ["word"]}\'.'
            ) from None
    return text


def build_reward(spec, *, weights: dict | None = None, device=None, batch_size: int = 16):
    """A reward callable from `spec` (see the module docstring). `weights`, `device` and
    `batch_size` apply to reward models given by a plain path (a mapping may set its own
    `weights`)."""
    model_options = dict(weights=weights, device=device, batch_size=batch_size)
    if isinstance(spec, (list, tuple)):
        require(spec, "reward: an empty list of rewards; give at least one.")
        return WeightedSum([_build_term(item, model_options) for item in spec])
    if isinstance(spec, dict) and "weight" in spec:
        return WeightedSum([_build_term(spec, model_options)])
    return _build_term(spec, model_options)[0]


def _build_term(spec, model_options: dict) -> tuple:
    """One string or mapping -> (reward, weight)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    require(isinstance(spec, dict), f"reward: expected a name or a mapping with `name`; got {spec!r}.")
    params = dict(spec)
    name, weight = params.pop("name", None), params.pop("weight", 1.0)
    require(
        isinstance(name, str),
        f"reward: {spec!r} needs a `name`: one of {', '.join(BUILTINS)}, "
        "a Python function as `file.py:function`, or a reward-model directory.",
    )
    require(is_number(weight), f"reward {name}: `weight` must be a finite number; got {weight!r}.")
    if name in BUILTINS:
        return _construct(name, params), float(weight)
    if name == "judge":
        return _judge(params, model_options), float(weight)
    if name == "calibrated":
        return _calibrated(params, model_options), float(weight)
    if name == "ensemble":
        return _ensemble(params, model_options), float(weight)
    if Path(name).expanduser().is_dir() or _hub_id(name):
        from alignkit.rewards.model import RewardModel  # loads transformers: only when a model is asked for

        unknown = sorted(set(params) - {"weights", "aggregate", "per_step"})
        require(
            not unknown,
            f"reward {name} is a reward model; its options are `weights` (a direction over its objectives) "
            f"and, for a process reward model, `aggregate` (min, prod or last) or `per_step` (GRPO, RLOO and "
            f"PPO credit each step); got {', '.join(unknown)}.",
        )
        options = dict(model_options, **params)
        path = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
        return RewardModel(path, **options), float(weight)
    if ":" in name:
        require(
            not params,
            f"reward {name} is a Python function and takes no parameters; got "
            f"{', '.join(params)}. Only `weight` may be given with it.",
        )
        return load_reward_function(name), float(weight)
    hint = did_you_mean(name, BUILTINS)
    raise ConfigError(
        f"unknown reward `{name}`.{hint} Built-in rewards: {', '.join(BUILTINS)}; a judge as "
        "{name: judge, principles: FILE}; a calibrated reward as {name: calibrated, reward: SPEC}; an "
        "ensemble as {name: ensemble, members: [SPEC, SPEC]}; "
        "or a Python "
        "function as `file.py:function` or `module:function`; or a reward-model directory (no "
        f"directory {name} exists)."
    )


JUDGE_OPTIONS = ("principles", "model", "endpoint", "tokenizer", "api_key_file")


def _check_options(name: str, params: dict, allowed: tuple) -> None:
    """A key `allowed` does not list is an error naming the allowed ones (and the closest)."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        hint = did_you_mean(unknown[0], allowed)
        raise ConfigError(
            f"reward {name}: unknown option(s) {', '.join(f'`{k}`' for k in unknown)}; its options "
            f"are {', '.join(allowed)} (and weight).{hint}"
        )


def _judge(params: dict, model_options: dict):
    """`{name: judge, principles: FILE, model: ..., endpoint: ..., tokenizer: ..., api_key_file: ...}`
    -> a PrincipleJudge. With an endpoint, `tokenizer` (a local copy of the served model's) gives
    exact option log-probs, and `api_key_file` holds the server's key (e.g. the token file of
    `alignkit vllm-serve`). The principles file is read before the judge model is loaded, so a
    mistake in it costs no model load."""
    _check_options("judge", params, JUDGE_OPTIONS)
    require(
        isinstance(params.get("principles"), str),
        "reward judge needs `principles`: a YAML file with "
        "`principles: [...]`, e.g. {name: judge, principles: p.yaml}.",
    )
    for key in ("model", "endpoint", "tokenizer", "api_key_file"):
        require(
            params.get(key) is None or isinstance(params[key], str),
            f"reward judge: `{key}` must be a string; got {params.get(key)!r}.",
        )
    for key in ("tokenizer", "api_key_file"):
        require(
            params.get(key) is None or params.get("endpoint"),
            f"reward judge: `{key}` is for an `endpoint`; "
            "a local judge model uses its own tokenizer and needs no key. Drop it or set `endpoint`.",
        )
    api_key = None
    if params.get("api_key_file"):
        try:
            api_key = open(params["api_key_file"], encoding="utf-8").read().strip()
        except OSError as e:
            raise ConfigError(
                f"reward judge: cannot read `api_key_file` {params['api_key_file']}: {e.strerror}."
            ) from None
    from alignkit.generation.text_models import text_model  # loads transformers: only when a judge is asked for
    from alignkit.rewards.judge import PrincipleJudge
    from alignkit.rewards.principles import load_principles

    load_principles(params["principles"])  # its mistakes before the judge model loads
    device = model_options["device"]
    lm = text_model(
        model=params.get("model"),
        endpoint=params.get("endpoint"),
        device="auto" if device is None else str(device),
        batch_size=model_options["batch_size"],
        tokenizer=params.get("tokenizer"),
        api_key=api_key,
    )
    return PrincipleJudge.from_file(lm, params["principles"])


CALIBRATED_OPTIONS = ("reward", "k", "transform", "n", "t", "model", "max_new_tokens", "temperature")


def _calibrated(params: dict, model_options: dict):
    """`{name: calibrated, reward: SPEC, k, transform, n, t, model, max_new_tokens, temperature}` ->
    a CalibratedReward whose reference samples come from `model` (k per prompt, sampled once)."""
    _check_options("calibrated", params, CALIBRATED_OPTIONS)
    require(
        "reward" in params,
        "reward calibrated needs `reward`: the reward to calibrate, e.g. {name: calibrated, reward: runs/rm/final}.",
    )
    k, new_tokens = params.get("k", 16), params.get("max_new_tokens", 64)
    temperature, model = params.get("temperature", 1.0), params.get("model")
    for key, value in (("k", k), ("max_new_tokens", new_tokens)):
        require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"reward calibrated: `{key}` must be a positive integer; got {value!r}.",
        )
    require(
        is_number(temperature) and temperature > 0,
        "reward calibrated: `temperature` must be a positive "
        f"number (the reference samples must differ to calibrate against); got {temperature!r}.",
    )
    require(model is None or isinstance(model, str), f"reward calibrated: `model` must be a string; got {model!r}.")
    from alignkit.generation.decode import SamplingParams
    from alignkit.generation.text_models import text_model  # loads transformers: only when asked for
    from alignkit.rewards.calibration import CalibratedReward

    inner = build_reward(params["reward"], **model_options)
    device = model_options["device"]
    lm = text_model(
        model=model, device="auto" if device is None else str(device), batch_size=model_options["batch_size"]
    )
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=float(temperature), n=k)

    def sample_reference(prompts: list) -> list:
        conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        return lm.chat(conversations, sampling)

    return CalibratedReward(
        inner, sample_reference, transform=params.get("transform", "bon"), n=params.get("n", 4), t=params.get("t")
    )


ENSEMBLE_OPTIONS = ("members", "combine", "k")


def _ensemble(params: dict, model_options: dict):
    """`{name: ensemble, members: [SPEC, ...], combine: mean|min|mean_minus_std, k}` -> an
    EnsembleReward of the members (named member1, member2, ... in the logged parts)."""
    from alignkit.rewards.ensemble import EnsembleReward

    _check_options("ensemble", params, ENSEMBLE_OPTIONS)
    members = params.get("members")
    require(
        isinstance(members, list) and len(members) >= 2,
        "reward ensemble needs `members`: a list of two or more rewards, e.g. "
        "{name: ensemble, members: [runs/rm1/final, runs/rm2/final], combine: min}.",
    )
    require(
        "k" not in params or params.get("combine") == "mean_minus_std",
        "reward ensemble: `k` weights the members' standard deviation in combine: mean_minus_std; drop it "
        f"or use that combine (got combine: {params.get('combine', 'mean')}).",
    )
    built = []
    for i, member in enumerate(members):
        reward, weight = _build_term(member, model_options)
        require(weight == 1.0, f"reward ensemble: member {i + 1} has a `weight`; members are combined, not weighted.")
        built.append(reward)
    names = [f"member{i + 1}" for i in range(len(built))]
    return EnsembleReward(built, names, combine=params.get("combine", "mean"), k=params.get("k", 1.0))


def _hub_id(name: str) -> bool:
    """`org/name` with no file suffix and no local path prefix: a reward model on the hub."""
    return (
        name.count("/") == 1
        and ":" not in name
        and not name.startswith((".", "/", "~"))
        and not Path(name).suffix
        and not Path(name).exists()
    )


def _construct(name: str, params: dict):
    cls = BUILTINS[name]
    signature = inspect.signature(cls).parameters
    for key in params:
        if key not in signature:
            hint = did_you_mean(key, signature)
            raise ConfigError(
                f"`{key}` is not a parameter of reward `{name}` (its parameters: {', '.join(signature)}, weight).{hint}"
            )
    missing = [k for k, p in signature.items() if p.default is p.empty and k not in params]
    if missing:
        raise ConfigError(
            f"reward `{name}` needs {', '.join(f'`{k}`' for k in missing)}, e.g. {{name: {name}, {missing[0]}: ...}}."
        )
    return cls(**params)
