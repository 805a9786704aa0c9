"""Activation steering (representation engineering): read hidden states, fit a direction from
contrast data, measure how well it separates held-out data, save it, and add it at inference.

Representation Engineering (Zou et al. 2023, arXiv 2310.01405) reads a concept as a direction in
the residual stream ("reading vector": the first principal component of differences between the
activations of contrasting stimuli) and controls behaviour by adding that direction to the hidden
states during generation. Wolf et al. 2024 (arXiv 2401.16332, "Tradeoffs Between Alignment and
Helpfulness in Language Models with Representation Engineering") show that alignment grows
linearly with the strength of the added vector while helpfulness falls quadratically, so the
strength is the knob to sweep, and its unit must be stated (below).

    pos = hidden_states(model, tok, chosen_items, layers=[6, 8])     # {layer: [N, H]}
    neg = hidden_states(model, tok, rejected_items, layers=[6, 8])
    dirs = fit_directions(pos, neg, "pca")                            # {layer: Direction}
    with steer(model, {l: d.vector for l, d in dirs.items()}, strength=2.0):
        generate(model, tok, prompts)

Conventions, all checked by tests/test_steering.py:
- **Layer l** is the output of decoder block l (0-based, `alignkit.models.transformer_blocks`),
  i.e. the residual stream after that block, read with a forward hook on the block. transformers'
  `output_hidden_states` agrees (`hidden_states[l + 1]`) for every block but the last: its final
  entry is taken after the model's final norm, so we do not use it.
- **Unit of strength**: a `Direction` is a unit vector plus `norm` = ||mean(pos) - mean(neg)||
  (Euclidean, in activation space, over the fitting data); `Direction.vector` = unit * norm, so
  steering with strength 1 adds one mean-difference length along the direction, whatever the
  method that chose the direction.
- **Positions**: a forward call is *generated* when the model is given a KV cache that already
  holds tokens (a decoding step), and *prompt* otherwise (the prefill, or a plain forward without
  cache). We read the cache rather than count tokens so that a one-token prompt, or several
  prefills (batches) inside one `steer` block, are classified correctly. The first new token is
  sampled from the prefill's logits, so `positions="generated"` cannot change it. A prompt
  prefilled in chunks would count as generated after its first chunk (alignkit's sampler does not
  chunk), and a search that re-prefills a prefix without cache (DeAL) steers it as a prompt.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from alignkit.data.examples import PreferenceExample
from alignkit.data.tokenize import as_messages, encode_text, render_texts
from alignkit.errors import ConfigError, DataError, ModelError
from alignkit.models import decoder_of, transformer_blocks

__all__ = [
    "DIRECTION_METHODS",
    "Direction",
    "check_strength",
    "fit_direction",
    "fit_directions",
    "hidden_states",
    "load_vectors",
    "midpoint",
    "steering_fingerprint",
    "preference_items",
    "save_vectors",
    "separation",
    "steer",
]

VECTORS_FILE = "steering.safetensors"
META_FILE = "steering.json"
FORMAT = "alignkit-steering/1"
POSITIONS = ("all", "prompt", "generated")
POOLING = ("last", "mean")


# ---------------------------------------------------------------------------------------------
# Reading hidden states


def preference_items(examples: list[PreferenceExample]) -> tuple[list, list]:
    """Preference pairs -> (chosen items, rejected items) for `hidden_states`, index-aligned, so
    row i of the two readings is a contrast pair (what `pca` and paired `separation` expect)."""

    def item(ex, reply):
        if ex.plain_text:  # keep the raw strings, as training lays them out without a chat template
            return ex.prompt[-1]["content"], reply[-1]["content"]
        return tuple(ex.prompt), tuple(reply)

    return [item(ex, ex.chosen) for ex in examples], [item(ex, ex.rejected) for ex in examples]


def encode_item(tokenizer, item) -> tuple[list, int]:
    """One input -> (token ids, index of the first reply token). Accepted inputs:

    - a string: raw text, tokenized as is; the whole text counts as the reply;
    - a (prompt, reply) pair, each a string or a message list: the reply rendered after the prompt
      by the chat template exactly as training renders a completion (`alignkit.data.tokenize`);
    - a message list: ending with an assistant turn, that turn is the reply to the turns before;
      otherwise it is a prompt, rendered with the generation prompt, and counts whole as the reply.
    """
    templated = tokenizer.chat_template is not None
    if isinstance(item, str):
        return tokenizer(item, add_special_tokens=not templated)["input_ids"], 0
    item = tuple(item)
    if item and all(isinstance(m, dict) for m in item):  # a conversation
        if item[-1].get("role") == "assistant" and len(item) > 1:
            item = (item[:-1], item[-1:])
        else:
            text = tokenizer.apply_chat_template(list(item), tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"], 0
    if len(item) != 2:
        raise ValueError(f"cannot read {item!r:.120}: pass a string, a message list, or a (prompt, reply) pair")
    prompt, reply = item
    messages, plain = as_messages(prompt)
    reply = ({"role": "assistant", "content": reply},) if isinstance(reply, str) else tuple(reply)
    p_ids, c_ids = encode_text(tokenizer, *render_texts(tokenizer, messages, reply, plain))
    return p_ids + c_ids, len(p_ids)


def check_layers(model, layers) -> list[int]:
    """`layers` (an int or ints) -> a sorted list of block indices, each checked against the model.
    Negative indices are refused rather than counted from the end: a layer number is saved with the
    vectors and printed in reports, so it must name one block on its own."""
    n = len(transformer_blocks(model))
    layers = sorted({int(layers)} if isinstance(layers, int) else {int(l) for l in layers})
    bad = [l for l in layers if not 0 <= l < n]
    if bad or not layers:
        what = f"layer {', '.join(map(str, bad))} is out of range" if bad else "no layers given"
        raise ConfigError(
            f"{what}: {type(model).__name__} has {n} decoder blocks, blocks 0..{n - 1} (layer l is the "
            f"output of block l, counted from 0; negative layers are not accepted). Pick layers from 0 "
            f"to {n - 1}."
        )
    return layers


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # [B, T, H]


@torch.no_grad()
def hidden_states(
    model,
    tokenizer,
    conversations_or_texts: list,
    layers,
    *,
    position: str = "last",
    batch_size: int = 8,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """{layer: [N, H] float32 on CPU}: the output of decoder block `layer` for each input (see
    `encode_item`), at its last token (`position="last"`; for a rendered reply that is the
    end-of-turn token, where the model has read the whole reply) or averaged over the reply's tokens
    (`position="mean"`). Inputs are right-padded, so under the causal mask every real token sees
    exactly what it would see alone."""
    if position not in POOLING:
        raise ValueError(f"position={position!r}: use one of {POOLING}")
    layers = check_layers(model, layers)
    encoded = [encode_item(tokenizer, it) for it in conversations_or_texts]
    if not encoded:
        raise ValueError("hidden_states: no inputs given")
    blocks, trunk = transformer_blocks(model), decoder_of(model)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        blocks[l].register_forward_hook(lambda m, a, out, l=l: captured.__setitem__(l, _block_output(out)))
        for l in layers
    ]
    reads: dict[int, dict] = {l: {} for l in layers}
    # longest first, so a batch holds similar lengths (less padding); results go back in input order
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(encoded), batch_size), desc="hidden states", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            chunk = [encoded[i] for i in idx]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (t, _) in enumerate(chunk):
                ids[r, : len(t)], mask[r, : len(t)] = torch.tensor(t), 1
            trunk(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            for l in layers:
                h = captured[l].float().cpu()  # [B, T, H]
                for r, (i, (t, s)) in enumerate(zip(idx, chunk)):
                    reads[l][i] = h[r, len(t) - 1] if position == "last" else h[r, s : len(t)].mean(0)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {l: torch.stack([v[i] for i in range(len(encoded))]) for l, v in reads.items()}


# ---------------------------------------------------------------------------------------------
# Fitting directions


class Direction(NamedTuple):
    """A unit direction [H] and the mean-difference length that `vector` scales it to."""

    unit: torch.Tensor  # [H], ||unit|| = 1, oriented so pos projects higher than neg
    norm: float  # ||mean(pos) - mean(neg)||: steering strength 1 adds this length

    @property
    def vector(self) -> torch.Tensor:
        return self.unit * self.norm


DIRECTION_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register_direction(name: str):
    """Register `fn(pos [N, H] float64, neg [M, H] float64) -> direction [H]` (any length) by name."""

    def deco(fn):
        DIRECTION_METHODS[name] = fn
        return fn

    return deco


@register_direction("mean_diff")
def _mean_diff(pos, neg):
    return pos.mean(0) - neg.mean(0)


@register_direction("pca")
def _pca(pos, neg):
    """RepE's reading vector: the first principal component of the paired differences pos_i - neg_i.
    RepE shuffles each pair's order (differences +-d, mean ~ 0) and runs a centred PCA; we keep the
    order and take the top right singular vector of the uncentred differences, which is the same
    component without the randomness (the second moment does not depend on the signs)."""
    if pos.shape != neg.shape:
        raise ValueError(
            f"pca needs paired activations (row i of pos contrasts row i of neg); got pos "
            f"{tuple(pos.shape)} and neg {tuple(neg.shape)}. Use mean_diff or probe for unpaired data."
        )
    diffs = pos - neg  # [N, H]
    top = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    return top if top @ diffs.mean(0) >= 0 else -top  # pos projects higher on average


@register_direction("probe")
def _probe(pos, neg):
    """Logistic regression (pos = 1) on standardised features, L2 penalty as scikit-learn's default
    (C = 1: mean log-loss + ||w||^2 / 2n, which keeps the weights finite on separable data), fitted by
    L-BFGS from zero in float64, so deterministic. A score w.(x - mu)/sd is (w/sd).x + const, so the
    direction in activation space is w / sd."""
    x = torch.cat([pos, neg])  # [n, H]
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(x)
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))  # a constant feature carries no signal
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + (w @ w) / (2 * len(x))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach() / sd


def fit_direction(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff") -> Direction:
    """A `Direction` separating `pos` [N, H] from `neg` [M, H] activations, by `method`:
    `mean_diff` (difference of the means), `pca` (RepE's reading vector; needs pairs) or `probe`
    (logistic regression). Computed in float64, returned in pos's dtype."""
    if method not in DIRECTION_METHODS:
        raise ValueError(f"unknown direction method {method!r}; use one of {sorted(DIRECTION_METHODS)}")
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1] or not len(pos) or not len(neg):
        raise ValueError(
            f"fit_direction needs pos [N, H] and neg [M, H] with N, M >= 1; got "
            f"{tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    p, n = pos.double(), neg.double()
    norm = float((p.mean(0) - n.mean(0)).norm())
    d = DIRECTION_METHODS[method](p, n)
    if norm == 0 or not torch.isfinite(d).all() or d.norm() == 0:
        raise ValueError(
            f"{method}: pos and neg activations do not differ (mean difference {norm}); "
            "no direction can be fitted. Check that the two sets contrast the concept."
        )
    return Direction((d / d.norm()).to(pos.dtype), norm)


def fit_directions(pos: dict, neg: dict, method: str = "mean_diff") -> dict[int, Direction]:
    """`fit_direction` for each layer of two `hidden_states` readings."""
    if set(pos) != set(neg):
        raise ValueError(f"pos has layers {sorted(pos)} but neg has {sorted(neg)}; read the same layers")
    return {l: fit_direction(pos[l], neg[l], method) for l in sorted(pos)}


# ---------------------------------------------------------------------------------------------
# Separation on held-out data


def _unit(direction) -> torch.Tensor:
    d = (direction.unit if isinstance(direction, Direction) else direction).double()
    return d / d.norm()


def midpoint(direction, pos: torch.Tensor, neg: torch.Tensor) -> float:
    """The threshold for unpaired `separation`: the projection of (mean(pos) + mean(neg)) / 2 on the
    unit direction. Compute it on the *training* activations."""
    return float(_unit(direction) @ (pos.double().mean(0) + neg.double().mean(0)) / 2)


def separation(direction, pos: torch.Tensor, neg: torch.Tensor, *, threshold: float | None = None) -> dict:
    """How well projections on the unit `direction` (a `Direction` or a vector) separate pos from neg.

    - `accuracy`: without `threshold`, the data are pairs (row i of pos against row i of neg) and it
      is the share of pairs with proj(pos_i) > proj(neg_i); with `threshold` (see `midpoint`), the
      share of all N + M examples on their side: proj > threshold for pos, < threshold for neg.
      A tie counts as wrong.
    - `fisher`: (mean proj(pos) - mean proj(neg))^2 / (var proj(pos) + var proj(neg)), population
      variances (Fisher's discriminant ratio on the projections); inf when both variances are 0.
    - `gap`: mean proj(pos) - mean proj(neg), in activation units (compare with `Direction.norm`).
    """
    u = _unit(direction)
    p, n = pos.double() @ u, neg.double() @ u  # [N], [M]
    if threshold is None:
        if p.shape != n.shape:
            raise ValueError(
                f"paired separation needs as many pos as neg rows ({len(p)} vs {len(n)}); "
                "for unpaired data pass threshold=midpoint(direction, train_pos, train_neg)"
            )
        accuracy = float((p > n).double().mean())
    else:
        accuracy = int((p > threshold).sum() + (n < threshold).sum()) / (len(p) + len(n))
    gap = float(p.mean() - n.mean())
    spread = float(p.var(unbiased=False) + n.var(unbiased=False))
    fisher = gap**2 / spread if spread > 0 else (float("inf") if gap else 0.0)
    return {"accuracy": accuracy, "fisher": fisher, "gap": gap, "n_pos": len(p), "n_neg": len(n)}


# ---------------------------------------------------------------------------------------------
# Saving and loading


def steering_fingerprint(model) -> dict:
    """What steering vectors must match: model type, hidden size, number of blocks, and a SHA-256
    (first 16 hex digits) of the first parameter of block 0. The weights are hashed after rounding to
    bfloat16, so float32 and bfloat16 copies of one checkpoint share a fingerprint."""
    blocks = transformer_blocks(model)
    weight = next(blocks[0].parameters()).detach().to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256(weight.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "hidden_size": int(model.config.hidden_size),
        "num_layers": len(blocks),
        "weights_sha256": digest,
    }


def save_vectors(path_dir, vectors: dict, meta: dict) -> Path:
    """Write `vectors` ({layer: [H]}, e.g. `Direction.vector`s) to `path_dir/steering.safetensors`
    and `path_dir/steering.json`: `meta` (must hold "fingerprint" = `steering_fingerprint(model)`;
    say "method" and "source" too) plus the layers, norms and hidden size taken from the vectors."""
    from safetensors.torch import save_file

    if "fingerprint" not in meta:
        raise ValueError(
            "save_vectors: meta needs 'fingerprint': pass steering_fingerprint(model) of the model the vectors came "
            "from"
        )
    sizes = {int(v.shape[-1]) for v in vectors.values()}
    if not vectors or sizes != {meta["fingerprint"]["hidden_size"]} or any(v.ndim != 1 for v in vectors.values()):
        raise ValueError(
            f"save_vectors: expected 1-D vectors of the model's hidden size "
            f"{meta['fingerprint']['hidden_size']}; got shapes {[tuple(v.shape) for v in vectors.values()]}"
        )
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    layers = sorted(int(l) for l in vectors)
    save_file({f"layer.{l}": vectors[l].detach().float().cpu().contiguous() for l in layers}, str(path / VECTORS_FILE))
    record = {
        **meta,
        "format": FORMAT,
        "layers": layers,
        "hidden_size": sizes.pop(),
        "norms": {str(l): float(vectors[l].float().norm()) for l in layers},
    }
    (path / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return path


def _refit(path: Path) -> str:
    return (
        f"Fit the vectors again with `alignkit steer fit --model MODEL --data PAIRS --layers L [L ...] --out {path}` "
        "(on the model you steer)."
    )


def _check_vectors(file: Path, tensors: dict, meta: dict, model) -> dict[int, torch.Tensor]:
    """The tensors of a steering file -> {layer: [H] float32}, each checked against `model` and the
    file's steering.json: a known layer, the model's hidden size, finite values."""
    n, hidden = len(transformer_blocks(model)), int(model.config.hidden_size)
    if not tensors:
        raise DataError(f"{file}: holds no steering vectors. {_refit(file.parent)}")
    vectors = {}
    for key in sorted(tensors):
        m = re.fullmatch(r"layer\.(\d+)", key)
        if m is None:
            raise DataError(
                f"{file}: unexpected tensor {key!r}; a steering file holds one tensor per layer, named "
                f"layer.<block index>. {_refit(file.parent)}"
            )
        l, v = int(m.group(1)), tensors[key]
        if l >= n:
            raise DataError(
                f"{file}: holds a vector for layer {l}, but the model has {n} decoder blocks (layers 0.."
                f"{n - 1}). {_refit(file.parent)}"
            )
        if tuple(v.shape) != (hidden,) or not v.is_floating_point():
            raise DataError(
                f"{file}: the vector for layer {l} has shape {tuple(v.shape)} ({v.dtype}), but the model's "
                f"hidden size is {hidden}: expected floats of shape ({hidden},). {_refit(file.parent)}"
            )
        v = v.float()
        finite = torch.isfinite(v)
        if not finite.all():
            raise DataError(
                f"{file}: the vector for layer {l} holds NaN or infinite values ({int((~finite).sum())} of "
                f"{hidden}); steering with it would turn the model's hidden states into NaN. "
                f"{_refit(file.parent)}"
            )
        vectors[l] = v
    listed = meta.get("layers")
    if listed is not None:
        ok = isinstance(listed, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in listed)
        if not ok or sorted(set(listed)) != sorted(vectors):
            missing = sorted(set(listed) - set(vectors)) if ok else None
            raise DataError(
                f"{file.parent / META_FILE}: lists layers {listed!r}, but {file.name} holds layers "
                f"{sorted(vectors)}"
                + (f" (no vector for layer {', '.join(map(str, missing))})" if missing else "")
                + f"; the two files do not belong together. {_refit(file.parent)}"
            )
    return vectors


def _describe(fp: dict) -> str:
    return ", ".join(f"{k}={fp.get(k)}" for k in ("model_type", "hidden_size", "num_layers", "weights_sha256"))


def load_vectors(path_dir, model) -> tuple[dict[int, torch.Tensor], dict]:
    """({layer: [H] float32}, the steering.json record) from `save_vectors`' directory, after
    checking that `model` is the model they were fitted on (`steering_fingerprint`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path_dir)
    if not path.is_dir():
        raise DataError(
            f"steering vectors {path}: no such directory. Give the --out directory of `alignkit steer "
            f"fit` (it holds {VECTORS_FILE} and {META_FILE}), or fit vectors there first."
        )
    for name in (VECTORS_FILE, META_FILE):
        if not (path / name).is_file():
            raise DataError(
                f"{path / name} not found: a steering directory holds {VECTORS_FILE} and {META_FILE}, "
                f"as `alignkit steer fit` (save_vectors) writes them. {_refit(path)}"
            )
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path / META_FILE}: not valid JSON ({e}); the file is damaged. {_refit(path)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), dict):
        raise DataError(
            f'{path / META_FILE}: expected a JSON object with a "fingerprint" object (the model the '
            f"vectors were fitted on), as `alignkit steer fit` writes it. {_refit(path)}"
        )
    saved, here = meta["fingerprint"], steering_fingerprint(model)
    differ = [k for k in here if saved.get(k) != here[k]]
    if differ:
        raise ModelError(
            f"model fingerprint mismatch ({', '.join(differ)} differ): the steering vectors in {path} were fitted "
            f"on a model with {_describe(saved)}, but the model given has {_describe(here)}. Load the model "
            "they were fitted on, or fit new vectors on this one."
        )
    try:
        tensors = load_file(str(path / VECTORS_FILE))
    except (SafetensorError, OSError) as e:
        raise DataError(
            f"{path / VECTORS_FILE}: not a readable safetensors file ({e}); it may be truncated or "
            f"overwritten. {_refit(path)}"
        ) from None
    return _check_vectors(path / VECTORS_FILE, tensors, meta, model), meta


# ---------------------------------------------------------------------------------------------
# Steering at inference


def check_strength(value, option: str = "strength") -> float:
    """`value` as a float, refused (ConfigError naming `option`) unless finite: a NaN or infinite
    strength turns every steered hidden state into NaN, and sampling then fails or emits nothing."""
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{option}={value!r}: give a number, the multiple of each steering vector to add (e.g. 1, 0.5 or -2)"
        ) from None
    if not math.isfinite(strength):
        raise ConfigError(
            f"{option}={value!r}: the steering strength must be a finite number (e.g. 1, 0.5 or -2), "
            "not NaN or infinity"
        )
    return strength


def _cached_tokens(cache) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length())


@contextmanager
def steer(model, vectors: dict, strength: float = 1.0, positions: str = "all"):
    """Inside the block, decoder block l's output gets `strength * vectors[l]` added (vectors:
    {layer: [H]}, e.g. `Direction.vector`s or `load_vectors`' result), at every position of the
    forward calls chosen by `positions`: "prompt" (calls without a filled KV cache:
    the prefill, or a plain forward), "generated" (decoding steps, given a cache that holds tokens),
    or "all". Works with `alignkit.generation` and with any forward through the model's trunk; the
    hooks are removed on exit, also on error."""
    if positions not in POSITIONS:
        raise ConfigError(f"positions={positions!r}: use one of {POSITIONS}")
    strength = check_strength(strength)
    blocks = transformer_blocks(model)
    hidden = model.config.hidden_size
    layers = check_layers(model, list(vectors))
    for l in layers:
        if tuple(vectors[l].shape) != (hidden,):
            raise ConfigError(
                f"steering vector for layer {l} has shape {tuple(vectors[l].shape)}; the model's hidden size is "
                f"{hidden}"
            )
        if not torch.isfinite(vectors[l]).all():
            raise ConfigError(f"steering vector for layer {l} holds NaN or infinite values; steer with finite vectors")
    deltas = {l: strength * vectors[l].float().to(next(blocks[l].parameters()).device) for l in layers}
    trunk = decoder_of(model)
    signature = inspect.signature(trunk.forward)
    phase = {"generated": False}

    def read_phase(module, args, kwargs):
        cache = signature.bind_partial(*args, **kwargs).arguments.get("past_key_values")
        phase["generated"] = _cached_tokens(cache) > 0

    def add(l):
        def hook(module, args, output):
            if positions != "all" and phase["generated"] != (positions == "generated"):
                return None
            h = _block_output(output)
            h = h + deltas[l].to(h.dtype)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        return hook

    handles = []
    try:
        if positions != "all":
            handles.append(trunk.register_forward_pre_hook(read_phase, with_kwargs=True))
        handles += [blocks[l].register_forward_hook(add(l)) for l in layers]
        yield model
    finally:
        for h in handles:
            h.remove()
