"""Experiment trackers by name (`train.report_to`): the packages each needs and how to install them.
`alignkit.train.trackers` implements one class per name."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from alignkit.errors import ConfigError
from alignkit.suggest import did_you_mean


@dataclass(frozen=True)
class TrackerSpec:
    name: str
    modules: tuple  # top-level packages it imports
    install: str  # the command that installs its packages


TRACKERS = {
    t.name: t
    for t in [
        TrackerSpec("tensorboard", ("tensorboard",), "pip install tensorboard"),  # a core dependency
        TrackerSpec("wandb", ("wandb",), 'pip install "alignkit[wandb]"'),
        TrackerSpec("trackio", ("trackio",), 'pip install "alignkit[trackio]"'),
        # mlflow-skinny is the tracking client; its SQLite store needs SQLAlchemy and alembic.
        TrackerSpec("mlflow", ("mlflow", "sqlalchemy", "alembic"), 'pip install "alignkit[mlflow]"'),
    ]
}


def check_names(report_to, where: str = "") -> None:
    """`train.report_to` must be a list of distinct tracker names."""
    valid = ", ".join(TRACKERS)
    if not isinstance(report_to, list):
        raise ConfigError(
            f"{where}`train.report_to` must be a list of trackers among {valid}, e.g. "
            f"`train.report_to=[tensorboard, wandb]` (`[]`: none); got {report_to!r}."
        )
    for name in report_to:
        if name not in TRACKERS:
            raise ConfigError(
                f"{where}`train.report_to`: unknown tracker {name!r}; valid: {valid} "
                f"(`[]`: none).{did_you_mean(name, TRACKERS)}"
            )
    if len(set(report_to)) != len(report_to):
        raise ConfigError(f"{where}`train.report_to` names a tracker twice: {report_to}.")


def check_installed(report_to) -> None:
    """A ConfigError naming the install command for the first tracker whose packages are missing.
    `find_spec` looks without importing, so this costs nothing before the model loads."""
    for name in report_to:
        spec = TRACKERS[name]
        missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"`train.report_to` includes {name}, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed: `{spec.install}`, "
                f"or remove {name} from `train.report_to` (`train.report_to=[]` keeps only metrics.jsonl)."
            )
