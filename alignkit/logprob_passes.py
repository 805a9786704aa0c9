"""Passes of a frozen model over data: reference log-probs, and log-probs of given completions.

Reference log-probs for reference-based losses. Default (`reference: cached`): computed once before
training, in one no-grad pass, and stored on disk keyed by model, tokens and precision, so no
reference model sits in memory or compute during training and a second run on the same data skips
the pass. `reference: live` keeps a frozen copy (or, with LoRA, the same model with adapters
disabled) and recomputes per batch.

`sample_logps` scores (prompt, completion) texts laid out as training lays them out: evaluation's
KL estimates and URIAL's KL both use it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignkit.data.batching import collate_sft
from alignkit.data.tokenize import TokenizedSFT, encode_reply
from alignkit.logprobs import segment_logps
from alignkit.models import is_peft


def weights_fingerprint(path: str, revision: str | None) -> dict:
    """Identity of a model's weights: its config and weight files' sizes and mtimes when local."""
    p = Path(path)
    if not p.is_dir():
        return {"hub_id": path, "revision": revision}
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
    return {
        "path": str(p.resolve()),
        "files": [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files],
    }


def cache_key(fingerprint: dict, items: list, precision: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(fingerprint, sort_keys=True).encode())
    h.update(precision.encode())
    for it in items:  # every field of a tokenized item (ids, masks, index, pixels) decides its log-probs
        vision = getattr(it, "vision", None)
        fields = dataclasses.asdict(it if vision is None else dataclasses.replace(it, vision=None))
        fields.pop("uncut", None)  # the replies' lengths before the cut: not what the model reads
        h.update(json.dumps(fields, sort_keys=True).encode())
        for name, tensor in sorted(vision.tensors.items()) if vision is not None else ():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def segment_table(logps: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Per-segment log-probs [S * B] -> [B, S]: the batch layouts put segment s*B + i in row i,
    column s (pairs: chosen then rejected; groups: negative then samples)."""
    return logps.view(-1, num_examples).T


def _item_length(it) -> int:
    if hasattr(it, "completions"):
        return len(it.prompt_ids) + max(len(c) for c in it.completions)
    return len(it.prompt_ids) + max(len(it.chosen_ids), len(it.rejected_ids))


@torch.no_grad()
def compute_ref_logps(
    model,
    items: list,
    collate,
    batch_size: int,
    chunk_size: int,
    device,
    autocast,
    desc: str = "reference log-probs",
    progress: bool = True,
) -> torch.Tensor:
    """Return [N, S] float32 summed log-probs, row i for items[i], one column per completion
    (S = 2 for pairs: chosen, rejected)."""
    table = None
    was_training = model.training
    model.eval()
    # Longest first: the biggest batch shows up (and fails) at once if memory is short.
    order = sorted(range(len(items)), key=lambda i: -_item_length(items[i]))
    adapters_off = model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
    with adapters_off, tqdm(total=len(items), desc=desc, unit="example", leave=False, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([items[i] for i in idx]).to(device)
            with autocast():
                out = segment_logps(model, batch, chunk_size)
            cols = segment_table(out.logps, len(idx)).float().cpu()
            if table is None:
                table = torch.zeros(len(items), cols.shape[1], dtype=torch.float32)
            table[idx] = cols
            bar.update(len(idx))
    model.train(was_training)
    return table


def parallel_ref_logps(
    model,
    items: list,
    collate,
    batch_size: int,
    chunk_size: int,
    device,
    autocast,
    desc: str = "log-probs",
    progress: bool = True,
    parallel=None,
) -> torch.Tensor:
    """`compute_ref_logps` split over processes: each computes the rows of its `parallel.shard` of the
    items, and the shares are gathered (in process order, so in item order). `parallel`: an
    alignkit Dist or the trainer's SetupContext; None for one process."""
    if parallel is None:
        return compute_ref_logps(model, items, collate, batch_size, chunk_size, device, autocast, desc, progress)
    mine = parallel.shard(list(range(len(items))))
    part = (
        compute_ref_logps(
            model, [items[i] for i in mine], collate, batch_size, chunk_size, device, autocast, desc, progress
        )
        if mine
        else None
    )  # rows in the order of `mine`
    return torch.cat([p for p in parallel.gather_shares(part) if p is not None])


def cached_ref_logps(
    model,
    items,
    collate,
    *,
    cache_dir: Path,
    fingerprint: dict,
    precision: str,
    batch_size: int,
    chunk_size: int,
    device,
    autocast,
    desc: str,
    parallel=None,
    progress: bool = True,
) -> torch.Tensor:
    """`compute_ref_logps`, read from or written to `cache_dir` (atomically).

    `parallel` (the trainer's `SetupContext`, or None for one process) splits the pass: each
    process computes its `shard` of the examples, the shares are `gather`ed into the full table,
    and one process writes the file, under the key a single process would use (a cache made at one
    scale serves another)."""
    return disk_cached(
        cache_dir / f"{cache_key(fingerprint, items, precision)}.safetensors",
        len(items),
        lambda: parallel_ref_logps(
            model, items, collate, batch_size, chunk_size, device, autocast, desc, progress, parallel
        ),
        desc,
        parallel,
    )


def disk_cached(path: Path, rows: int, compute, desc: str, parallel=None) -> torch.Tensor:
    """The table in `path` when it holds `rows` rows, else `compute()`'s, written there atomically
    (by one process under torchrun: `compute` runs in every process and returns the whole table)."""
    if path.is_file():
        table = load_file(str(path)).get("logps")
        if table is not None and table.shape[0] == rows:
            note = f"alignkit: {desc}: reusing cache {path}"
            parallel.say(note) if parallel is not None else print(note, flush=True)
            return table
    table = compute()

    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"logps": table.contiguous()}, tmp)  # the name every cached table has, log-probs or not
        os.replace(tmp, path)

    if parallel is None:
        write()
    else:
        parallel.main_writes(write)
    return table


class CachedReference:
    """Looks up precomputed log-probs by example index."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [N, S]

    def logps(self, model, batch, chunk_size, device) -> torch.Tensor:
        """[B, S] reference log-probs of the batch's examples."""
        return self.table[batch.example_ids].to(device)


class LiveReference:
    """Recomputes reference log-probs per batch from a frozen model (or LoRA's base)."""

    def __init__(self, policy):
        if is_peft(policy):
            self.model, self.use_base = policy, True
        else:
            self.model, self.use_base = copy.deepcopy(policy).eval().requires_grad_(False), False

    @torch.no_grad()
    def segment(self, batch, chunk_size):
        """The reference's SegmentLogps of `batch` (per segment and per token).

        Always the reference's raw distribution (temperature 1, untruncated), even when the policy's
        log-probs are those of its sampling distribution (`segment_logps(..., sampling=)`): the KL
        anchor is the reference model itself, not a sampler built on it, and truncating the
        reference with top-k / top-p could leave a sampled token outside its set (log-prob -inf,
        an infinite KL estimate)."""
        ctx = self.model.disable_adapter() if self.use_base else contextlib.nullcontext()
        with ctx:
            return segment_logps(self.model, batch, chunk_size)

    def logps(self, model, batch, chunk_size, device) -> torch.Tensor:
        return segment_table(self.segment(batch, chunk_size).logps, batch.num_examples)


@torch.no_grad()
def sample_logps(
    model, tokenizer, prompts: list, completions: list, max_length: int, batch_size: int, on_batch=None
) -> torch.Tensor:
    """[N] float64 summed log-probs of each (prompt, completion) under `model` (prompt kept to its last
    max_length // 2 tokens, completion to its first max_length // 2). `on_batch(model, batch)` is
    called on every batch, for statistics a caller gathers on the same forward inputs."""
    items = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p_ids, c_ids, pixels = encode_reply(tokenizer, p, c, f"prompt {i}")
        if pixels is not None:  # a prompt with images is never cut (its image tokens need their pixels)
            items.append(TokenizedSFT(p_ids, c_ids[: max_length // 2], i, vision=pixels))
            continue
        items.append(TokenizedSFT(p_ids[-(max_length // 2) :], c_ids[: max_length // 2], i))
    out = torch.zeros(len(items), dtype=torch.float64)
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = collate_sft(items[start : start + batch_size], tokenizer.pad_token_id).to(device)
        out[start : start + len(batch.example_ids)] = segment_logps(model, batch).logps.double().cpu()
        if on_batch is not None:
            on_batch(model, batch)
    return out
