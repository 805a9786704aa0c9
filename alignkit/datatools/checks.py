"""What the data commands check before they load a model or create a file: option values, and the
columns each record needs.

Why before: a mistake found after the work started surfaced as a traceback (a KeyError on a record,
a ValueError from a plot) minutes into a run, and could leave a `.partial` log behind that made the
corrected command ask for --resume. Every error here names the option, or the file:line and the
column, and says how to fix it; they are `ConfigError` / `DataError`, which the CLI reports with
exit code 2.
"""

from __future__ import annotations

import math

from alignkit.errors import ConfigError, DataError
from alignkit.rewards.principles import load_principles

MESSAGES_HINT = 'text, or a list of {"role": ..., "content": ...} messages with a user message'


def at_least(value, minimum, option: str, why: str = "") -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{option} {value}: must be at least {minimum}{why}.")


def within(
    value, low: float, high: float, option: str, what: str, *, open_low: bool = False, open_high: bool = False
) -> None:
    """`value` a finite number in [low, high]; `open_low` / `open_high` leave out that end."""
    if value is None:
        return
    low_ok = value > low if open_low else value >= low
    high_ok = value < high if open_high else value <= high
    if not (math.isfinite(value) and low_ok and high_ok):
        raise ConfigError(
            f"{option} {value}: {what}, in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}."
        )


def model_options(args) -> None:
    """The options every data command takes to reach a model (`commands.add_model_args`)."""
    at_least(getattr(args, "max_new_tokens", None), 1, "--max-new-tokens", " (tokens generated per reply)")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature {temperature}: must be 0 (greedy) or more.")
    at_least(getattr(args, "batch_size", None), 1, "--batch-size", " (prompts sampled together)")
    at_least(getattr(args, "concurrency", None), 1, "--concurrency", " (requests in flight at once)")
    at_least(getattr(args, "retries", None), 0, "--retries")
    if getattr(args, "endpoint", None) and not getattr(args, "model", None):
        raise ConfigError(f"--endpoint {args.endpoint} needs --model NAME: the model name the server serves.")
    for option in ("tokenizer", "api_key_file"):
        if getattr(args, option, None) and not getattr(args, "endpoint", None):
            raise ConfigError(
                f"--{option.replace('_', '-')} is for --endpoint (a server); a local --model uses its "
                "own tokenizer and needs no key: leave it out."
            )
    api_key(args)


def api_key(args) -> str | None:
    """The key in `--api-key-file` (None without the option: the client then reads OPENAI_API_KEY)."""
    path = getattr(args, "api_key_file", None)
    if not path:
        return None
    try:
        key = open(path, encoding="utf-8").read().strip()
    except OSError as e:
        raise ConfigError(
            f"--api-key-file {path}: cannot read it ({e.strerror}); give the file that holds the "
            "server's key (for `alignkit vllm-serve`, the token file it printed at start)."
        ) from None
    if not key:
        raise ConfigError(f"--api-key-file {path} is empty; it must hold the server's key on one line.")
    return key


def synth_options(args):
    """The options and inputs of `data synth`; returns (principles spec, prompts) for self-align."""

    model_options(args)
    at_least(args.min_words, 0, "--min-words")
    at_least(args.max_words, 0, "--max-words")
    if args.max_words < args.min_words:
        raise ConfigError(
            f"--min-words {args.min_words} is above --max-words {args.max_words}: every record would "
            "be dropped; set --min-words <= --max-words."
        )
    within(args.max_repetition, 0.0, 1.0, "--max-repetition", "a share of repeated word trigrams")
    within(args.dedup_threshold, 0.0, 1.0, "--dedup-threshold", "a MinHash Jaccard similarity", open_low=True)
    if args.method == "magpie":
        at_least(args.n, 1, "--n", " (instructions to synthesise)")
        if args.n > 1 and args.temperature <= 0:
            raise ConfigError(
                f"--temperature {args.temperature} with --method magpie samples the same instruction "
                f"{args.n} times; set a sampling temperature (the paper uses 1.0, the default)."
            )
        if args.endpoint and not args.tokenizer:
            raise ConfigError(
                "--method magpie with --endpoint needs --tokenizer (a local copy of the served "
                "model's tokenizer): Magpie writes the chat template's user header itself."
            )
        return None, None
    if not args.principles or not args.prompts:
        raise ConfigError(
            "--method self-align needs --principles FILE (principles and exemplars) and --prompts "
            "FILE (the prompts to answer)."
        )
    spec = load_principles(args.principles)
    rows = read_rows(args.prompts, "--prompts")
    for where, rec in rows:  # Self-Align answers text prompts only
        text_column(where, rec, "prompt", "--prompts", "synth --method self-align", blank=False)
    return spec, [rec["prompt"] for _, rec in rows]


def reward_inputs(spec) -> dict:
    """The local files a reward spec reads whose contents a --resume must check: a reward function's
    .py file (`rewards.py:score`) or a judge's principles file. A reward-model directory is not
    hashed (gigabytes of weights), as no model is."""
    if isinstance(spec, str) and ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        return {"--reward": spec.rsplit(":", 1)[0]}
    if isinstance(spec, dict) and isinstance(spec.get("principles"), str):
        return {"--reward": spec["principles"]}
    return {}


def read_rows(path: str, option: str) -> list[tuple[str, dict]]:
    """(location, record) for every record of `path` (`file.jsonl:12`, as `alignkit.data.readers`
    names them); a record that is not an object with named columns is an error naming its line."""
    from alignkit.data.readers import read_records

    rows = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: a record of {option} must be an object with named columns (e.g. "
                f'{{"prompt": "..."}}), not {_a(record)}; fix or remove that line.'
            )
        rows.append((where, record))
    return rows


def prompt(where: str, record: dict, option: str, command: str):
    """Check a record's `prompt` column: non-blank text, or messages with a non-blank user message."""
    if "prompt" not in record:
        cols = ", ".join(f"`{k}`" for k in record) or "none"
        raise DataError(
            f"{where}: no `prompt` column (the record has {cols}); `alignkit data {command}` needs "
            f"every record of {option} to have `prompt`: {MESSAGES_HINT}. Add it to that record."
        )
    value = record["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: column `prompt` is blank; give the instruction's text, or remove the record.")
        return value
    if not isinstance(value, list):
        raise DataError(f"{where}: column `prompt` is {_a(value)} ({_short(value)}); it must be {MESSAGES_HINT}.")
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(
                f"{where}: column `prompt`, message {j} ({_short(m)}) is not "
                '{"role": "...", "content": "..."} with text for both; fix that message.'
            )
    if not any(m["role"] == "user" and m["content"].strip() for m in value):
        raise DataError(
            f'{where}: column `prompt` has no user message with text; add one ({{"role": "user", "content": "..."}}).'
        )
    return value


def text_column(
    where: str,
    record: dict,
    column: str,
    option: str,
    command: str,
    *,
    required: bool = True,
    blank: bool = True,
    why: str = "",
) -> None:
    """Check that a record's `column` is text (missing is an error only when `required`; blank text
    only when not `blank`). `why`: said after the requirement, e.g. which mode of the command needs it."""
    if column not in record:
        if required:
            cols = ", ".join(f"`{k}`" for k in record) or "none"
            raise DataError(
                f"{where}: no `{column}` column (the record has {cols}); `alignkit data {command}` "
                f"needs every record of {option} to have `{column}` (text){why}. Add it to that record."
            )
        return
    if not isinstance(record[column], str):
        raise DataError(
            f"{where}: column `{column}` is {_a(record[column])} ({_short(record[column])}); it must be text."
        )
    if not blank and not record[column].strip():
        raise DataError(f"{where}: column `{column}` is blank; give it text, or remove the record.")


def _a(value) -> str:
    """ "a list", "an int": the type of `value` with its article."""
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
