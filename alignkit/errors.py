"""Exception types for mistakes a user can fix.

Every message says what was wrong, where (file:line, config key) and how to fix it.
`assert` stays reserved for internal invariants.
"""


class AlignkitError(Exception):
    """Base class for errors caused by user input (config, data, model paths)."""


class ConfigError(AlignkitError, ValueError):
    """A config file or key=value override is invalid."""


class DataError(AlignkitError, ValueError):
    """A data file or record is invalid; the message names the file and line or row."""


class ModelError(AlignkitError, ValueError):
    """A model cannot be found or loaded as asked."""
