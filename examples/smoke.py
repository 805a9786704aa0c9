"""`--smoke`, which every script in examples/ and bench/ takes: the script's own code, run for
seconds, so that tests/test_bench_smoke.py fails when a change breaks a script.

Only sizes change: a tiny random-init model instead of SmolLM2-135M-Instruct, a step or two, a
handful of prompts and samples, and synthetic data in the shared data sets' formats instead of
../shared/data (`bench/hh_data.py`). The smoke run calls the same functions and prints the same
lines, last line included, as the full run; its numbers mean nothing. It writes under `--out` only:
without one, a fresh temporary directory that is removed when the script ends (pass `--out` to keep
what it wrote).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

HELP = (
    "a seconds-long run of this script's code for tests: a tiny random-init model, synthetic data, "
    "the smallest sizes (an option given explicitly still wins), output in a temporary directory "
    "removed at exit unless --out is given"
)


def parse_args(ap: argparse.ArgumentParser, **sizes) -> argparse.Namespace:
    """`ap`'s arguments (which include `--out`) plus `--smoke`; with `--smoke`, `sizes` (option
    dests) replace the defaults, and `--out`, unless given, is a fresh temporary directory that is
    removed at exit (a smoke run by hand left a model and its runs in /tmp every time)."""
    ap.add_argument("--smoke", action="store_true", help=HELP)
    if ap.parse_known_args()[0].smoke:
        ap.set_defaults(**sizes, out=None)
    args = ap.parse_args()
    if args.smoke and args.out is None:
        args.out = tempfile.mkdtemp(prefix="alignkit_smoke_")
        atexit.register(shutil.rmtree, args.out, ignore_errors=True)
    return args


def tiny_model_dir(out: str | Path) -> str:
    """A random-init Llama-style model with `alignkit.testing`'s word-level tokenizer, in OUT/tiny_model
    (written once): 2 blocks (the scripts' layer settings, such as frozen blocks or steered layers,
    are options whose smoke sizes fit them) of width 128, so that vLLM's CPU attention takes it
    (head size 32)."""
    from alignkit.testing import save_tiny_model_dir

    path = Path(out) / "tiny_model"
    if not (path / "config.json").is_file():
        save_tiny_model_dir(path, hidden=128, layers=2)
    return str(path)


def tiny_reward_model_dir(out: str | Path) -> str:
    """`tiny_model_dir`'s model with a random scalar head, as a reward model directory (OUT/tiny_reward_model)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, base = Path(out) / "tiny_reward_model", tiny_model_dir(out)
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return str(path)
