"""`final/README.md`: the model card a Hugging Face Hub repository shows for the trained model.

The YAML front matter follows the Hub's model card metadata (huggingface.co/docs/hub/model-cards):
`library_name: transformers` (final/ is a plain transformers directory, and the Hub's "use this
model" snippets come from that name; `alignkit` is not one of the Hub's libraries, so it goes in
`tags` with the recipe and the loss), `pipeline_tag`, `base_model` and `datasets` only when they
are Hub ids (the Hub rejects or mislinks a local path there; the body names local files instead),
and `license` when the base model's own card says it. The body: recipe and loss with their
hyper-parameters, model and LoRA settings, the data and its counts (from RUN/heldout.json), the
steps, the last train and eval metrics, and the command that trains the run again.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from huggingface_hub import try_to_load_from_cache

from alignkit import losses
from alignkit.config import RunConfig, flat_dict, to_dict
from alignkit.data.heldout import FILENAME as HELDOUT
from alignkit.data.heldout import read_heldout
from alignkit.data.readers import looks_local as looks_local
from alignkit.models import DEFAULT_MODEL
from alignkit.registries import recipes as registry

# The bundled default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file (alignkit.models).
BUNDLED = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
_HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")  # a hub snapshot in the HF cache


def write_model_card(
    final_dir: Path,
    cfg: RunConfig,
    run_dir: Path,
    steps: int,
    train_metrics: dict,
    eval_metrics: dict,
    processes: int = 1,
    grad_accum: int | None = None,
    quantization: dict | None = None,
) -> Path:
    """Write `final_dir/README.md`. `processes` and `grad_accum`: what the run used (a resume on another
    number of processes changes grad_accum to keep the global batch); default: the config's.
    `quantization`: a QLoRA run's report on its base (`alignkit.quantization.quantize_base`)."""
    path = Path(final_dir) / "README.md"
    path.write_text(
        model_card(cfg, Path(run_dir), steps, train_metrics, eval_metrics, processes, grad_accum, quantization)
    )
    return path


def model_card(
    cfg: RunConfig,
    run_dir: Path,
    steps: int,
    train_metrics: dict,
    eval_metrics: dict,
    processes: int = 1,
    grad_accum: int | None = None,
    quantization: dict | None = None,
) -> str:
    spec = registry.get(cfg.recipe)
    meta = metadata(cfg)
    out = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {run_dir.resolve().name}",
        "",
        f"`{_model_name(cfg)}` trained with [alignkit](https://pypi.org/project/alignkit/), recipe "
        f"`{cfg.recipe}` ({spec.summary}), for {steps} optimizer steps.",
        "",
    ]
    out += _training(cfg, spec, steps, processes, grad_accum or cfg.train.grad_accum, quantization)
    out += _data(cfg, run_dir, spec) + _results(train_metrics, eval_metrics) + _reproduce(cfg, run_dir)
    return "\n".join(out) + "\n"


def metadata(cfg: RunConfig) -> dict:
    spec = registry.get(cfg.recipe)
    base, license_ = _base_model(cfg)
    meta: dict[str, str | list[str]] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-classification" if spec.model_kind == "reward_model" else "text-generation"
    tags = ["alignkit", cfg.recipe] + _loss_names(cfg) + (["lora"] if cfg.lora.enabled else [])
    meta["tags"] = list(dict.fromkeys(tags))
    datasets = [d for d in (cfg.data.train, cfg.data.eval) if d and _is_hub_dataset(d)]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    if license_:
        meta["license"] = license_
    return meta


def read_front_matter(text: str) -> tuple[dict, str]:
    """(metadata, body) of a model card; ({}, text) without front matter."""
    m = re.match(r"---\n(.*?)\n---\n?", text, re.S)
    if not m:
        return {}, text
    return yaml.safe_load(m.group(1)) or {}, text[m.end() :]


# ---------------------------------------------------------------------------------------------


def _model_name(cfg: RunConfig) -> str:
    base, _ = _base_model(cfg)
    return base or cfg.model.name_or_path


def _base_model(cfg: RunConfig) -> tuple[str | None, str | None]:
    """(hub id of the model trained from, its license), each None when unknown."""
    name = cfg.model.name_or_path
    if name == DEFAULT_MODEL:
        return BUNDLED["base_model"], BUNDLED["license"]
    local = Path(name).expanduser()
    if local.exists():
        cached = _HUB_CACHE.search(str(local.resolve()))
        hub_id = f"{cached.group(1)}/{cached.group(2)}" if cached else None
        return hub_id, _license_of(local / "README.md")
    try:  # the base model's card, if the hub cache holds it (no download here)
        found = try_to_load_from_cache(name, "README.md", revision=cfg.model.revision)
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
        return None, None
    return name, _license_of(Path(found)) if isinstance(found, str) else None


def _license_of(card: Path) -> str | None:
    if not card.is_file():
        return None
    meta, _ = read_front_matter(card.read_text(errors="replace"))
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _is_hub_dataset(name: str) -> bool:
    return not Path(name).expanduser().exists() and not looks_local(name)


def _loss_terms(cfg: RunConfig) -> list[dict]:
    return [t for t in cfg.losses if isinstance(t, dict)] if cfg.losses else [cfg.loss]


def _loss_names(cfg: RunConfig) -> list[str]:
    return [str(t.get("name")) for t in _loss_terms(cfg)]


def _loss_line(term: dict) -> str:
    spec, params = losses.resolve({k: v for k, v in term.items() if k != "weight"})  # defaults spelled out
    weight = f"{term['weight']} x " if "weight" in term else ""
    shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"
    return f"{weight}`{spec.name}` ({shown}): {spec.summary} {spec.citation}."


def _row(key: str, value) -> str:
    return f"| {key} | {value} |"


def _training(
    cfg: RunConfig, spec, steps: int, processes: int, grad_accum: int, quantization: dict | None
) -> list[str]:
    t, lo = cfg.train, cfg.lora
    batch = t.batch_size * grad_accum * processes
    lora = (
        (
            f"r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, target_modules={lo.target_modules} "
            "(merged into these weights)"
        )
        if lo.enabled
        else "no: all weights trained"
    )
    if lo.enabled and cfg.model.quantization:  # QLoRA: final/ is the adapters on the dequantized base
        moved = f"{quantization['relative_error']:.2%} (relative error)" if quantization else "its quantization error"
        lora += (
            f"; QLoRA: trained on the base quantized to `{cfg.model.quantization}` and merged into that base "
            f"dequantized, so the transformer blocks' linear weights differ from the base model's by {moved} "
            "before the adapters' change"
        )
    out = [
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        _row("recipe", f"`{cfg.recipe}`: {spec.summary}"),
        _row("loss", "; ".join(_loss_line(term) for term in _loss_terms(cfg))),
    ]
    if spec.reads_key("reference"):
        out.append(_row("reference", f"`{cfg.reference}`"))
    out += [
        _row(
            "base model",
            f"`{cfg.model.name_or_path}`"
            + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")
            + (" (the bundled Q4_1 GGUF, de-quantized)" if cfg.model.name_or_path == DEFAULT_MODEL else ""),
        ),
        _row("LoRA", lora),
        _row("steps", steps),
        _row(
            "examples per step",
            f"{batch} (batch_size {t.batch_size} x grad_accum {grad_accum}"
            + (f" x {processes} processes)" if processes > 1 else ")"),
        ),
        _row(
            "learning rate",
            f"{t.learning_rate} ({t.lr_schedule}, warmup_ratio {t.warmup_ratio}, "
            f"weight_decay {t.weight_decay}, max_grad_norm {t.max_grad_norm})",
        ),
        _row("precision", t.precision),
        _row("max length", f"{cfg.data.max_length} tokens"),
        _row("seed", cfg.seed),
        "",
    ]
    changed = _changed_settings(cfg, spec)
    if changed:
        out += [
            "Settings the recipe reads that differ from alignkit's defaults: "
            + ", ".join(f"`{k}={v}`" for k, v in changed.items())
            + ".",
            "",
        ]
    return out


def _changed_settings(cfg: RunConfig, spec) -> dict:
    # Shown elsewhere on the card, or not about the model.
    skip = (
        "output_dir",
        "cache_dir",
        "model.name_or_path",
        "data.train",
        "data.eval",
        "loss",
        "losses",
        "train.report_to",
    )
    defaults = flat_dict(to_dict(RunConfig(recipe=cfg.recipe, loss=cfg.loss)))
    given = flat_dict(to_dict(cfg))
    return {k: v for k, v in given.items() if v != defaults.get(k, v) and spec.reads_key(k) and not k.startswith(skip)}


def _data_name(name: str) -> str:
    return f"[{name}](https://huggingface.co/datasets/{name}) (Hub)" if _is_hub_dataset(name) else f"`{name}` (local)"


def _data(cfg: RunConfig, run_dir: Path, spec) -> list[str]:
    d = cfg.data
    out = [
        "## Data",
        "",
        "| | |",
        "| --- | --- |",
        _row("training data", _data_name(d.train) + f", {spec.data} records"),
    ]
    if d.eval:
        out.append(_row("held-out data", _data_name(d.eval)))
    elif d.eval_fraction:
        out.append(_row("held-out data", f"{d.eval_fraction:g} of the training records (seed {cfg.seed})"))
    if d.limit:
        out.append(_row("limit", f"the first {d.limit} records"))
    if (run_dir / HELDOUT).is_file():
        record = read_heldout(run_dir)
        if record.num_train is not None:
            out.append(_row("training examples", record.num_train))
        if record.sources is not None:
            out.append(_row("held-out examples", len(record.sources)))
    return out + [""]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def _metrics_table(metrics: dict) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if k not in ("step", "split")]
    return ["| metric | value |", "| --- | --- |"] + [_row(f"`{k}`", _fmt(v)) for k, v in rows] + [""]


def _results(train_metrics: dict, eval_metrics: dict) -> list[str]:
    out = ["## Results", ""]
    if eval_metrics:
        out += ["Last evaluation on the held-out examples:", ""] + _metrics_table(eval_metrics)
    else:
        out += ["No held-out evaluation was logged.", ""]
    if train_metrics:
        out += ["Last logged training step:", ""] + _metrics_table(train_metrics)
    return out


def _reproduce(cfg: RunConfig, run_dir: Path) -> list[str]:
    out = [
        "## Reproduce",
        "",
        "```bash",
        f"alignkit train --config {run_dir}/config.yaml output_dir={run_dir}-again",
        "```",
        "",
        f"`{run_dir}/config.yaml` (also `alignkit_config.yaml` beside this card) holds every setting; "
        "`output_dir` names a new directory, so the original run stays as it is.",
    ]
    if (run_dir / "config_changes.jsonl").is_file():
        out += [
            "This run was resumed with changed settings (`config_changes.jsonl`): the config holds the last "
            "ones, which a new run applies from step 0."
        ]
    return out
