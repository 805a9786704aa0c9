"""Loss functions, registered by name. Importing this package registers them all."""

from alignkit.losses import dpo, sft  # noqa: F401  (registration side effect)
from alignkit.losses.registry import LossSpec, available, get, register, resolve

__all__ = ["LossSpec", "available", "get", "register", "resolve"]
