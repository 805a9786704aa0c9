"""Prompt records for online training and generation: a prompt plus any other columns.

    {"prompt": "What is 7 * 6?", "answer": "#### 42"}
    {"question": "...", "answer": "..."}          with data.columns: {prompt: question}

The prompt is a string (one user turn) or a message list ending in a user (or system) turn. Every
other field of the record is kept as a column and handed to reward functions by name, so a
verifier can compare a completion with the record's reference answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.data.formats import LoadResult, Record, blank_prompt, check_columns, load_records
from alignkit.data.tokenize import encode_text, render_prompt
from alignkit.data.vision import IMAGES_FIELD, VisionInputs, require_vision
from alignkit.errors import DataError

PROMPT_FIELDS = ("prompt",)


@dataclass
class PromptExample:
    prompt: tuple  # messages
    columns: dict = field(default_factory=dict)  # the record's other fields
    source: str = ""
    plain_text: bool = False


@dataclass
class TokenizedPrompt:
    prompt_ids: list
    index: int
    truncated: bool = False
    vision: VisionInputs | None = None  # the prompt's pixel inputs (vision-language models)


def parse_prompt_record(record: object, location: str, columns: dict | None = None) -> PromptExample:
    columns = check_columns(columns, PROMPT_FIELDS, "prompt")
    rec = Record(record, location, columns, PROMPT_FIELDS)
    messages, plain = rec.messages("prompt", rec.get("prompt"), "user")
    if rec.has(IMAGES_FIELD):
        messages, plain = rec.with_images(messages), False
    if blank_prompt(messages):
        raise rec.error(f"the prompt is empty ({rec.label('prompt')})")
    if messages[-1]["role"] == "assistant":
        raise rec.error(
            f"{rec.label('prompt')} ends with an assistant message; a prompt ends with the turn the "
            "model answers (user or system)"
        )
    key = columns.get("prompt", "prompt")
    other = {k: v for k, v in record.items() if k not in (key, IMAGES_FIELD)}
    return PromptExample(tuple(messages), other, location, plain)


def load_prompt_examples(
    path: str, *, columns=None, on_bad_record: str = "error", split: str | None = None
) -> LoadResult:
    """Read and validate every prompt record of `path`."""
    columns = check_columns(columns, PROMPT_FIELDS, "prompt")
    return load_records(path, parse_prompt_record, columns, on_bad_record, split)


def first_record(path: str):
    """The first raw record of `path` (None for an empty file): what a loader that takes more than
    one record form looks at to choose."""
    from alignkit.data.readers import iter_raw

    return next((rec for _, rec in iter_raw(path)), None)


def load_prompts_or_pairs(path: str) -> tuple[LoadResult, bool]:
    """Prompt records, or preference pairs (HH-RLHF transcripts included) when the first record has
    `chosen` and `rejected`: (every usable example, bad records skipped and counted; is it pairs?).
    Either kind has `.prompt` and `.source`; pairs also `.chosen` and `.rejected`."""
    first = first_record(path)
    if isinstance(first, dict) and "chosen" in first and "rejected" in first:
        from alignkit.data.formats import load_preference_examples

        return load_preference_examples(path, on_bad_record="skip"), True
    return load_prompt_examples(path, on_bad_record="skip"), False


def tokenize_prompts(examples: list, tokenizer, max_prompt_length: int) -> tuple[list, int]:
    """Prompt token ids (chat template with the generation prompt), cut to their last
    `max_prompt_length` tokens; returns (items, number truncated). A prompt with images is never
    cut (a cut could part an image's tokens from its pixels): longer is an error."""
    out, cut = [], 0
    for i, ex in enumerate(examples):
        vision = require_vision(tokenizer, ex.prompt, ex.source)
        p_text = render_prompt(tokenizer, ex.prompt, ex.plain_text)
        if vision is not None:
            ids, pixels = vision.encode_prompt(p_text, ex.prompt, ex.source)
            if len(ids) > max_prompt_length:
                raise DataError(
                    f"{ex.source}: the prompt is {len(ids)} tokens with its {pixels.num_images} image(s), over the "
                    f"{max_prompt_length} a prompt may take (data.max_prompt_length, else data.max_length minus "
                    "generation.max_new_tokens); raise it or use smaller images"
                )
            out.append(TokenizedPrompt(ids, i, False, pixels))
            continue
        ids, _ = encode_text(tokenizer, p_text, "")
        truncated = len(ids) > max_prompt_length
        cut += truncated
        out.append(TokenizedPrompt(ids[-max_prompt_length:], i, truncated))
    return out, cut


def prompt_columns(examples: list) -> dict:
    """{column: one value per example} over the columns any of the prompt examples has (what a
    reward receives as `**columns`)."""
    keys = sorted({k for ex in examples for k in ex.columns})
    return {k: [ex.columns.get(k) for ex in examples] for k in keys}
