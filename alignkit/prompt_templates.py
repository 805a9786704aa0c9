"""Prompt templates that users can read and replace (the judge's, the data tools'): `{name}`
placeholders filled in one pass, every other brace left as written (a template may hold JSON)."""

from __future__ import annotations

import re

from alignkit.errors import ConfigError


def braced(fields) -> str:
    return ", ".join("{" + f + "}" for f in fields)


def check_template(template, fields, where: str) -> str:
    """`template` if it is text holding every placeholder of `fields`, else a ConfigError naming `where`."""
    if not isinstance(template, str):
        raise ConfigError(f"{where} must be text with the placeholders {braced(fields)}; got {template!r}.")
    missing = [f for f in fields if "{" + f + "}" not in template]
    if missing:
        raise ConfigError(
            f"{where} lacks {braced(missing)}; add it where the text should go (the placeholders are {braced(fields)})."
        )
    return template


def fill_template(template: str, where: str, **fields) -> str:
    """`template` with each `{name}` of `fields` replaced by its value, in one pass (a value that
    happens to contain "{instruction}" is not substituted again); checked by `check_template`."""
    check_template(template, fields, where)
    pattern = re.compile(r"\{(" + "|".join(re.escape(f) for f in fields) + r")\}")
    return pattern.sub(lambda m: str(fields[m.group(1)]), template)
