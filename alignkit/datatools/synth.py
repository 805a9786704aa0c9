"""Instruction data synthesis from an aligned model: Magpie and Self-Align.

Magpie (Xu et al., "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with
Nothing", arXiv 2406.08464): an aligned chat model, given only its chat template up to where the
user's text starts (the "pre-query template"), writes a plausible user instruction, because that is
what followed this text in its alignment data; the same model then answers the instruction.

Self-Align (Sun et al., "Principle-Driven Self-Alignment of Language Models from Scratch with
Minimal Human Supervision", arXiv 2305.03047): a model answers prompts with a short list of
written principles and a few worked exemplars in its context; the replies, stored without the
principles, become SFT data ("principle engraving"), so the tuned model follows the principles
without being shown them.

Both talk to the model through `alignkit.generation.text_models.TextModel`, so a local model and an
OpenAI-compatible endpoint work alike. The results are raw: run `alignkit.datatools.filters`
(`filter_records`) over them to drop short, repetitive, refusing and near-duplicate records.
"""

from __future__ import annotations

from typing import Callable

from alignkit.errors import AlignkitError, DataError
from alignkit.generation.decode import SamplingParams
from alignkit.rewards.principles import check_lists

# A string no template rewrites (no spaces, no markup) and no real conversation contains: the
# template is rendered around it and cut where it appears.
_SENTINEL = "ALIGNKITSENTINELUSERTEXT7f3a"
_SENTINEL_REPLY = "ALIGNKITSENTINELREPLYTEXT7f3a"


class SynthRecords(list):
    """The records a synthesis function kept (a plain list of {"prompt", "completion"} dicts),
    with `counts`: how many were sampled and how many were left out, and why (never silently)."""

    def __init__(self, records=(), counts: dict | None = None):
        super().__init__(records)
        self.counts = dict(counts or {})


# --- the chat template, cut around the user's text ------------------------------------------------


def _render(tokenizer, messages: list, add_generation_prompt: bool = False) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not tokenizer.chat_template:
        raise AlignkitError(
            f"tokenizer {name!r} has no chat template: Magpie needs the template of an aligned "
            "(instruct/chat) model. Use an instruct model, or set tokenizer.chat_template."
        )
    # jinja2 comes with transformers' chat-template support; imported here so that this module
    # imports without it
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # e.g. a template that rejects a system message
        roles = "/".join(m["role"] for m in messages)
        raise AlignkitError(
            f"the chat template of {name!r} cannot render a {roles} conversation: {e}. "
            "If it rejects the system message, call without `system`."
        ) from None


def _user_turn(system: str | None, text: str) -> list:
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]


def pre_query_template(tokenizer, system: str | None = None) -> str:
    """The chat template rendered up to where the user's text starts (Magpie's pre-query
    template, arXiv 2406.08464): e.g. "<|im_start|>user\\n" for ChatML, with the system
    turn first when `system` is given (or the template's own default system prompt, if it has one).

    Found by rendering a conversation whose user message is a sentinel string and cutting at the
    sentinel, so it works for any template without knowing its format."""
    text = _render(tokenizer, _user_turn(system, _SENTINEL))
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise AlignkitError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '')!r} does not show the "
            "user's message verbatim, so the pre-query template cannot be found; use another model"
        )
    return text[:cut]


def end_of_user_turn(tokenizer) -> list[str]:
    """Stop strings that end the user's turn in the tokenizer's chat template: the text between
    the user's message and the assistant's role header ("<|im_end|>" for ChatML, "<|eot_id|>" for
    Llama 3, "[/INST]" for Mistral), then the assistant's role header itself when the template has
    one ("<|im_start|>assistant"), in case a model skips the end marker. Whitespace is stripped.

    Found from a user/assistant conversation of sentinels: the text between them, less the
    generation prompt (what `add_generation_prompt=True` appends), is the end of the user's turn."""
    user = _user_turn(None, _SENTINEL)
    both = _render(tokenizer, user + [{"role": "assistant", "content": _SENTINEL_REPLY}])
    start, end = both.find(_SENTINEL), both.find(_SENTINEL_REPLY)
    if start < 0 or end < 0:
        raise AlignkitError(
            "the chat template does not show the messages verbatim, so the end of the user's turn "
            "cannot be found; use another model"
        )
    between = both[start + len(_SENTINEL) : end]
    plain = _render(tokenizer, user)
    header = _render(tokenizer, user, add_generation_prompt=True)[len(plain) :].strip()
    turn_end = between[: between.index(header)] if header and header in between else between
    stops = [s for s in (turn_end.strip(), header) if s]
    if not stops:
        raise AlignkitError(
            "the chat template puts nothing between the user's and the assistant's text, so there is "
            "no stop string for the user's turn; use a model whose template marks turns"
        )
    return list(dict.fromkeys(stops))


def _cut(text: str, stops: list) -> str:
    """`text` up to the first stop string (a backend may keep the stop string in its text)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


# --- Magpie ------------------------------------------------------------------------------------------


def magpie(
    lm,
    tokenizer,
    n: int,
    params: SamplingParams,
    seed: int = 0,
    *,
    system: str | None = None,
    on_record: Callable | None = None,
    progress: bool = False,
) -> SynthRecords:
    """Synthesise `n` instruction/response records from nothing but an aligned model (Magpie,
    Xu et al., arXiv 2406.08464).

    1. Sample `n` continuations of the pre-query template (`pre_query_template`) that stop at the
       end of the user's turn (`end_of_user_turn`): each is an instruction the model "expects"
       a user to write. Sampled with `params` (its `stop` replaced by the turn's end, n=1) and `seed`.
    2. Answer each non-empty instruction as a one-turn chat, with `params` (n=1) and `seed + 1`.

    Returns `SynthRecords` of {"prompt": instruction, "completion": reply} (both stripped), with
    `counts` = {"sampled", "empty_instruction", "empty_response", "kept"}: an empty instruction or
    reply is left out and counted there. `on_record(record)` sees each kept record as soon as its
    reply is in (in completion order), so a caller can write records as they come.

    `tokenizer` must be the model's own (its chat template). `system`: a system prompt placed before
    the user's turn (Magpie uses it to steer the topic or language). Departures from the paper:
    one reply per instruction, and no filtering here (see `alignkit.datatools.filters`); the
    paper's multi-turn extension (Magpie-MT) is not implemented."""
    if n < 1:
        raise ValueError(f"magpie: n={n}; ask for at least one record")
    if n > 1 and params.temperature <= 0:
        raise ValueError(
            f"magpie: temperature={params.temperature} samples the same instruction {n} times; "
            "set a sampling temperature (the paper uses 1.0) in the sampling params"
        )
    template, stops = pre_query_template(tokenizer, system), end_of_user_turn(tokenizer)
    outs = lm.complete([template] * n, params.but(n=1, stop=tuple(stops)), seed=seed, progress=progress)
    instructions = [_cut(o[0], stops).strip() for o in outs]
    kept = [text for text in instructions if text]
    records, counts = _answer(
        lm, kept, lambda text: [{"role": "user", "content": text}], params, seed + 1, on_record, progress
    )
    return SynthRecords(records, {"sampled": n, "empty_instruction": n - len(kept), **counts})


def _answer(lm, prompts: list, messages_of: Callable, params: SamplingParams, seed: int, on_record, progress):
    """One reply per prompt: (records in prompt order, {"empty_response", "kept"})."""

    def on_result(i, replies):  # streams kept records to the caller as they come
        reply = replies[0].strip()
        if reply and on_record is not None:
            on_record({"prompt": prompts[i], "completion": reply})

    results = lm.chat(
        [messages_of(p) for p in prompts],
        params.but(n=1),
        seed=seed,
        on_result=None if on_record is None else on_result,
        progress=progress,
    )
    replies = [r[0].strip() for r in results]
    records = [{"prompt": p, "completion": r} for p, r in zip(prompts, replies) if r]
    return records, {"empty_response": len(prompts) - len(records), "kept": len(records)}


# --- Self-Align ----------------------------------------------------------------------------------------


SELF_ALIGN_SYSTEM = (
    "You are a helpful AI assistant. Follow these principles in every reply:\n{principles}\n"
    "Do not mention the principles; just follow them."
)


def self_align_messages(principles: list, exemplars: list, prompt: str) -> list:
    """The conversation Self-Align answers (arXiv 2305.03047, the "principle-driven
    self-alignment" stage): a system message listing the principles (numbered, `SELF_ALIGN_SYSTEM`),
    each exemplar as a prior user/assistant exchange (the paper's in-context demonstrations), then
    `prompt` as the user's turn. Departure: the paper's exemplars also show "internal thoughts"
    naming the principles applied; here an exemplar is only a prompt and its reply."""
    check_lists(principles, exemplars, "self_align_messages")
    listed = "\n".join(f"{i}. {p.strip()}" for i, p in enumerate(principles, 1))
    messages = [{"role": "system", "content": SELF_ALIGN_SYSTEM.format(principles=listed)}]
    for ex in exemplars:
        messages += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["completion"]}]
    return messages + [{"role": "user", "content": prompt}]


def self_align(
    lm,
    prompts: list,
    principles: list,
    exemplars: list,
    params: SamplingParams,
    seed: int = 0,
    on_record: Callable | None = None,
    progress: bool = False,
) -> SynthRecords:
    """Answer each prompt with the principles and exemplars in context (`self_align_messages`) and
    return {"prompt": prompt, "completion": reply} records WITHOUT the principles or exemplars
    (Self-Align, Sun et al., arXiv 2305.03047). That omission is the method: fine-tuning on these
    records (the "principle engraving" stage) teaches the model to behave as the principles say
    without being shown them, so they cost no context at inference.

    One reply per prompt (`params` with n=1, `seed`). Returns `SynthRecords` with `counts` =
    {"prompts", "empty_response", "kept"}: an empty reply is left out and counted. `on_record(record)`
    sees each kept record as its reply comes in. Departures from the paper: prompts come from the
    caller (the paper also synthesises them, with topic-guided red-teaming), and no "verbose
    cloning" stage follows."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"self_align: prompts[{i}] must be a non-empty string, got {p!r}")
    check_lists(principles, exemplars, "self_align")
    prompts = list(prompts)
    records, counts = _answer(
        lm, prompts, lambda p: self_align_messages(principles, exemplars, p), params, seed, on_record, progress
    )
    return SynthRecords(records, {"prompts": len(prompts), **counts})
