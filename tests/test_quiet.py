"""`alignkit.quiet`: torchao's import notes on a machine without CUDA (its CUDA kernel libraries
cannot load; torch's deprecation of the way torchao registers its enums) do not reach a run's
output, and nothing else those loggers say is hidden."""

import importlib.util
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("torchao") is None, reason="torchao is not installed (alignkit[qlora])"
    ),
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="with CUDA, torchao loads its kernel libraries, and a failure to load them stays visible",
    ),
]

NOISE = ("Failed to load", "torchao/_C", "KernelPreference", "ScaleCalculationMode")  # torchao's enums


def _stderr(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_without_alignkit_torchaos_import_is_noisy_here():
    """What the filters are for, on this machine (if torchao stops logging these, the next test
    proves nothing and this one says so)."""
    err = _stderr("import transformers.quantizers")
    assert all(n in err for n in NOISE), err


def test_a_run_loading_transformers_after_alignkit_shows_none_of_it():
    """transformers imports torchao whenever it is installed (as loading any tokenizer does); after
    `import alignkit` none of the notes show, and another warning on the same loggers still does."""
    err = _stderr(
        "import logging, alignkit.models, transformers.quantizers, torchao.quantization\n"
        "logging.getLogger('torchao').warning('a torchao warning that matters')\n"
        "logging.getLogger('torch.utils._pytree').warning('%s is an Enum subclass of mine', 'Mine')\n"
    )
    assert not any(n in err for n in NOISE), err
    assert "a torchao warning that matters" in err and "Mine is an Enum subclass of mine" in err, err
