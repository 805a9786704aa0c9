"""Examples -> token ids: chat templates, completion masks, EOS and truncation.

A prompt and its completion are tokenized separately, the prompt rendered with the chat
template's generation prompt, so the completion tokens are exactly what the model would have to
generate after that prompt (the same split TRL and most DPO implementations use). Only completion
tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.data.examples import PreferenceExample, SFTExample
from alignkit.data.reasoning import DEFAULT_TAGS, reasoning_span
from alignkit.data.vision import VisionInputs, require_vision
from alignkit.errors import DataError


@dataclass
class TokenizedPair:
    prompt_ids: list  # list[int]
    chosen_ids: list
    rejected_ids: list
    index: int  # position in the loaded data set (keys the reference cache)
    truncated: bool = False
    chosen_mask: list | None = None  # per completion token: scored? (None: all; Mask-DPO sets it)
    rejected_mask: list | None = None
    vision: VisionInputs | None = None  # the prompt's pixel inputs (vision-language models)
    uncut: tuple | None = None  # (chosen, rejected) reply lengths before any cut; None: never cut

    @property
    def reply_lengths(self) -> tuple:
        """The replies' lengths in tokens before `max_length` cut them: what a reward model reads
        (it scores whole replies) and what ODIN decorrelates its quality head from."""
        return self.uncut if self.uncut is not None else (len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizedSFT:
    prompt_ids: list
    completion_ids: list
    index: int
    truncated: bool = False
    vision: VisionInputs | None = None


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    truncated_sources: list = field(default_factory=list)  # first few, for the report

    def count(self, source: str, truncated: bool) -> None:
        self.examples += 1
        if truncated:
            self.truncated += 1
            self.truncated_sources.append(source)

    def summary(self, max_length: int) -> str:
        if not self.truncated:
            return f"tokenized {self.examples} examples; none longer than max_length={max_length}"
        where = ", ".join(self.truncated_sources[:3])
        return (
            f"tokenized {self.examples} examples; truncated {self.truncated} "
            f"({100 * self.truncated / max(self.examples, 1):.1f}%) to max_length={max_length} "
            f"(kept the prompt's end and the completion's start; e.g. {where}). "
            "Raise `data.max_length` to keep more."
        )


def _fallback_render(messages) -> str:
    # Models without a chat template (base models) get a plain, documented layout.
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages)


def render_prompt(tokenizer, prompt, plain_text: bool) -> str:
    """The text a model continues for `prompt` (messages): the chat template with its generation
    prompt, or the plain layout of a model without one. Only the prompt is rendered, so a template
    whose generation prompt opens a reasoning block (DeepSeek-R1's) works for sampling."""
    require_vision(tokenizer, prompt, "a prompt")  # a text model's template cannot render images
    if tokenizer.chat_template is None:
        if plain_text:
            return prompt[-1]["content"] if prompt else ""
        return _fallback_render(prompt) + "assistant: "
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def render_texts(tokenizer, prompt, completion, plain_text: bool) -> tuple[str, str]:
    """Return (prompt text, completion text) for one prompt and one completion.

    With a chat template, the completion text is the full rendered conversation minus the rendered
    prompt (with generation prompt), cut just after the end-of-turn token: templates often add a
    newline after it that generation never produces."""
    prompt_text = render_prompt(tokenizer, prompt, plain_text)
    if tokenizer.chat_template is None:
        if plain_text:
            return prompt_text, completion[-1]["content"]
        return prompt_text, "".join(m["content"] + "\n\n" for m in completion).rstrip("\n")
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(
            "the chat template does not render the prompt as a prefix of prompt + completion, so the "
            "completion cannot be isolated. This happens with templates that rewrite earlier turns "
            f"(for example by stripping reasoning). Prompt rendered as: {prompt_text[-200:]!r}"
        )
    completion_text = full[len(prompt_text) :]
    eos = tokenizer.eos_token
    if eos and eos in completion_text:
        completion_text = completion_text[: completion_text.rindex(eos) + len(eos)]
    return prompt_text, completion_text


def as_messages(prompt) -> tuple[tuple, bool]:
    """A prompt (string or message list) -> (messages, was a plain string)."""
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},), True
    return tuple(prompt), False


def encode_completion(tokenizer, prompt, completion: str) -> tuple[list, list]:
    """Token ids of (prompt, completion) laid out as training lays them out: the chat template when
    the tokenizer has one, else plain text (a reward model or a log-prob pass sees what training saw)."""
    messages, plain = as_messages(prompt)
    p_text, c_text = render_texts(tokenizer, messages, ({"role": "assistant", "content": completion},), plain)
    return encode_text(tokenizer, p_text, c_text)


def encode_reply(tokenizer, prompt, completion: str, source: str) -> tuple[list, list, VisionInputs | None]:
    """`encode_completion` for prompts that may hold images: (prompt ids, completion ids, the
    prompt's pixel inputs or None), the images laid out by the model's processor."""
    messages, plain = as_messages(prompt)
    vision = require_vision(tokenizer, messages, source)
    p_text, c_text = render_texts(tokenizer, messages, ({"role": "assistant", "content": completion},), plain)
    p_ids, c_ids = encode_text(tokenizer, p_text, c_text)
    if vision is None:
        return p_ids, c_ids, None
    p_ids, pixels = vision.encode_prompt(p_text, messages, source)
    return p_ids, c_ids, pixels


def encode_text(tokenizer, prompt_text: str, completion_text: str) -> tuple[list, list]:
    # With a chat template the special tokens (BOS included) are in the rendered text already.
    templated = tokenizer.chat_template is not None
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"] if prompt_text else []
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and (not completion_ids or completion_ids[-1] != eos_id):
        completion_ids = completion_ids + [eos_id]
    return list(prompt_ids), list(completion_ids)


def fit(prompt: list, completions: list, max_length: int, max_prompt_length, vision, source: str):
    """`truncate`, except that a prompt with images is never cut (a cut could split an image's
    tokens from its pixels): its completions are, and a prompt that leaves no room is an error."""
    if vision is None:
        return truncate(prompt, completions, max_length, max_prompt_length)
    room = max_length - len(prompt)
    if room < 1:
        raise DataError(
            f"{source}: the prompt is {len(prompt)} tokens with its {vision.num_images} image(s) (as the processor "
            f"lays them out), which leaves no room for a reply within data.max_length={max_length}; raise "
            "data.max_length or use smaller images"
        )
    cut = any(len(c) > room for c in completions)
    return prompt, [c[:room] for c in completions], cut


def truncate(prompt: list, completions: list, max_length: int, max_prompt_length: int | None):
    """Fit prompt + each completion into `max_length` tokens.

    The prompt keeps its end (the latest turns matter most) and completions keep their start.
    The prompt is cut first, down to `max_prompt_length` (default max_length // 2) when needed."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False
    max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    keep = min(len(prompt), max(max_prompt, max_length - longest))
    prompt = prompt[len(prompt) - keep :]
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions], True


def tokenize_pairs(examples: list, tokenizer, max_length: int, max_prompt_length: int | None = None):
    """Tokenize PreferenceExamples; returns (list[TokenizedPair], TokenizeStats)."""
    out, stats = [], TokenizeStats()
    for i, ex in enumerate(examples):
        assert isinstance(ex, PreferenceExample)
        vision = require_vision(tokenizer, ex.prompt, ex.source)
        p_text, c_text = render_texts(tokenizer, ex.prompt, ex.chosen, ex.plain_text)
        p_text2, r_text = render_texts(tokenizer, ex.prompt, ex.rejected, ex.plain_text)
        assert p_text == p_text2
        prompt, chosen = encode_text(tokenizer, p_text, c_text)
        _, rejected = encode_text(tokenizer, p_text, r_text)
        pixels = None
        if vision is not None:  # the processor expands each image placeholder to the image's tokens
            prompt, pixels = vision.encode_prompt(p_text, ex.prompt, ex.source)
        uncut = (len(chosen), len(rejected))
        prompt, (chosen, rejected), cut = fit(
            prompt, [chosen, rejected], max_length, max_prompt_length, pixels, ex.source
        )
        stats.count(ex.source, cut)
        out.append(TokenizedPair(prompt, chosen, rejected, index=i, truncated=cut, vision=pixels, uncut=uncut))
    return out, stats


def tokenize_sft(examples: list, tokenizer, max_length: int, max_prompt_length: int | None = None):
    """Tokenize SFTExamples; returns (list[TokenizedSFT], TokenizeStats)."""
    out, stats = [], TokenizeStats()
    for i, ex in enumerate(examples):
        assert isinstance(ex, SFTExample)
        vision = require_vision(tokenizer, ex.prompt, ex.source)
        p_text, c_text = render_texts(tokenizer, ex.prompt, ex.completion, ex.plain_text)
        prompt, completion = encode_text(tokenizer, p_text, c_text)
        pixels = None
        if vision is not None:
            prompt, pixels = vision.encode_prompt(p_text, ex.prompt, ex.source)
        prompt, (completion,), cut = fit(prompt, [completion], max_length, max_prompt_length, pixels, ex.source)
        stats.count(ex.source, cut)
        out.append(TokenizedSFT(prompt, completion, index=i, truncated=cut, vision=pixels))
    return out, stats


def explain(
    tokenizer,
    prompt_ids: list,
    completion_ids: list,
    label: str = "completion",
    max_rows: int = 48,
    scored: bool | list = True,
    why: str = "",
    tags=DEFAULT_TAGS,
) -> str:
    """Human-readable view of one tokenized example and its loss mask.

    `scored`: True when the loss scores every completion token, False when it scores none (a
    completion that is only read, or not read at all: say which in `why`), or one bool per
    completion token (Mask-DPO's sentence masks); `why` says what the scored tokens are."""
    mask = [scored] * len(completion_ids) if isinstance(scored, bool) else list(scored)
    assert len(mask) == len(completion_ids), "one mask entry per completion token"
    thinking = reasoning_span(tokenizer, completion_ids, tuple(tags))
    lines = [
        f"prompt: {len(prompt_ids)} tokens (not scored)",
        "  " + repr(tokenizer.decode(prompt_ids)),
        f"{label}: {len(completion_ids)} tokens ({_scored_summary(mask, scored, why)})",
        "  " + repr(tokenizer.decode(completion_ids)),
    ]
    if any(thinking):  # data.thinking decided whether these are here: say so next to them
        lines.append(f"  {sum(thinking)} of them in a reasoning block (marked `reasoning`; data.thinking decides)")
    lines += ["", "  pos  token id  scored  token"]
    rows = [(i, t, False, False) for i, t in enumerate(prompt_ids)]
    rows += [(len(prompt_ids) + j, t, m, r) for j, (t, m, r) in enumerate(zip(completion_ids, mask, thinking))]
    # Show the prompt's last tokens and the whole completion: the boundary is what goes wrong.
    shown = rows[max(0, len(prompt_ids) - 6) :][:max_rows]
    for pos, tid, scored, reasoning in shown:
        mark = "  reasoning" if reasoning else ""
        lines.append(f"  {pos:>4}  {tid:>8}  {'yes' if scored else 'no ':>6}  {tokenizer.decode([tid])!r}{mark}")
    if len(shown) < len(rows) - max(0, len(prompt_ids) - 6):
        lines.append(f"  ... {len(rows) - len(shown) - max(0, len(prompt_ids) - 6)} more tokens")
    return "\n".join(lines)


def _scored_summary(mask: list, scored: bool | list, why: str) -> str:
    """'scored', 'not scored: <why>' or '5 scored: <why>' for the header line of a completion."""
    if scored is True:
        return "scored" + (f": {why}" if why else "")
    if scored is False:
        return "not scored" + (f": {why}" if why else "")
    return f"{sum(map(bool, mask))} scored" + (f": {why}" if why else "")
