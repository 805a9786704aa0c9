"""Sampled completions cached on disk, so a resumed or repeated run trains on the same samples.

Keyed by the model's fingerprint, the sampling parameters, the seed and the prompts (texts, and the
pixels of their images); one JSON list of completions per line, in prompt order, written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from alignkit.data.vision import load_image, prompt_images
from alignkit.generation.decode import row_seed
from alignkit.generation.hf import SamplingParams, generate


def samples_key(fingerprint: dict, params: SamplingParams, seed: int, prompts: list[str]) -> str:
    h = hashlib.sha256()
    # "per-prompt seeds": each prompt's samples come from its own seed (see `cached_samples`)
    h.update(json.dumps([fingerprint, dataclasses.asdict(params), seed, "per-prompt seeds"], sort_keys=True).encode())
    for p in prompts:
        h.update(json.dumps(p, default=lambda o: type(o).__name__).encode())  # bytes or a PIL image: by pixels
        for i, ref in enumerate(prompt_images(p) if not isinstance(p, str) else []):
            h.update(hashlib.sha256(load_image(ref, "a sampled prompt", i).tobytes()).digest())  # the pixels
    return h.hexdigest()[:24]


def cached_samples(
    model,
    tokenizer,
    prompts: list[str],
    params: SamplingParams,
    *,
    seed: int,
    cache_dir: Path,
    fingerprint: dict,
    batch_size: int,
    progress: bool = True,
    desc: str = "sampling",
    parallel=None,
) -> tuple[list[list[str]], Path]:
    """`params.n` completions per prompt (read from the cache when present); also the cache file.

    `parallel` (the trainer's SetupContext) splits the sampling: each process samples its `shard`
    of the prompts, the shares are gathered, and one process writes the file."""
    path = Path(cache_dir) / f"{samples_key(fingerprint, params, seed, prompts)}.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if len(rows) == len(prompts) and all(len(r) == params.n for r in rows):
            note = f"alignkit: {desc}: reusing cache {path}"
            parallel.say(note) if parallel is not None else print(note, flush=True)
            return rows, path
    # A seed per prompt (from `seed` and its position): the samples do not depend on the batching,
    # so a cache made by one process serves a run on several and the other way round.
    mine = parallel.shard(list(range(len(prompts)))) if parallel is not None else list(range(len(prompts)))
    rows = (
        generate(
            model,
            tokenizer,
            [prompts[i] for i in mine],
            params,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            desc=desc,
            prompt_seeds=[row_seed(seed, i) for i in mine],
        )
        if mine
        else []
    )
    if parallel is not None:
        rows = [r for share in parallel.gather_shares(rows) for r in share]  # shares in process order

    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)

    parallel.main_writes(write) if parallel is not None else write()
    return rows, path
