"""alignkit: align language models with human preferences.

    import alignkit
    cfg = alignkit.load_config("run.yaml", ["train.max_steps=100"])
    result = alignkit.train(cfg)

The names below are imported when first used (PEP 562), so `import alignkit.errors` or
`import alignkit.envs.sandbox` does not load torch and the trainer. No module inside alignkit
imports from this package root (the version lives in `alignkit.version`).
"""

from alignkit.quiet import install as _install_log_filters
from alignkit.version import __version__  # noqa: F401

_install_log_filters()  # torchao's import notes on a machine without CUDA (alignkit.quiet)

_LAZY = {
    "RunConfig": "alignkit.config",
    "load_config": "alignkit.config",
    "AlignkitError": "alignkit.errors",
    "ConfigError": "alignkit.errors",
    "DataError": "alignkit.errors",
    "ModelError": "alignkit.errors",
    "RunResult": "alignkit.train.loop",
    "train": "alignkit.api",
}

__all__ = [*_LAZY, "__version__"]


class _Root(__import__("types").ModuleType):
    """`alignkit.train` is the training function, as it was when this root imported it eagerly:
    importing the subpackage `alignkit.train` (which Python records on its parent) keeps it so."""

    @property
    def train(self):
        from alignkit.api import train

        return train

    @train.setter
    def train(self, value):  # the import system records the subpackage here; `alignkit.train` stays the function
        pass


__import__("sys").modules[__name__].__class__ = _Root


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")
