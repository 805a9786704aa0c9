"""User code named as `path/to/file.py:name` or `package.module:name` (reward functions,
environments): the one place that imports it."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from alignkit.errors import ConfigError


def load_module(target: str, what: str, module_name: str | None = None):
    """The module `target` names (a .py file or an importable module); `what` opens the error
    messages (e.g. "reward function file", "environment")."""
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"{what} {path} not found: the file does not exist.")
        spec = importlib.util.spec_from_file_location(module_name or path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(f"{what}: cannot import {target!r}: {e}") from None
