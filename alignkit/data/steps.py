"""Step-labelled replies for process reward models (`recipe: prm`): a reply split into reasoning
steps, each labelled by whether it is right (Math-Shepherd, arXiv 2312.08935; PRM800K).

    {"prompt": "...", "steps": ["step 1", "step 2", ...], "labels": [1, 1, 0]}
    {"prompt": "...", "completion": "step 1\\nstep 2\\nstep 3", "labels": [1, 1, 0]}

A label is 1 (or true: the step is right), 0 (or false), or a share in [0, 1] (Math-Shepherd's soft
label: the share of rollouts from the step that reached the answer). With `completion`, the steps
are its parts between `reward.step_separator` (empty parts dropped). The reply is laid out as the
steps joined by the separator; a step is scored at its last token.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from alignkit.data.formats import LoadResult, Record, check_columns, load_records
from alignkit.data.tokenize import as_messages, encode_text, render_texts, truncate

STEP_FIELDS = ("prompt", "steps", "completion", "labels")


@dataclass(frozen=True)
class StepExample:
    prompt: tuple  # tuple[Message, ...]
    steps: tuple  # tuple[str, ...]
    labels: tuple  # tuple[float, ...], one per step, in [0, 1]
    source: str
    plain_text: bool = False


@dataclass(frozen=True)
class TokenizedSteps:
    prompt_ids: list
    completion_ids: list
    step_ends: list  # index in completion_ids of each kept step's last token
    labels: list  # the kept steps' labels
    index: int
    truncated: bool = False
    dropped: int = 0  # steps past max_length (their labels are not trained on)


def split_steps(text: str, separator: str) -> list[str]:
    return [s for s in text.split(separator) if s.strip()]


def parse_step_record(record: object, location: str, columns: dict | None = None, *, separator: str = "\n"):
    columns = check_columns(columns, STEP_FIELDS, "step")
    rec = Record(record, location, columns, STEP_FIELDS)
    prompt, plain = rec.messages("prompt", rec.get("prompt"), "user")
    if rec.has("steps"):
        steps = rec.get("steps")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
            raise rec.error(f"{rec.label('steps')} must be a non-empty list of non-empty strings, found {steps!r}")
    elif rec.has("completion") and isinstance(rec.get("completion"), str):
        steps = split_steps(rec.get("completion"), separator)
        if not steps:
            raise rec.error(f"{rec.label('completion')} has no step between separators {separator!r}")
    else:
        raise rec.error(
            f"has neither 'steps' (a list) nor 'completion' (text split at reward.step_separator={separator!r}); "
            f"found fields: {rec.found()}"
        )
    labels = rec.get("labels")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise rec.error(
            f"{rec.label('labels')} must be a list of one label per step ({len(steps)} steps), found {labels!r}"
        )
    out = []
    for i, v in enumerate(labels):
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise rec.error(f"label {i} of {rec.label('labels')} must be 1, 0 or a share in [0, 1], found {v!r}")
        out.append(float(v))
    return StepExample(tuple(prompt), tuple(steps), tuple(out), location, plain)


def load_step_examples(
    path: str, *, columns=None, on_bad_record: str = "error", split: str | None = None, separator: str = "\n"
) -> LoadResult:
    columns = check_columns(columns, STEP_FIELDS, "step")
    return load_records(path, functools.partial(parse_step_record, separator=separator), columns, on_bad_record, split)


def encode_steps(tokenizer, prompt, steps: list, separator: str, plain: bool | None = None) -> tuple:
    """(prompt ids, reply ids, the index in the reply ids of each step's last token): the reply is
    the steps joined by `separator`, laid out as training and scoring lay out a completion (the chat
    template when the tokenizer has one); step ends come from the tokenizer's character offsets.
    `prompt`: a string or messages (`plain` given: messages, and whether they were a string)."""
    content = separator.join(steps)
    messages, plain = as_messages(prompt) if plain is None else (tuple(prompt), plain)
    p_text, c_text = render_texts(tokenizer, messages, ({"role": "assistant", "content": content},), plain)
    prompt_ids, completion_ids = encode_text(tokenizer, p_text, c_text)
    start = c_text.find(content)
    enc = tokenizer(c_text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    ends, pos = [], start
    for step in steps:
        pos += len(step)
        last_char = pos - 1
        token = next((i for i, (a, b) in enumerate(offsets) if a <= last_char < b), None)
        if token is None:  # a character no token covers (stripped whitespace): the token before it
            token = max((i for i, (a, _) in enumerate(offsets) if a <= last_char), default=0)
        ends.append(token)
        pos += len(separator)
    return prompt_ids, completion_ids, ends


def tokenize_steps(examples: list, tokenizer, max_length: int, max_prompt_length: int | None, separator: str):
    """StepExamples -> (TokenizedSteps, notes): prompt and reply truncated as `data.max_length`
    says (the prompt's end, the reply's start); steps that no longer end inside are dropped and
    counted."""
    out, dropped, cut = [], 0, 0
    for i, ex in enumerate(examples):
        prompt_ids, completion_ids, ends = encode_steps(tokenizer, ex.prompt, list(ex.steps), separator, ex.plain_text)
        prompt_ids, (completion_ids,), was_cut = truncate(prompt_ids, [completion_ids], max_length, max_prompt_length)
        keep = [k for k, e in enumerate(ends) if e < len(completion_ids)]
        dropped += len(ends) - len(keep)
        cut += was_cut
        out.append(
            TokenizedSteps(
                prompt_ids,
                completion_ids,
                [ends[k] for k in keep],
                [ex.labels[k] for k in keep],
                i,
                was_cut,
                len(ends) - len(keep),
            )
        )
    notes = [f"tokenized {len(out)} step-labelled replies; {cut} cut at data.max_length={max_length}"]
    if dropped:
        notes.append(f"{dropped} step labels past data.max_length={max_length} are not trained on (steps cut off)")
    return out, notes
