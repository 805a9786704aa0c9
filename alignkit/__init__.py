"""alignkit: align language models with human preferences.

    import alignkit
    cfg = alignkit.load_config("run.yaml", ["train.max_steps=100"])
    result = alignkit.train(cfg)

No module inside alignkit imports from this package root (the version lives in
`alignkit.version`), so importing it here cannot close an import cycle.
"""

from alignkit.version import __version__  # noqa: F401
from alignkit.config import RunConfig, load_config  # noqa: E402
from alignkit.errors import AlignkitError, ConfigError, DataError, ModelError  # noqa: E402
from alignkit.train.loop import RunResult, train  # noqa: E402

__all__ = ["RunConfig", "RunResult", "load_config", "train", "AlignkitError", "ConfigError", "DataError",
           "ModelError", "__version__"]
