"""Typed run configuration: dataclasses, YAML files and `key=value` overrides.

The docstring line under each field is the single source of help: `alignkit train --help-config`
and the README's config reference are both generated from it (`python -m alignkit.config`).
Unknown keys are errors that suggest the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from alignkit.errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """A local model directory, a Hugging Face hub id, or the bundled default `smollm2-135m-instruct`."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. `auto`: float32 weights for training (bf16 compute comes from `train.precision`)."""
    device: str = "auto"
    """`auto` (cuda > mps > cpu), `cpu`, `cuda`, `cuda:N` or `mps`."""
    attn_implementation: Optional[str] = None
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`); default `sdpa`."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run (only for models you trust)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    freeze_layers: int = 0
    """Freeze the input embeddings and the first N transformer blocks: cheaper steps, fewer trained weights (tied output embeddings freeze too)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the base model then serves as the reference."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: Union[str, list] = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer but the output head."""


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a .jsonl/.json/.parquet/.csv file, a `datasets` directory, or a hub dataset id."""
    eval: Optional[str] = None
    """Held-out data in the same forms; if unset, `eval_fraction` of `train` is held out."""
    eval_fraction: float = 0.05
    """Fraction of the training records held out for evaluation when `eval` is unset (0 disables)."""
    split: Optional[str] = None
    """Split to read from a `datasets` directory or hub dataset (default `train`)."""
    columns: dict = field(default_factory=dict)
    """Map canonical field names to your column names, e.g. `{prompt: question, chosen: good}`."""
    on_bad_record: Literal["error", "skip"] = "error"
    """`error` stops at the first invalid record; `skip` skips invalid records and reports how many."""
    max_length: int = 1024
    """Maximum tokens of prompt + completion; longer examples keep the prompt's end and the completion's start."""
    max_prompt_length: Optional[int] = None
    """Maximum prompt tokens kept when truncating (default: half of `max_length`)."""
    limit: Optional[int] = None
    """Use only the first N records of the training data (quick experiments)."""


@dataclass
class TrainConfig:
    learning_rate: float = 5e-6
    """Peak learning rate of AdamW."""
    batch_size: int = 8
    """Examples (pairs for preference losses) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the effective batch is `batch_size * grad_accum`."""
    epochs: float = 1.0
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warmup from 0."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to 0, or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: `auto` is bf16 autocast on GPUs that support it, else fp32."""
    disable_dropout: bool = True
    """Set dropout to 0 in the policy (as DPO implementations do: dropout makes log-ratios noisy)."""
    logprob_chunk_size: int = 1024
    """Completion positions per chunk when applying the LM head, so [tokens, vocab] logits never exist at once."""
    packing: bool = True
    """Lay each pair (or group) out once as [prompt][chosen][rejected] with a mask that hides chosen from rejected (prefix sharing), and pack several into each row, so no compute goes to padding or repeated prompts."""
    pack_tokens: int = 2048
    """Tokens per packed row (rows grow to fit one longer example). Larger rows waste more attention compute on masked-out blocks without a block-sparse kernel."""
    max_tokens_per_batch: Optional[int] = None
    """Form micro-batches by token budget instead of by count: examples are added while their non-pad tokens (each prompt once when packing) fit; `batch_size` and `eval_batch_size` are then not used. Steps per epoch vary with the data's lengths."""
    forward_tokens: Optional[int] = None
    """Run each micro-batch's forward and backward in pieces of at most this many tokens (whole examples; gradients add up, so the loss and the update are unchanged). Bounds activation memory; pieces of one or two pairs also avoid padding and attention across pairs."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_batch_size: Optional[int] = None
    """Micro-batch size for evaluation and the reference pass (default: `batch_size`)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Number of most recent step checkpoints kept on disk."""
    log_every: int = 1
    """Print and log metrics every N steps."""
    shuffle: bool = True
    """Shuffle the training examples each epoch (seeded)."""
    tensorboard: bool = True
    """Also write TensorBoard events when `tensorboard` is installed."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A NaN or infinite loss or gradient norm: `stop` the run (no update applied, no weights written; the message names the step and the examples of the micro-batch), or `skip_step` (drop that update, count it in `skipped_steps`, go on)."""


@dataclass
class GenerationConfig:
    num_samples: int = 4
    """Completions sampled per prompt (D2O's K self-generated samples)."""
    max_new_tokens: int = 128
    """Longest sampled completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    batch_size: int = 16
    """Prompts generated for at once."""
    stop: list = field(default_factory=list)
    """Stop strings: a completion ends once its text contains one (it is kept)."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """Online recipes: who samples. `transformers`: alignkit's KV-cache loop over the policy itself; `vllm`: a vLLM engine on the same GPU, loaded with the policy's weights before each rollout (written against vLLM's public API, untested here)."""


# The loss a recipe trains with when the config names none.
RECIPE_DEFAULT_LOSS = {"dpo": "dpo", "sft": "sft", "unpaired": "kto", "masked": "mask_dpo", "negative": "d2o",
                       "reward": "bradley_terry", "online_dpo": "dpo", "raft": "sft"}
ONLINE_RECIPES = ("grpo", "rloo", "online_dpo", "raft")


@dataclass
class OnlineConfig:
    rewards: Union[str, list, dict, None] = None
    """Reward of each sampled completion: a built-in (`numeric_match`, `regex`, `length`, `keywords`), a Python function (`file.py:fn` or `module:fn`), a reward-model directory, a mapping with parameters (`{name: keywords, required: [please]}`), or a list of these with `weight`s, summed."""
    kl_coef: float = 0.0
    """GRPO / RLOO: weight of the per-token k3 estimate of KL(policy || reference); 0 keeps no reference model."""
    clip_low: float = 0.2
    """GRPO / RLOO: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """GRPO / RLOO: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """How token losses become the batch loss: `grpo` (mean per sequence, then over sequences), `dapo` (mean over all tokens), `dr_grpo` (sum over tokens / (sequences x generation.max_new_tokens))."""
    scale_rewards: bool = True
    """GRPO: divide advantages by the group's reward std (Dr. GRPO sets false: centering only)."""
    iterations: int = 1
    """Optimizer steps on each batch of samples (GRPO's mu); above 1 the clipped ratio binds."""



@dataclass
class RewardConfig:
    objectives: list = field(default_factory=lambda: ["reward"])
    """Names of the rewards a reward model outputs; more than one needs per-objective `labels` in the data."""
    use_margin: bool = False
    """Read a `margin` field (>= 0) from every record and require r(chosen) - r(rejected) to exceed it (Llama 2)."""


@dataclass
class RunConfig:
    recipe: Literal["sft", "dpo", "unpaired", "masked", "negative", "reward", "grpo", "rloo", "online_dpo", "raft"] = "dpo"
    """`sft`; `dpo` (paired losses, chosen under `loss`); `unpaired` (KTO, BCO on labelled completions); `masked` (Mask-DPO on sentence-labelled pairs); `negative` (D2O on negatives plus the model's own samples); `reward` (a Bradley-Terry reward model); online, sampling as it trains: `grpo`, `rloo`, `online_dpo` (best vs worst sample, `loss` dpo or ipo), `raft` (SFT on the best of k samples)."""
    output_dir: str = "runs/alignkit"
    """Run directory: checkpoints, metrics.jsonl, the final model."""
    seed: int = 0
    """Seed for data order, initialisation of new weights and sampling."""
    reference: Literal["cached", "live"] = "cached"
    """`cached`: reference log-probs computed once before training and stored on disk; `live`: a frozen reference model stays in memory."""
    cache_dir: Optional[str] = None
    """Where cached reference log-probs and converted models go (default `$ALIGNKIT_CACHE` or `~/.cache/alignkit`)."""
    loss: dict = field(default_factory=lambda: {"name": "dpo"})
    """Loss name and hyper-parameters, e.g. `{name: dpo, beta: 0.1}`; `alignkit losses` lists them. Without a name, the recipe's own: dpo, sft, kto (unpaired), mask_dpo (masked), d2o (negative), bradley_terry (reward)."""
    losses: list = field(default_factory=list)
    """Weighted loss terms instead of `loss`, e.g. `[{name: dpo, weight: 1.0}, {name: sft, weight: 0.2}]`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)


# ---------------------------------------------------------------------------------------------
# Field documentation: the string literal under each field, read from the source.


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: docstring line} for a dataclass whose fields carry string docstrings."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def iter_fields(cls: type = RunConfig, prefix: str = ""):
    """Yield (dotted key, type, default, doc) for every leaf field, depth first."""
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield key, tp, default, docs.get(f.name, "")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " | ".join(_type_name(a) for a in args)
        return name + " (optional)" if len(args) < len(typing.get_args(tp)) else name
    return getattr(tp, "__name__", str(tp))


def format_help(markdown: bool = False) -> str:
    """The config reference, as terminal text or a Markdown table."""
    rows = list(iter_fields())
    if markdown:
        out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, tp, default, doc in rows:
            out.append(f"| `{key}` | {_type_name(tp)} | `{default!r}` | {doc} |")
        return "\n".join(out)
    out = []
    for key, tp, default, doc in rows:
        out.append(f"  {key} ({_type_name(tp)}, default {default!r})\n      {doc}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, with type checks and suggestions.


def _valid_keys(cls: type = RunConfig) -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{f.name}.{k}" for k in _valid_keys(hints[f.name])]
    return keys


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _valid_keys(), n=1, cutoff=0.5)
    if not close:  # a misspelt leaf name under the right section, or the right leaf in another one
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in _valid_keys()}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return ConfigError(
        f"{where}unknown config key `{key}`.{hint} "
        "Run `alignkit train --help-config` for the list of keys."
    )


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently coerce) one value against its annotation; raise ConfigError if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where}`{key}` must be one of {', '.join(map(str, choices))}; got {value!r}."
            )
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads `5e-6` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    expected = {str: str, int: int, float: float, bool: bool, dict: dict, list: list}.get(tp)
    if expected is None:
        return value
    if isinstance(value, bool) and expected is not bool:
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(
            f"{where}`{key}` must be a {expected.__name__}; got {value!r} ({type(value).__name__})."
        )
    return value


def _build(cls: type, data: dict, prefix: str, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}`{prefix.rstrip('.') or 'config'}` must be a mapping; got {data!r}.")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown_key_error(key, where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v or {}, key + ".", where)
        else:
            kwargs[k] = _check_value(v, tp, key, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key.sub=value` override; the value is read as YAML (`3`, `1e-5`, `true`, `[a, b]`)."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like `key=value` (for example `train.max_steps=10`).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override `{text}`: the value is not valid YAML ({e}).") from None
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"override `{key}`: `{p}` is not a section.")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Build a RunConfig from an optional YAML file, then `key=value` overrides applied in order.

    `base` holds defaults that sit under the file (recipes and the demo use it)."""
    data: dict = dict(base or {})
    where = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found.")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
        data = _merge(data, loaded)
        where = f"{path}: "
    for text in overrides:
        key, value = parse_override(text)
        if key == "loss" or key.startswith("loss."):
            _set_dotted(data, key, value)  # loss params are checked against the loss's signature later
            continue
        if key not in _valid_keys() or key in ("model", "lora", "data", "train", "generation", "reward"):
            raise _unknown_key_error(key, "override: ")
        _set_dotted(data, key, value)
    default_loss = RECIPE_DEFAULT_LOSS.get(data.get("recipe", RunConfig.recipe), "dpo")
    if "loss" not in data and not data.get("losses"):
        data["loss"] = {"name": default_loss}
    elif isinstance(data.get("loss"), dict) and "name" not in data["loss"]:
        # `loss.beta=0.2` alone tunes the recipe's default loss rather than replacing the mapping.
        data["loss"] = {"name": default_loss, **data["loss"]}
    cfg = _build(RunConfig, data, "", where)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    t = cfg.train
    positive = {
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.logprob_chunk_size": t.logprob_chunk_size,
        "train.pack_tokens": t.pack_tokens,
        "data.max_length": cfg.data.max_length,
        "generation.num_samples": cfg.generation.num_samples,
        "generation.max_new_tokens": cfg.generation.max_new_tokens,
        "generation.batch_size": cfg.generation.batch_size,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"`{key}` must be positive; got {v}.")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"`train.max_steps` must be positive; got {t.max_steps}.")
    _check_ranges(cfg)
    if cfg.recipe in ONLINE_RECIPES:
        if cfg.online.rewards is None:
            raise ConfigError(f"recipe {cfg.recipe} samples completions and needs a reward: set `online.rewards`, e.g. "
                              "`online.rewards=numeric_match` or `online.rewards=my_rewards.py:score`.")
        if t.max_tokens_per_batch is not None or t.forward_tokens is not None:
            raise ConfigError(f"recipe {cfg.recipe} batches prompts by count (train.batch_size prompts, each with "
                              "generation.num_samples completions); unset `train.max_tokens_per_batch` and `train.forward_tokens`.")
        if cfg.online.iterations < 1:
            raise ConfigError(f"`online.iterations` must be >= 1; got {cfg.online.iterations}.")
        if cfg.recipe in ("grpo", "rloo", "online_dpo") and cfg.generation.num_samples < 2:
            raise ConfigError(f"recipe {cfg.recipe} compares samples of the same prompt: "
                              f"`generation.num_samples` must be >= 2; got {cfg.generation.num_samples}.")
    if t.forward_tokens is not None and t.forward_tokens <= 0:
        raise ConfigError(f"`train.forward_tokens` must be positive (or unset); got {t.forward_tokens}.")
    if t.max_tokens_per_batch is not None and t.max_tokens_per_batch <= 0:
        raise ConfigError(f"`train.max_tokens_per_batch` must be positive (or unset to batch by count); "
                          f"got {t.max_tokens_per_batch}.")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"`train.warmup_ratio` must be in [0, 1); got {t.warmup_ratio}.")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"`data.eval_fraction` must be in [0, 1); got {cfg.data.eval_fraction}.")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"`train.adam_betas` must be two numbers; got {t.adam_betas}.")
    mpl = cfg.data.max_prompt_length
    if mpl is not None and not 0 < mpl < cfg.data.max_length:
        raise ConfigError(
            f"`data.max_prompt_length` ({mpl}) must be positive and below `data.max_length` ({cfg.data.max_length})."
        )
    if cfg.model.freeze_layers < 0:
        raise ConfigError(f"`model.freeze_layers` must be >= 0; got {cfg.model.freeze_layers}.")
    objectives = cfg.reward.objectives
    if not objectives or not all(isinstance(o, str) and o for o in objectives) or len(set(objectives)) != len(objectives):
        raise ConfigError(f"`reward.objectives` must be distinct non-empty names, e.g. [helpful, harmless]; got {objectives!r}.")
    g = cfg.generation
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.top_k < 0:
        raise ConfigError(
            f"`generation`: need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got temperature={g.temperature}, "
            f"top_p={g.top_p}, top_k={g.top_k}."
        )
    if not isinstance(cfg.loss, dict) or "name" not in cfg.loss:
        raise ConfigError("`loss` must be a mapping with a `name`, e.g. `loss: {name: dpo, beta: 0.1}`.")


def _check_ranges(cfg: RunConfig) -> None:
    """Numbers outside their meaningful range, caught here rather than deep inside a run (after
    the model load and the reference pass) as a library traceback."""
    t, lo, o = cfg.train, cfg.lora, cfg.online
    rules = [
        ("train.learning_rate", t.learning_rate, t.learning_rate > 0 and math.isfinite(t.learning_rate), "a positive number, e.g. 5e-6"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
        ("train.epochs", t.epochs, t.epochs > 0, "positive"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0: only at the end)"),
        ("train.save_every", t.save_every, t.save_every >= 0, ">= 0 (0: only at the end)"),
        ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, ">= 1 (resuming needs one)"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.eval_batch_size", t.eval_batch_size, t.eval_batch_size is None or t.eval_batch_size > 0, "positive (or unset)"),
        ("lora.r", lo.r, lo.r > 0, "positive"),
        ("lora.alpha", lo.alpha, lo.alpha > 0, "positive"),
        ("lora.dropout", lo.dropout, 0 <= lo.dropout < 1, "in [0, 1)"),
        ("online.kl_coef", o.kl_coef, o.kl_coef >= 0, ">= 0"),
        ("online.clip_low", o.clip_low, 0 <= o.clip_low < 1, "in [0, 1)"),
        ("online.clip_high", o.clip_high, o.clip_high >= 0, ">= 0"),
        ("data.limit", cfg.data.limit, cfg.data.limit is None or cfg.data.limit > 0, "positive (or unset)"),
    ]
    for key, value, ok, want in rules:
        if not ok:
            raise ConfigError(f"`{key}` must be {want}; got {value!r}.")
    if len(t.adam_betas) == 2 and not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"`train.adam_betas` must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {t.adam_betas}.")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


if __name__ == "__main__":  # python -m alignkit.config  -> the README's config reference
    print(format_help(markdown=True))
