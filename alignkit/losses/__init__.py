"""Loss functions, registered by name. Importing this package registers them all."""

from alignkit.losses import (  # noqa: F401  (registration side effect)
    anchored,
    distill,
    dpo,
    fdpo,
    masked,
    online,
    ppo,
    reference_free,
    reward,
    sft,
    unpaired,
)
from alignkit.losses.registry import LossSpec, available, get, register, resolve

__all__ = ["LossSpec", "available", "get", "register", "resolve"]
