"""Batched sampling token by token with a KV cache, over any `transformers` causal LM.

Our own loop rather than `model.generate`, for three reasons:
- we need the log-prob of every sampled token, either raw (the model's distribution at
  temperature 1, before top-k / top-p: inference-time search and URIAL's KL estimate read these) or
  processed (the distribution the token was drawn from: online RL's behaviour log-probs, which the
  trainer recomputes with the same `alignkit.logprobs.sampling_scores`); `generate` only exposes
  the processed scores, or every step's full logits;
- a prompt's n samples share its prefill: the prompt runs once and its KV cache is repeated n times,
  so n samples do not cost n times the prompt processing;
- guided decoding (inference-time alignment) needs a hook at every token.

Prompts are left-padded, so every row's next token sits in the last column; positions count only
real tokens, so a padded prompt sees the positions it would see alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from alignkit.data.vision import prompt_pixels, vision_of
from alignkit.errors import ConfigError
from alignkit.logprobs import is_model_distribution, sampling_scores

LOGPROBS = ("raw", "processed")


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    n: int = 1  # samples per prompt
    stop: tuple = ()  # stop strings: a sample ends once its text contains one (kept in the text)
    # which log-probs `Sample.logprobs` holds: "raw", the model's own distribution (temperature 1, no
    # top-k / top-p); or "processed", the distribution each token was drawn from (temperature, top-k,
    # top-p, renormalised: `alignkit.logprobs.sampling_scores`), which online training's trainer
    # recomputes (`segment_logps(..., sampling=params)`). Greedy tokens get the raw ones either way.
    logprobs: Literal["raw", "processed"] = "raw"
    # reasoning blocks (`thinking_params`): the token ids of the opening and closing tags, and the
    # thinking budget, after which the closing tag is inserted as context (None: no budget)
    thinking_open: tuple = ()
    thinking_close: tuple = ()
    max_thinking_tokens: int | None = None
    # token ids out of the distribution itself (online training of a vision-language model: its
    # image-layout tokens, `banned_tokens`): processed log-probs, the sampler's and the trainer's,
    # are then of the distribution without them, as vLLM's are when it bans them by logit bias
    banned: tuple = ()

    def __post_init__(self):
        if self.logprobs not in LOGPROBS:
            raise ValueError(f"SamplingParams.logprobs must be one of {', '.join(LOGPROBS)}; got {self.logprobs!r}.")

    def but(self, **changes) -> "SamplingParams":
        """A copy with some settings changed (e.g. `params.but(n=1)`): the one way to derive settings,
        so no field is forgotten on the way."""
        return dataclasses.replace(self, **changes)


def sampling_params(
    g, *, n: int | None = None, greedy: bool = False, logprobs: Literal["raw", "processed"] = "raw"
) -> SamplingParams:
    """SamplingParams from a run's `generation` section (a `GenerationConfig`): the one place that
    reads it. `n` overrides `num_samples`; `greedy` sets temperature 0 (held-out evaluation);
    `logprobs`: see `SamplingParams.logprobs` (online training asks for "processed")."""
    return SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=0.0 if greedy else g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        n=g.num_samples if n is None else n,
        stop=tuple(g.stop),
        logprobs=logprobs,
    )


def thinking_params(params: SamplingParams, tokenizer, tags, budget: int | None) -> SamplingParams:
    """`params` that track reasoning blocks marked by `tags` (open, close) in the tokenizer's
    tokens, and close one still open after `budget` tokens. Tags the tokenizer cannot encode
    leave tracking off (there is then nothing to budget: an error if a budget was asked for)."""
    ids = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in tags]
    if not all(ids) or any(tokenizer.decode(list(i)) != t for i, t in zip(ids, tags)):
        if budget is not None:
            raise ConfigError(
                f"generation.max_thinking_tokens: the tokenizer does not write the reasoning tags {list(tags)} "
                "as tokens of their own text; set data.thinking_tags to the tags this model writes."
            )
        return params
    return params.but(thinking_open=ids[0], thinking_close=ids[1], max_thinking_tokens=budget)


def eos_ids(tokenizer) -> set:
    """The end-of-turn token ids: a model turn (or a completion) ends on one."""
    e = tokenizer.eos_token_id
    return set([e] if isinstance(e, int) else e)


def _ends_with(seq: list, tail: tuple) -> bool:
    return bool(tail) and len(seq) >= len(tail) and tuple(seq[-len(tail) :]) == tail


def _last_index(seq: list, tail: tuple) -> int:
    for i in range(len(seq) - len(tail), -1, -1):
        if tuple(seq[i : i + len(tail)]) == tail:
            return i
    return -1


class Thinking:
    """Reasoning blocks as rows are sampled: which rows are inside one, how many tokens each block
    has run, and the closing tag's tokens a row must take next once its block has run past the
    budget (inserted as context: the row's sampled token at that step is discarded). A prompt that
    ends inside an open block (DeepSeek-R1's generation prompt ends with `<think>`) starts inside."""

    def __init__(self, params: SamplingParams, prompts: list, decode=None):
        self.open, self.close, self.budget = params.thinking_open, params.thinking_close, params.max_thinking_tokens
        self.on = bool(self.open and self.close)
        # `decode(ids) -> text`: tags are then matched in the text, so a model that writes a tag
        # in other tokens than the tag's own encoding (" </" "think" ">") is still read right
        self.decode = decode
        self.open_text = self.close_text = None
        if decode is not None and self.on:
            self.open_text, self.close_text = decode(list(self.open)), decode(list(self.close))
        rows = len(prompts)
        self.inside = [False] * rows
        self.tokens: list[list] = [[] for _ in range(rows)]  # each row's tokens so far
        self.reasoning = [0] * rows  # tokens inside blocks, tags included, over the whole sample
        self.answer = [0] * rows  # the row's own tokens outside blocks
        self.block = [0] * rows  # tokens of the block now open
        self.pending: list[list] = [[] for _ in range(rows)]  # closing-tag tokens still to insert
        self.cut = [False] * rows  # the budget closed one of the row's blocks
        for r, p in enumerate(prompts):
            self.context(r, p)

    def context(self, r: int, tokens: list) -> None:
        """Tokens row `r` reads but did not sample (its prompt, an environment's reply): a block they
        open counts from here; one they close is closed."""
        if not self.on:
            return
        opened, closed = _last_index(tokens, self.open), _last_index(tokens, self.close)
        if opened > closed:
            self.inside[r], self.block[r], self.pending[r] = True, 0, []
        elif closed > opened:
            self.inside[r], self.pending[r] = False, []
        self.tokens[r] = []  # tags are matched in the row's own tokens from here

    def forced(self, r: int) -> int | None:
        """The token row `r` must take next (an inserted closing tag), or None."""
        return self.pending[r].pop(0) if self.pending[r] else None

    def _ends(self, seq: list, tag: tuple, text: str | None) -> bool:
        """Whether the tag was completed by the row's last token (which may carry more text). The
        tag's own ids first; the decoded text only when the last token holds the tag's last
        character (one short decode per sampled token otherwise: this runs on every token)."""
        if _ends_with(seq, tag):
            return True
        if self.decode is None or text is None or text[-1] not in self.decode(seq[-1:]):
            return False
        window = seq[-(len(tag) + 4) :]
        return text in self.decode(window) and text not in self.decode(window[:-1])

    def add(self, r: int, token: int) -> None:
        if not self.on:
            return
        seq = self.tokens[r]
        seq.append(token)
        if self.inside[r]:
            self.reasoning[r] += 1
            self.block[r] += 1
            if self._ends(seq, self.close, self.close_text):
                self.inside[r], self.pending[r] = False, []
            elif self.budget is not None and not self.pending[r] and self.block[r] >= self.budget:
                self.pending[r], self.cut[r] = list(self.close), True
        elif self._ends(seq, self.open, self.open_text):  # its earlier tokens counted as answer
            self.inside[r], self.block[r] = True, len(self.open)
            self.reasoning[r] += len(self.open)
            self.answer[r] -= len(self.open) - 1
        else:
            self.answer[r] += 1


@dataclass
class Sample:
    token_ids: list  # the completion's tokens, the end-of-sequence token included when it stopped on one
    logprobs: list  # log-prob of each token: raw or processed, as `SamplingParams.logprobs` asked
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    text: str = ""  # decoded, special tokens removed (filled when a tokenizer is given)
    mask: list | None = None  # multi-turn episodes: True where the model sampled the token (the scored ones)
    episode: object = None  # multi-turn episodes: the `alignkit.generation.multiturn.Episode`
    versions: list | None = None  # the policy version that sampled each token (a sampler that swaps weights in flight)
    reasoning_tokens: int | None = None  # tokens inside reasoning blocks, tags included (None: not tracked)
    answer_tokens: int | None = None  # the sample's own tokens outside reasoning blocks (None: not tracked)
    step_rewards: list | None = None  # a process reward model's score of each step (`per_step` rewards)
    thinking_cut: bool = False  # the thinking budget closed its reasoning block


@dataclass
class _Rows:
    """Per-row decoding state for one batch of prompts x n samples."""

    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    done: list = field(default_factory=list)
    reason: list = field(default_factory=list)


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a run's seed, a step, an example index): the same parts give
    the same seed in every process and every batch layout."""
    import hashlib

    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pick_tokens(logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
    """[R, V] float32 logits -> [R] next tokens: argmax at temperature 0, else a sample from the
    temperature-scaled distribution restricted to the top-k tokens and the top-p nucleus (the
    smallest set whose probability reaches top_p, as in Holtzman et al. 2019):
    `alignkit.logprobs.sampling_scores`, which the trainer scores with too.

    `generator`: one torch.Generator for the batch, or a list with one per row. With one per row,
    each row draws its own uniform and takes the token where the distribution's CDF passes it, so a
    row's tokens do not depend on which other rows share its batch (or its process)."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    return draw_tokens(sampling_scores(logits, params), generator)


def draw_tokens(scores: torch.Tensor, generator) -> torch.Tensor:
    """[R, V] scores (`sampling_scores`) -> [R] tokens drawn from softmax(scores); `generator` as in
    `pick_tokens`."""
    probs = torch.softmax(scores, dim=-1)
    if isinstance(generator, list):
        u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generator])  # [R]
        cdf = probs.double().cumsum(-1)
        picked = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None])[:, 0]
        return picked.clamp(max=probs.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator, steer=None) -> tuple[torch.Tensor, list]:
    """The next tokens [R] for the model's `logits` [R, V] and the log-prob of each under the model,
    as `params.logprobs` asks: raw (log-softmax at temperature 1) or processed (x_t - logsumexp(x)
    for x = `sampling_scores(logits)`: the arithmetic of the trainer's `alignkit.logprobs`).
    `steer(logits) -> logits`: a guiding hook's rewrite, which the tokens are then drawn from (with
    processed log-probs, a token it picks outside the model's top-k / top-p gets -inf)."""
    if params.logprobs == "raw":
        logp = torch.log_softmax(logits, dim=-1)
        tok = pick_tokens(logits if steer is None else steer(logits), params, generator)
        return tok, logp.gather(-1, tok[:, None])[:, 0].tolist()
    greedy = params.temperature <= 0  # the model's distribution: what vLLM returns for a greedy token
    own = logits if is_model_distribution(params) else sampling_scores(logits, params)
    if steer is not None:
        own = own.clone()  # before the hook, which may edit the logits in place
        tok = pick_tokens(steer(logits), params, generator)
    else:
        tok = own.argmax(-1) if greedy else draw_tokens(own, generator)
    return tok, (own.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(own, dim=-1)).tolist()


def left_pad(prompts: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


# How a banned token travels to vLLM and to sampling servers: vLLM clamps logit biases to
# [-100, 100], and the lowest is one no draw survives.
BAN_BIAS = -100.0


def banned_tokens(tokenizer) -> list:
    """Token ids a sampler never draws: a vision-language model's image-layout tokens
    (`VisionProcessor.layout_ids`). A departure from the model's distribution by the probability of
    those tokens (about 0 for a trained model); raw log-probs stay the model's own, and processed
    ones are of the distribution without them where `SamplingParams.banned` names them (online
    training does)."""
    vision = vision_of(tokenizer) if tokenizer is not None else None
    return list(vision.layout_ids) if vision is not None else []


def _banning(banned: list, steer=None):
    def ban(logits):
        out = (logits if steer is None else steer(logits)).clone()
        out[:, banned] = float("-inf")
        return out

    return ban


def stopped_by_string(tokenizer, tokens: list, stop: tuple) -> bool:
    tail = tokenizer.decode(tokens[-32:], skip_special_tokens=True)
    return any(s in tail for s in stop)


@torch.no_grad()
def sample_batch(
    model,
    prompts: list,
    params: SamplingParams,
    *,
    eos_ids,
    pad_id: int,
    generator=None,
    tokenizer=None,
    step_hook=None,
    version_hook=None,
) -> list[list[Sample]]:
    """Sample `params.n` completions for each prompt (token-id lists) in one batch.

    `step_hook(logits [R, V], rows_state) -> logits`, when given, may rewrite each step's logits
    before sampling (guided decoding); the recorded log-probs stay the model's own (`next_tokens`).
    `version_hook() -> int`, when given, runs before each forward pass (it may load new weights
    into `model`: partial rollouts, `sampler_server`) and returns the policy version that the pass
    computes with; each sample then records the version of each of its tokens (`Sample.versions`)."""
    device = next(model.parameters()).device
    eos = set([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    version = version_hook() if version_hook is not None else None
    pixels = prompt_pixels(prompts)  # a vision-language model reads its prompts' images once, here
    banned = banned_tokens(tokenizer)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **pixels)
    cache, logits = out.past_key_values, out.logits[:, -1].float()
    n = params.n
    if n > 1:  # the prompt ran once; its cache serves all n samples
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        positions = positions.repeat_interleave(n, 0)
    rows = logits.shape[0]
    state = _Rows([[] for _ in range(rows)], [[] for _ in range(rows)], [False] * rows, ["length"] * rows)
    versions: list[list] = [[] for _ in range(rows)]
    decode = None if tokenizer is None else (lambda ids: tokenizer.decode(ids))
    think = Thinking(params, [p for p in prompts for _ in range(n)], decode)
    masks: list[list] = [[] for _ in range(rows)]  # False where the thinking budget inserted the token
    next_pos = positions[:, -1] + 1
    for step in range(params.max_new_tokens):
        steer = None if step_hook is None else (lambda x: step_hook(x, state))
        if banned:
            steer = _banning(banned, steer)
        tok, tok_logp = next_tokens(logits, params, generator, steer)
        picked = tok.tolist()
        for r, (t, lp) in enumerate(zip(picked, tok_logp)):
            if state.done[r]:
                continue
            forced = think.forced(r)
            if forced is not None:  # context, not the model's choice: no log-prob, not scored
                t = picked[r] = forced
            else:
                state.logprobs[r].append(lp)
            masks[r].append(forced is None)
            state.tokens[r].append(t)
            versions[r].append(version)
            think.add(r, t)
            if t in eos or (
                params.stop and tokenizer is not None and stopped_by_string(tokenizer, state.tokens[r], params.stop)
            ):
                state.done[r], state.reason[r] = True, "stop"
        if all(state.done) or step == params.max_new_tokens - 1:  # the last token needs no forward
            break
        tok = torch.tensor(picked, dtype=torch.long, device=device)
        tok = torch.where(torch.tensor(state.done, device=device), torch.full_like(tok, pad_id), tok)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if version_hook is not None:
            version = version_hook()
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        next_pos = next_pos + 1
    samples = [
        Sample(
            state.tokens[r],
            state.logprobs[r],
            state.reason[r],
            mask=masks[r] if think.cut[r] else None,
            versions=versions[r] if version_hook else None,
            reasoning_tokens=think.reasoning[r] if think.on else None,
            answer_tokens=think.answer[r] if think.on else None,
            thinking_cut=think.cut[r],
        )
        for r in range(rows)
    ]
    if tokenizer is not None:
        for s in samples:
            s.text = tokenizer.decode(s.token_ids, skip_special_tokens=True).strip()
    return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]


def sample(
    model,
    prompts: list,
    params: SamplingParams,
    *,
    eos_ids,
    pad_id: int,
    batch_size: int = 16,
    seed: int = 0,
    tokenizer=None,
    progress: bool = False,
    desc: str = "sampling",
    prompt_seeds: list | None = None,
    version_hook=None,
) -> list[list[Sample]]:
    """`sample_batch` over all prompts, `batch_size` prompts at a time, longest first (less
    padding); results come back in the prompts' order. Seeded: the same call gives the same samples.

    With `prompt_seeds` (one int per prompt), sample k of prompt i draws from its own generator
    seeded by (prompt_seeds[i], k): its tokens then do not depend on the batch it shares or on which
    process samples it, so a run split over N processes samples what one process would."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
        raise ValueError(f"sample: {len(prompt_seeds)} prompt_seeds for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list = [None] * len(prompts)
    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                gen = (
                    generator
                    if prompt_seeds is None
                    else [
                        torch.Generator(device=device).manual_seed(row_seed(prompt_seeds[i], k))
                        for i in idx
                        for k in range(params.n)
                    ]
                )
                out = sample_batch(
                    model,
                    [prompts[i] for i in idx],
                    params,
                    eos_ids=eos_ids,
                    pad_id=pad_id,
                    generator=gen,
                    tokenizer=tokenizer,
                    version_hook=version_hook,
                )
                for i, s in zip(idx, out):
                    results[i] = s
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return results
