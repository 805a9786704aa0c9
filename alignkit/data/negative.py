"""Negative-only records for D2O (arXiv 2403.03419): a prompt and a response marked bad.

    {"prompt": "...", "rejected": "..."}

Strings or message lists as in pairs, images in the prompt too (`alignkit.data.vision`). A pairs
file works too (its `chosen` is not read). The recipe adds K responses per prompt sampled from the
initial model (`generation.num_samples`).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.examples import NegativeExample
from alignkit.data.formats import LoadResult, Record, blank_prompt, check_columns, load_records
from alignkit.data.tokenize import TokenizeStats, encode_text, fit, render_texts
from alignkit.data.vision import IMAGES_FIELD, VisionInputs, has_images, require_vision

NEGATIVE_FIELDS = ("prompt", "rejected")


def parse_negative_record(record: object, location: str, columns: dict | None = None) -> NegativeExample:
    """Validate one record: a non-empty prompt and a rejected reply ending in an assistant turn."""
    columns = check_columns(columns, NEGATIVE_FIELDS, "negative")
    rec = Record(record, location, columns, NEGATIVE_FIELDS)
    prompt, prompt_plain = rec.messages("prompt", rec.get("prompt"), "user")
    if rec.has(IMAGES_FIELD):  # the images column (alignkit.data.vision)
        prompt, prompt_plain = rec.with_images(prompt), False
    if blank_prompt(prompt):
        raise rec.error(f"the prompt is empty ({rec.label('prompt')})")
    rejected, rejected_plain = rec.messages("rejected", rec.get("rejected"), "assistant")
    rec.check_completion(rec.label("rejected"), rejected)
    return NegativeExample(tuple(prompt), tuple(rejected), location, prompt_plain and rejected_plain)


def load_negative_examples(
    path: str, *, columns=None, on_bad_record: str = "error", split: str | None = None
) -> LoadResult:
    """Read and validate every negative record of `path`."""
    columns = check_columns(columns, NEGATIVE_FIELDS, "negative")
    return load_records(path, parse_negative_record, columns, on_bad_record, split)


@dataclass
class TokenizedGroup:
    """One prompt with several completions: the negative first, then the K samples."""

    prompt_ids: list
    completions: list  # list[list[int]]
    index: int
    truncated: bool = False
    masks: list | None = None  # per completion, True where a token is scored (multi-turn: the model's tokens)
    vision: VisionInputs | None = None  # the prompt's pixel inputs (vision-language models)


def sampling_prompt(tokenizer, example: NegativeExample):
    """What generation continues: the prompt exactly as tokenization renders it; a prompt with
    images, its messages (the sampler renders them with the same template and lays out the images)."""
    if has_images(example.prompt):
        return list(example.prompt)
    return render_texts(tokenizer, example.prompt, example.rejected, example.plain_text)[0]


def tokenize_groups(examples: list, samples: list, tokenizer, max_length: int, max_prompt_length=None):
    """Tokenize each example's negative and its sampled completions (strings) as one group."""
    out, stats = [], TokenizeStats()
    for i, (ex, texts) in enumerate(zip(examples, samples, strict=True)):
        vision = require_vision(tokenizer, ex.prompt, ex.source)
        completions = [ex.rejected] + [({"role": "assistant", "content": t},) for t in texts]
        ids = []
        for completion in completions:
            p_text, c_text = render_texts(tokenizer, ex.prompt, completion, ex.plain_text)
            prompt, comp = encode_text(tokenizer, p_text, c_text)
            ids.append(comp)
        pixels = None
        if vision is not None:  # the processor lays out the prompt's images
            prompt, pixels = vision.encode_prompt(p_text, ex.prompt, ex.source)
        prompt, ids, cut = fit(prompt, ids, max_length, max_prompt_length, pixels, ex.source)
        stats.count(ex.source, cut)
        out.append(TokenizedGroup(prompt, ids, index=i, truncated=cut, vision=pixels))
    return out, stats
