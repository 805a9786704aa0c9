"""Sentence-labelled pairs for Mask-DPO (arXiv 2503.02846).

    {"prompt": "...",
     "chosen_sentences":   [{"text": "Paris is the capital of France.", "correct": true},
                            {"text": " It has 40 million people.", "correct": false}],
     "rejected_sentences": [{"text": "Lyon is the capital of France.", "correct": false}]}

Each completion is its sentences concatenated as given (include the spaces). The scored tokens are
those of chosen's correct sentences and of rejected's incorrect sentences; token masks come from the
tokenizer's character offsets, so any fast tokenizer works.
"""

from __future__ import annotations

from alignkit.data.examples import MaskedPreferenceExample
from alignkit.data.formats import LoadResult, Record, blank_prompt, check_columns, load_records
from alignkit.data.tokenize import TokenizedPair, TokenizeStats, fit, render_texts
from alignkit.data.vision import IMAGES_FIELD, require_vision
from alignkit.errors import DataError

MASKED_FIELDS = ("prompt", "chosen_sentences", "rejected_sentences")


def _sentences(rec: Record, name: str, scored_label: bool) -> tuple[str, tuple]:
    value = rec.get(name)
    if not isinstance(value, list) or not value:
        raise rec.error(f"{rec.label(name)} must be a non-empty list of {{text, correct}} objects, found {value!r}")
    text, spans = "", []
    for i, s in enumerate(value):
        if not isinstance(s, dict) or not isinstance(s.get("text"), str) or not isinstance(s.get("correct"), bool):
            raise rec.error(
                f"sentence {i} of {rec.label(name)} must be {{text: string, correct: true|false}}, found {s!r}"
            )
        if s["correct"] == scored_label and s["text"].strip():
            spans.append((len(text), len(text) + len(s["text"])))
        text += s["text"]
    if not text.strip():
        raise rec.error(f"{rec.label(name)} has no text (the completion is empty)")
    return text, tuple(spans)


def parse_masked_record(record: object, location: str, columns: dict | None = None) -> MaskedPreferenceExample:
    columns = check_columns(columns, MASKED_FIELDS, "sentence-labelled")
    rec = Record(record, location, columns, MASKED_FIELDS)
    prompt, plain = rec.messages("prompt", rec.get("prompt"), "user")
    if rec.has(IMAGES_FIELD):  # the images column (alignkit.data.vision)
        prompt, plain = rec.with_images(prompt), False
    if blank_prompt(prompt):
        raise rec.error(f"the prompt is empty ({rec.label('prompt')})")
    chosen_text, chosen_spans = _sentences(rec, "chosen_sentences", scored_label=True)
    rejected_text, rejected_spans = _sentences(rec, "rejected_sentences", scored_label=False)
    if not chosen_spans and not rejected_spans:
        raise rec.error(
            "no sentence is scored: chosen has no correct sentence and rejected no incorrect one, "
            "so Mask-DPO has nothing to learn from this pair"
        )
    if chosen_text == rejected_text:
        raise rec.error("chosen and rejected are identical, so the pair says nothing")
    return MaskedPreferenceExample(
        tuple(prompt),
        ({"role": "assistant", "content": chosen_text},),
        ({"role": "assistant", "content": rejected_text},),
        location,
        plain,
        chosen_spans,
        rejected_spans,
    )


def load_masked_examples(path: str, *, columns=None, on_bad_record: str = "error", split=None) -> LoadResult:
    columns = check_columns(columns, MASKED_FIELDS, "sentence-labelled")
    return load_records(path, parse_masked_record, columns, on_bad_record, split)


def _encode_masked(tokenizer, completion_text: str, content: str, spans: tuple) -> tuple[list, list]:
    if not tokenizer.is_fast:
        raise DataError("sentence masks need a fast tokenizer (character offsets); this tokenizer is not fast")
    base = completion_text.find(content)
    assert base >= 0, "the rendered completion must contain the message content"
    enc = tokenizer(completion_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, mask = list(enc["input_ids"]), []
    for start, end in enc["offset_mapping"]:
        mask.append(any(start < base + e and end > base + s for s, e in spans) and end > start)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        mask.append(False)
    return ids, mask


def tokenize_masked_pairs(examples: list, tokenizer, max_length: int, max_prompt_length=None):
    """Like `tokenize_pairs`, plus per-token masks of the scored sentences."""
    out, stats = [], TokenizeStats()
    templated = tokenizer.chat_template is not None
    for i, ex in enumerate(examples):
        vision = require_vision(tokenizer, ex.prompt, ex.source)
        p_text, c_text = render_texts(tokenizer, ex.prompt, ex.chosen, ex.plain_text)
        _, r_text = render_texts(tokenizer, ex.prompt, ex.rejected, ex.plain_text)
        prompt, pixels = list(tokenizer(p_text, add_special_tokens=not templated)["input_ids"]), None
        if vision is not None:
            prompt, pixels = vision.encode_prompt(p_text, ex.prompt, ex.source)
        chosen, c_mask = _encode_masked(tokenizer, c_text, ex.chosen[-1]["content"], ex.chosen_spans)
        rejected, r_mask = _encode_masked(tokenizer, r_text, ex.rejected[-1]["content"], ex.rejected_spans)
        uncut = (len(chosen), len(rejected))
        prompt, (chosen, rejected), cut = fit(
            prompt, [chosen, rejected], max_length, max_prompt_length, pixels, ex.source
        )
        stats.count(ex.source, cut)
        out.append(
            TokenizedPair(
                prompt,
                chosen,
                rejected,
                index=i,
                truncated=cut,
                chosen_mask=c_mask[: len(chosen)],
                rejected_mask=r_mask[: len(rejected)],
                vision=pixels,
                uncut=uncut,
            )
        )
    return out, stats
