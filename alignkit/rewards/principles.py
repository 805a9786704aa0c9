"""The one principles file, read by every command that takes `--principles` (the principle judge,
`data judge|pairs|principles`, Self-Align synthesis) and by the `judge` reward:

    principles:                         # required: sentences the replies should follow
      - Be honest: say when you do not know.
      - Refuse clearly harmful requests, and say why.
    exemplars:                          # optional (Self-Align): worked examples
      - prompt: Who won the 2030 World Cup?
        completion: I do not know; my knowledge stops before 2030.
    template: "..."                     # optional (the judge): your scoring prompt
    compare_template: "..."             # optional (the judge): your A-vs-B prompt

Mistakes raise `PrinciplesError`, naming the file (and line, for YAML syntax) and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from alignkit.errors import ConfigError, DataError
from alignkit.suggest import closest

KEYS = ("principles", "exemplars", "template", "compare_template")
EXEMPLAR_KEYS = ("prompt", "completion")


class PrinciplesError(DataError, ConfigError):
    """A principles file is missing or malformed: a file the user wrote (data) that configures a
    judge or a synthesis run (configuration), so it is both."""


class PrinciplesFile(NamedTuple):
    principles: list  # non-empty strings
    exemplars: list  # {"prompt", "completion"} mappings (Self-Align)
    template: str | None = None  # the judge's scoring prompt (checked by the judge against its fields)
    compare_template: str | None = None  # the judge's A-vs-B prompt


def check_lists(principles, exemplars, where: str) -> None:
    """Raise PrinciplesError naming `where` (a file, or the function) when the lists are malformed."""
    if not isinstance(principles, (list, tuple)) or isinstance(principles, str) or not principles:
        raise PrinciplesError(
            f"{where}: `principles` must be a non-empty list of strings, "
            f"got {type(principles).__name__ if principles is not None else 'nothing'}"
        )
    for i, p in enumerate(principles):
        if not isinstance(p, str) or not p.strip():
            raise PrinciplesError(f"{where}: principles[{i}] must be a non-empty string, got {p!r}")
    if not isinstance(exemplars, list):
        raise PrinciplesError(
            f"{where}: `exemplars` must be a list of {{prompt, completion}} mappings, got {type(exemplars).__name__}"
        )
    for i, ex in enumerate(exemplars):
        if not isinstance(ex, dict):
            raise PrinciplesError(
                f"{where}: exemplars[{i}] must be a mapping with `prompt` and `completion`, got {ex!r}"
            )
        for key in ex:
            if key not in EXEMPLAR_KEYS:
                near = closest(key, EXEMPLAR_KEYS)
                raise PrinciplesError(
                    f"{where}: exemplars[{i}] has an unknown key `{key}`"
                    + (f"; did you mean `{near}`?" if near else "; use `prompt` and `completion`")
                )
        for key in EXEMPLAR_KEYS:
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                raise PrinciplesError(
                    f"{where}: exemplars[{i}] needs `{key}` as a non-empty string, got {ex.get(key)!r}"
                )


def load_principles(path) -> PrinciplesFile:
    """Read and check a principles file (see the module docstring)."""
    import yaml

    p = Path(path).expanduser()
    where = f"principles file {path}"
    if not p.is_file():
        raise PrinciplesError(f"{where} not found; give a YAML file with `principles: [...]`.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise PrinciplesError(f"principles file {at}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise PrinciplesError(
            f"{where}: expected a mapping with a `principles:` list (and optional `exemplars:`), "
            f"got {type(data).__name__ if data is not None else 'an empty file'}"
        )
    for key in data:
        if key not in KEYS:
            near = closest(key, KEYS)
            raise PrinciplesError(
                f"{where}: unknown key `{key}`"
                + (f"; did you mean `{near}`?" if near else f"; the keys are {', '.join(KEYS)}")
            )
    if "principles" not in data:
        raise PrinciplesError(f"{where}: missing key `principles` (a list of strings, one principle each)")
    exemplars = [] if data.get("exemplars") is None else data["exemplars"]
    check_lists(data["principles"], exemplars, where)
    for key in ("template", "compare_template"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise PrinciplesError(f"{where}: `{key}` must be a string (a prompt with placeholders)")
    return PrinciplesFile(
        list(data["principles"]), [dict(e) for e in exemplars], data.get("template"), data.get("compare_template")
    )
