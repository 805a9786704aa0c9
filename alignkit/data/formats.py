"""Turn data records into validated `PreferenceExample`s and `SFTExample`s.

Preference records (the form is detected per record):
  (a) `prompt`, `chosen`, `rejected` strings -> one user turn, one assistant turn each; plain_text.
  (b) `prompt` a list of messages; `chosen` / `rejected` message lists, one message, or strings.
  (c) no `prompt`: `chosen` and `rejected` are whole transcripts (HH-RLHF strings or message lists)
      sharing everything before their last assistant turn, which becomes the prompt.
SFT records: `prompt` + `completion` (strings or messages), or `messages` (a whole conversation
whose final assistant message is the completion).

`columns` maps a canonical field to the file's column, e.g. {"prompt": "question"}. Every problem is
a `RecordError` (a `DataError`) that names the record's location (see `readers` for the forms),
what is wrong and how to fix it; loaders stop at the first one or, with on_bad_record="skip",
collect them in `LoadResult.skipped`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from alignkit.data.examples import ROLES, PreferenceExample, SFTExample
from alignkit.data.readers import RecordError, Unreadable, iter_raw, read_records
from alignkit.data.vision import IMAGES_FIELD, attach_images, check_parts, text_of
from alignkit.errors import ConfigError, DataError

__all__ = [
    "LoadResult",
    "RecordError",
    "load_preference_examples",
    "load_sft_examples",
    "parse_hh_transcript",
    "parse_preference_record",
    "parse_sft_record",
    "read_records",
]

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "completion", "messages")
ON_BAD_RECORD = ("error", "skip")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class LoadResult:
    """Examples loaded from one source, and every bad record that was skipped (never dropped)."""

    examples: list  # PreferenceExample or SFTExample
    skipped: list = field(default_factory=list)  # (location, reason) per skipped record
    path: str = ""

    def summary(self, max_reasons: int = 3) -> str:
        text = f"loaded {_plural(len(self.examples), 'example')} from {self.path}"
        if not self.skipped:
            return text
        shown = "; ".join(f"{loc}: {reason}" for loc, reason in self.skipped[:max_reasons])
        more = len(self.skipped) - max_reasons
        if more > 0:
            shown += f"; ... and {more} more"
        return f"{text}; skipped {_plural(len(self.skipped), 'bad record')} ({shown})"


def load_preference_examples(
    path: str,
    *,
    columns: dict[str, str] | None = None,
    on_bad_record: str = "error",
    split: str | None = None,
) -> LoadResult:
    """Read and validate every preference record of `path` (a file, a saved dataset or a hub id)."""
    columns = check_columns(columns, PREFERENCE_FIELDS, "preference")
    return load_records(path, parse_preference_record, columns, on_bad_record, split)


def load_sft_examples(
    path: str,
    *,
    columns: dict[str, str] | None = None,
    on_bad_record: str = "error",
    split: str | None = None,
) -> LoadResult:
    """Read and validate every SFT record of `path` (a file, a saved dataset or a hub id)."""
    columns = check_columns(columns, SFT_FIELDS, "SFT")
    return load_records(path, parse_sft_record, columns, on_bad_record, split)


def load_records(path, parse, columns, on_bad_record, split) -> LoadResult:
    if on_bad_record not in ON_BAD_RECORD:
        raise ConfigError(f"data.on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {on_bad_record!r}")
    result = LoadResult(examples=[], skipped=[], path=str(path))
    for location, record in iter_raw(path, split=split):
        try:
            if isinstance(record, Unreadable):
                raise RecordError(location, record.reason)
            result.examples.append(parse(record, location, columns))
        except RecordError as e:
            if on_bad_record == "error":
                raise RecordError(
                    e.location, f"{e.reason} (or set data.on_bad_record: skip to skip bad records)"
                ) from None
            result.skipped.append((e.location, e.reason))
    if not result.examples:
        first = "; ".join(f"{loc}: {reason}" for loc, reason in result.skipped[:3])
        raise DataError(
            f"{path}: no usable examples, nothing to train on: all {len(result.skipped)} records "
            f"are bad (first: {first})"
        )
    return result


def parse_preference_record(record: object, location: str, columns: dict[str, str] | None = None) -> PreferenceExample:
    """Validate one preference record (form (a), (b) or (c) of the module docstring)."""
    columns = check_columns(columns, PREFERENCE_FIELDS, "preference")
    rec = Record(record, location, columns, PREFERENCE_FIELDS)
    chosen_raw, rejected_raw = rec.get("chosen"), rec.get("rejected")
    if "prompt" in columns or rec.has("prompt"):
        prompt, prompt_plain = rec.messages("prompt", rec.get("prompt"), "user")
        chosen, chosen_plain = rec.messages("chosen", chosen_raw, "assistant")
        rejected, rejected_plain = rec.messages("rejected", rejected_raw, "assistant")
        plain = prompt_plain and chosen_plain and rejected_plain
    else:
        prompt, chosen, rejected = _split_transcripts(rec, chosen_raw, rejected_raw)
        plain = False  # roles came from a transcript: raw concatenation would lose them
    prompt = rec.with_images(prompt)
    plain = plain and all(isinstance(m["content"], str) for m in prompt)
    if blank_prompt(prompt):
        raise rec.error(f"the prompt is empty; preference data needs a prompt ({rec.label('prompt')})")
    rec.check_completion(rec.label("chosen"), chosen)
    rec.check_completion(rec.label("rejected"), rejected)
    if chosen == rejected:
        raise rec.error(
            "chosen and rejected are identical, so the pair says nothing; drop the record or fix one of them"
        )
    return PreferenceExample(tuple(prompt), tuple(chosen), tuple(rejected), location, plain)


def parse_sft_record(record: object, location: str, columns: dict[str, str] | None = None) -> SFTExample:
    """Validate one SFT record: `prompt` + `completion`, or `messages`."""
    columns = check_columns(columns, SFT_FIELDS, "SFT")
    rec = Record(record, location, columns, SFT_FIELDS)
    if "messages" in columns or (rec.has("messages") and not set(columns) & {"prompt", "completion"}):
        messages, _ = rec.messages("messages", rec.get("messages"), None)
        prompt, completion = _split_last_assistant(rec, "messages", messages, "conversation")
        rec.check_completion(f"the final assistant message of {rec.label('messages')}", completion)
        return SFTExample(tuple(rec.with_images(prompt)), tuple(completion), location, plain_text=False)
    if not ({"prompt", "completion"} & set(columns) or rec.has("prompt") or rec.has("completion")):
        raise rec.error(
            f"has neither 'messages' nor 'prompt' + 'completion' (found fields: {rec.found()}); "
            "map yours with data.columns, e.g. {prompt: question, completion: answer}"
        )
    prompt_raw, completion_raw = rec.get("prompt"), rec.get("completion")
    # An empty prompt string is allowed: it means pure language modelling on the completion.
    prompt, prompt_plain = ([], True) if prompt_raw == "" else rec.messages("prompt", prompt_raw, "user")
    completion, completion_plain = rec.messages("completion", completion_raw, "assistant")
    rec.check_completion(rec.label("completion"), completion)
    if rec.has(IMAGES_FIELD):
        prompt, prompt_plain = rec.with_images(prompt), False
    return SFTExample(tuple(prompt), tuple(completion), location, prompt_plain and completion_plain)


def parse_hh_transcript(text: str, location: str) -> list[dict]:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into chat messages.

    "Human" becomes user and "Assistant" assistant; each turn's content is stripped of surrounding
    whitespace. Only a marker after a blank line starts a turn: HH has replies that contain
    "Human:" mid-line (a model continuing the dialogue), which stay part of the reply.
    """
    return _parse_hh(text, location, "transcript")


def _parse_hh(
    text: str, location: str, what: str, hint: str = "give the prompt as its own field, or use message lists"
) -> list[dict]:
    body = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    parts = _HH_TURN.split(body)  # [head, speaker, content, speaker, content, ...]
    if len(parts) == 1:
        raise RecordError(
            location,
            f"{what} is not an HH transcript: it has no '\\n\\nHuman:' or '\\n\\nAssistant:' turns; {hint}",
        )
    if parts[0].strip():
        raise RecordError(
            location,
            f"{what} has text before its first turn ({_snippet(parts[0].strip())}); an HH transcript starts "
            "with '\\n\\nHuman:'",
        )
    return [
        {"role": _HH_ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])
    ]


def _split_transcripts(rec: Record, chosen_raw, rejected_raw):
    """Form (c): the prompt is what both transcripts share before their last assistant turn."""
    chosen_all = rec.transcript("chosen", chosen_raw)
    rejected_all = rec.transcript("rejected", rejected_raw)
    chosen_prompt, chosen = _split_last_assistant(rec, "chosen", chosen_all)
    rejected_prompt, rejected = _split_last_assistant(rec, "rejected", rejected_all)
    if chosen_prompt != rejected_prompt:
        turn = next(
            (i for i, (c, r) in enumerate(zip(chosen_prompt, rejected_prompt)) if c != r),
            min(len(chosen_prompt), len(rejected_prompt)),
        )
        raise rec.error(
            f"chosen and rejected transcripts differ before their last assistant turn (at turn "
            f"{turn + 1}: chosen has {_describe_turn(chosen_prompt, turn)}, rejected has "
            f"{_describe_turn(rejected_prompt, turn)}); they must share the conversation before "
            "the final reply: fix the transcripts or give the prompt as its own field"
        )
    return chosen_prompt, chosen, rejected


def _split_last_assistant(rec: Record, name: str, messages: list, kind: str = "transcript"):
    """Split a conversation into (everything before the final assistant turn, [that turn])."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise rec.error(
            f"the {rec.label(name)} {kind} has no assistant turn, so there is no reply to learn "
            "from; it needs a final '\\n\\nAssistant:' turn or a message with role 'assistant'"
        )
    if last != len(messages) - 1:
        raise rec.error(
            f"the {rec.label(name)} {kind} ends with a {messages[-1]['role']!r} turn after its "
            "last assistant turn; it must end with the assistant reply"
        )
    return messages[:last], messages[last:]


class Record:
    """A record seen through the column mapping, so that errors name the user's column names."""

    def __init__(self, record, location: str, columns: dict, canonical: tuple):
        if not isinstance(record, Mapping):
            raise RecordError(
                location,
                f"expected a JSON object with fields like {', '.join(canonical)}, found {_describe(record)}",
            )
        self.record, self.location, self.columns = record, location, columns

    def has(self, name: str) -> bool:
        return self.columns.get(name, name) in self.record

    def get(self, name: str):
        key = self.columns.get(name, name)
        if key not in self.record:
            if name in self.columns:
                raise self.error(
                    f"field {key!r} (mapped from {name!r} by data.columns) is missing (found "
                    f"fields: {self.found()}); fix the mapping in data.columns"
                )
            raise self.error(
                f"field {name!r} is missing (found fields: {self.found()}); if the file names it "
                f"differently, map it with data.columns, e.g. {{{name}: your_column}}"
            )
        return self.record[key]

    def label(self, name: str) -> str:
        key = self.columns.get(name, name)
        return f"field {key!r}" if key == name else f"field {key!r} ({name})"

    def found(self) -> str:
        keys = [repr(k) for k in self.record]
        return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "") if keys else "none"

    def error(self, reason: str) -> RecordError:
        return RecordError(self.location, reason)

    def messages(self, name: str, value, string_role: str | None) -> tuple[list, bool]:
        """Normalise a field to a list of messages; also say whether it was a plain string."""
        if isinstance(value, str) and string_role is not None:
            return [{"role": string_role, "content": value}], True
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, (list, tuple)):
            kinds = "a string or a list of messages" if string_role else "a list of messages"
            raise self.error(f"{self.label(name)} must be {kinds}, found {_describe(value)}")
        return [self.message(name, i, m) for i, m in enumerate(value)], False

    def transcript(self, name: str, value) -> list:
        if isinstance(value, str):
            hint = (
                f"with no prompt field (found fields: {self.found()}), chosen and rejected must be "
                "whole transcripts; if the prompt is in another column, map it with data.columns, "
                "e.g. {prompt: your_column}"
            )
            return _parse_hh(value, self.location, self.label(name), hint)
        if isinstance(value, (list, tuple)):
            return self.messages(name, value, None)[0]
        raise self.error(
            f"{self.label(name)} must be a transcript (an HH '\\n\\nHuman: ...' string or a list of "
            f"messages) when there is no prompt field, found {_describe(value)}"
        )

    def message(self, name: str, index: int, m) -> dict:
        where = f"message {index} of {self.label(name)}"
        if not isinstance(m, Mapping):
            raise self.error(f"{where} is {_describe(m)}; a message is {{role: ..., content: ...}}")
        for key in ("role", "content"):
            if key not in m:
                hint = " (ShareGPT's from/value? rename them to role/content)" if "from" in m else ""
                raise self.error(f"{where} has no {key!r} (found keys: {', '.join(map(repr, m))}){hint}")
        if m["role"] not in ROLES:
            raise self.error(f"{where} has unknown role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if isinstance(m["content"], (list, tuple)) and m["role"] != "assistant":  # text and image parts
            return {
                **{k: v for k, v in m.items() if v is not None},
                "content": check_parts(m["content"], where, self.location),
            }
        if not isinstance(m["content"], str):
            parts = " (content parts, such as images, go in prompt messages only)" if m["role"] == "assistant" else ""
            raise self.error(f"{where} has content {_describe(m['content'])}; content must be a string{parts}")
        # A copy that keeps extra keys (name, tool_calls) for the chat template, minus nulls:
        # Arrow structs (Parquet, datasets) fill a key missing from one message with null, and
        # templates that test `message.tool_calls is defined` would take a null as present.
        return {k: v for k, v in m.items() if v is not None}

    def with_images(self, prompt: list) -> list:
        """The prompt with the record's `images` column placed in it (`alignkit.data.vision`)."""
        if IMAGES_FIELD not in self.record or self.record[IMAGES_FIELD] is None:
            return prompt
        return attach_images(prompt, self.record[IMAGES_FIELD], self.location, f"field {IMAGES_FIELD!r}")

    def check_completion(self, label: str, messages: list) -> None:
        if not messages:
            raise self.error(f"{label} is empty: it has no messages")
        if messages[-1]["role"] != "assistant":
            raise self.error(
                f"{label} must end with an assistant message, but its last message has role {messages[-1]['role']!r}"
            )
        if not messages[-1]["content"].strip():
            raise self.error(
                f"{label} has an empty completion (the final assistant reply is blank); drop the "
                "record or fill in the reply"
            )


def blank_prompt(messages) -> bool:
    """No message has text or an image."""
    return not any(text_of(m["content"]).strip() or not isinstance(m["content"], str) for m in messages)


def check_columns(columns, allowed: tuple, kind: str) -> dict:
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise ConfigError(f"data.columns must be a mapping like {{prompt: question}}, got {columns!r}")
    unknown = [k for k in columns if k not in allowed]
    if unknown:
        raise ConfigError(
            f"data.columns has unknown key(s) {unknown} for {kind} data; valid keys: "
            f"{', '.join(allowed)} (each maps one of them to your file's column name)"
        )
    not_str = {k: v for k, v in columns.items() if not isinstance(v, str)}
    if not_str:
        raise ConfigError(f"data.columns values must be column names (strings), got {not_str}")
    if "messages" in columns and set(columns) & {"prompt", "completion"}:
        raise ConfigError("data.columns maps both 'messages' and 'prompt'/'completion'; use one form")
    return dict(columns)


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({_snippet(value)})"
    if isinstance(value, Mapping):
        return f"an object with keys {list(value)[:8]}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def _describe_turn(messages: list, index: int) -> str:
    if index >= len(messages):
        return "its final assistant reply there"
    return f"{messages[index]['role']} {_snippet(text_of(messages[index]['content']))}"


def _snippet(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
