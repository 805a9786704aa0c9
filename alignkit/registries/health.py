"""The health monitor's rule names (`train.stop_on` names them; `alignkit.train.health` implements
each one under the same name, which tests/test_health.py checks)."""

from __future__ import annotations

from alignkit.errors import ConfigError
from alignkit.suggest import did_you_mean

RULE_NAMES = (
    "loss_stuck_at_ln2",
    "likelihood_displacement",
    "over_optimisation",
    "entropy_collapse",
    "runaway_length",
    "zero_variance_groups",
    "logprob_mismatch",
    "off_policy_drift",
    "grad_norm_spike",
    "eval_loss_rising",
    "harmful_compliance_rising",
)


def check_rule_names(names) -> None:
    """Every entry of `train.stop_on` is a rule name."""
    unknown = [r for r in names if not isinstance(r, str) or r not in RULE_NAMES]
    if unknown:
        raise ConfigError(
            f"`train.stop_on`: unknown health rule {unknown[0]!r}.{did_you_mean(unknown[0], RULE_NAMES)} "
            f"The rules are: {', '.join(RULE_NAMES)}."
        )
