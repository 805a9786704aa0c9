"""Unpaired preference records: one completion with a desirable / undesirable label.

    {"prompt": "...", "completion": "...", "label": true}

Strings or message lists as in pairs; `label` is a JSON boolean, 0/1, or text (CSV cells always
are) "true"/"false", "yes"/"no" or "1"/"0". Used by KTO and BCO (`recipe: unpaired`).
"""

from __future__ import annotations

from alignkit.data.examples import PreferenceExample, UnpairedExample
from alignkit.data.formats import LoadResult, Record, blank_prompt, check_columns, load_records
from alignkit.data.tokenize import tokenize_pairs
from alignkit.data.vision import IMAGES_FIELD

UNPAIRED_FIELDS = ("prompt", "completion", "label")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _label(rec: Record) -> bool:
    value = rec.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise rec.error(f"{rec.label('label')} must be true (desirable) or false (undesirable), found {value!r}")


def parse_unpaired_record(record: object, location: str, columns: dict | None = None) -> UnpairedExample:
    """Validate one unpaired record: prompt, completion and a boolean label."""
    columns = check_columns(columns, UNPAIRED_FIELDS, "unpaired")
    rec = Record(record, location, columns, UNPAIRED_FIELDS)
    prompt, prompt_plain = rec.messages("prompt", rec.get("prompt"), "user")
    if rec.has(IMAGES_FIELD):  # the images column (alignkit.data.vision)
        prompt, prompt_plain = rec.with_images(prompt), False
    if blank_prompt(prompt):
        raise rec.error(f"the prompt is empty ({rec.label('prompt')})")
    completion, completion_plain = rec.messages("completion", rec.get("completion"), "assistant")
    rec.check_completion(rec.label("completion"), completion)
    return UnpairedExample(tuple(prompt), tuple(completion), _label(rec), location, prompt_plain and completion_plain)


def load_unpaired_examples(
    path: str, *, columns=None, on_bad_record: str = "error", split: str | None = None
) -> LoadResult:
    """Read and validate every unpaired record of `path`."""
    columns = check_columns(columns, UNPAIRED_FIELDS, "unpaired")
    return load_records(path, parse_unpaired_record, columns, on_bad_record, split)


def tokenize_unpaired(examples: list, tokenizer, max_length: int, max_prompt_length):
    """Unpaired examples -> TokenizedPairs (completion, mismatched completion): example i's second
    completion is example i+1's, KTO's KL baseline (see `alignkit.train.recipes.unpaired`)."""
    as_pairs = [
        PreferenceExample(e.prompt, e.completion, examples[(i + 1) % len(examples)].completion, e.source, e.plain_text)
        for i, e in enumerate(examples)
    ]
    return tokenize_pairs(as_pairs, tokenizer, max_length, max_prompt_length)
