"""Multi-turn episodes on the KV cache: the model answers, an environment replies (tool results,
a user), and generation continues from the cache with only the new tokens fed in, never the whole
conversation again. The online recipes train on these episodes with `env` set
(`alignkit.train.episodes`).

The episode is one token sequence after the prompt: the model's sampled tokens exactly as sampled
(never re-tokenised from their text) and, between turns, the environment's tokens as the chat
template renders them. `observation_ids` finds those: the rest of the template's closing of the
model's turn (what follows the end-of-turn token the model emitted, e.g. ChatML's newline; all of
the closing when the turn was cut at `max_new_tokens`), the new messages and the next assistant
header. `model_mask` marks the model's tokens: the only ones a loss may score.

Rows advance turn by turn together: in each turn every live episode samples until its
end-of-turn token or `max_new_tokens`; then each environment answers and the rows still going get
their observation tokens in one forward pass (ragged lengths left-padded and masked out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.data.reasoning import split_reasoning
from alignkit.generation.decode import SamplingParams, Thinking, eos_ids, left_pad, next_tokens, row_seed


@dataclass
class Episode:
    prompt_ids: list
    token_ids: list = field(default_factory=list)  # everything after the prompt: model and environment tokens
    model_mask: list = field(default_factory=list)  # True where the model sampled the token
    logprobs: list = field(default_factory=list)  # one per model token, in order (raw or processed: `params.logprobs`)
    turn_of: list = field(default_factory=list)  # one per model token: the turn (0, 1, ...) it belongs to
    versions: list = field(default_factory=list)  # one per model token: the policy version that sampled it (servers)
    messages: list = field(default_factory=list)  # the conversation, first messages included
    turn_rewards: list = field(default_factory=list)
    turns: int = 0
    end: str = ""  # "answer" (the environment ended it), "turn_limit" or "token_limit"
    counts: dict = field(default_factory=dict)  # the environment's counters at the end (tool calls, errors)
    reasoning_tokens: int | None = None  # model tokens inside reasoning blocks (None: not tracked)
    answer_tokens: int | None = None  # model tokens outside them
    thinking_cut: bool = False  # the thinking budget closed one of its reasoning blocks

    @property
    def reward(self) -> float:
        return float(sum(self.turn_rewards))


def render(tokenizer, messages: list, tools=None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


PLACEHOLDER = "ALIGNKIT_MODEL_TURN"  # stands for each model turn when the template renders the conversation


def _stubbed(conversation: list) -> list:
    """The conversation with each assistant message replaced by the placeholder: no reasoning for a
    template to strip, no text for it to rewrite."""
    return [{"role": "assistant", "content": PLACEHOLDER} if m["role"] == "assistant" else m for m in conversation]


def observation_ids(tokenizer, conversation: list, new_messages: list, ended_by_eos: bool, tools=None) -> list:
    """Token ids that follow the model's tokens of its last turn (`conversation[-1]`): the rest of
    the template's closing of that turn, the new messages and the next generation prompt.

    History is never re-rendered from the model's text: the template renders the conversation with
    every model turn replaced by a placeholder, and the tokens are the text after the last
    placeholder, with and without the new messages. So a template that strips earlier reasoning
    (Qwen3, DeepSeek-R1) or renders it from a separate field changes nothing here: the trainer
    scores the model's tokens exactly as sampled, between the template's own markers. Raises
    `TemplateError` when even that is impossible (the template renders the conversation differently
    once messages follow it, beyond the model's turns)."""
    stub = _stubbed(conversation)
    full = render(tokenizer, stub, tools)
    at = full.rfind(PLACEHOLDER)
    if at < 0:
        raise TemplateError(tokenizer, "it does not render an assistant message's content as written")
    close = full[at + len(PLACEHOLDER) :]
    eos = tokenizer.eos_token or ""
    if ended_by_eos and eos and close.startswith(eos):
        close = close[len(eos) :]
    after = render(tokenizer, stub + list(new_messages), tools, generation_prompt=True)
    if not after.startswith(full):
        raise TemplateError(tokenizer, "it renders the conversation differently once messages follow it")
    return tokenizer(close + after[len(full) :], add_special_tokens=False)["input_ids"]


class TemplateError(ValueError):
    """A chat template that multi-turn episodes cannot continue turn by turn; names the template
    and the option to use (`model.chat_template`)."""

    def __init__(self, tokenizer, why: str):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        super().__init__(
            f"the chat template of {name} cannot be continued turn by turn: {why}. Multi-turn episodes "
            "need a template whose rendering of a conversation is a prefix of its rendering of that "
            "conversation plus new messages (earlier model turns aside). Give one with "
            "`model.chat_template: FILE.jinja` (docs/reasoning.md shows an append-only ChatML one)."
        )


def template_kind(tokenizer, tags=("<think>", "</think>"), tools=None) -> str:
    """How the chat template treats reasoning in earlier assistant turns: `append_only` (it renders
    them as written), `strips_history` (it drops reasoning once later turns follow, as Qwen3 and
    DeepSeek-R1 do), or `reasoning_field` (it renders a message's `reasoning_content`). Raises
    `TemplateError` when episodes cannot be continued with it at all (checked before training)."""
    user = {"role": "user", "content": "hello"}
    observation_ids(tokenizer, [user, {"role": "assistant", "content": "x"}], [dict(user)], True, tools)
    reasoned = f"{tags[0]}because{tags[1]}answer"
    later = render(tokenizer, [user, {"role": "assistant", "content": reasoned}, user], tools)
    field = render(tokenizer, [user, {"role": "assistant", "content": "answer", "reasoning_content": "because"}], tools)
    if "because" in field:
        return "reasoning_field"
    return "append_only" if "because" in later else "strips_history"


class _Cache:
    """The batch's KV cache with each row's attention mask and next position."""

    def __init__(self, model, prompts: list, pad_id: int, repeat: int = 1):
        """`repeat`: each prompt runs once and its cache serves that many consecutive rows."""
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        ids, self.mask = left_pad(prompts, pad_id, self.device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1].float()
        if repeat > 1:
            self.cache.batch_repeat_interleave(repeat)
            self.logits, self.mask = self.logits.repeat_interleave(repeat, 0), self.mask.repeat_interleave(repeat, 0)
            positions = positions.repeat_interleave(repeat, 0)
        self.next_pos = positions[:, -1] + 1

    def feed(self, chunks: list) -> None:
        """Append each row's tokens (rows with none get masked padding); `logits` of a fed row
        become those after its last token."""
        width = max(len(c) for c in chunks)
        if width == 0:
            return
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        offsets = torch.arange(width, device=self.device)
        for r, c in enumerate(chunks):
            if c:
                ids[r, width - len(c) :] = torch.tensor(c, dtype=torch.long, device=self.device)
                mask[r, width - len(c) :] = 1
        lengths = mask.sum(-1)
        positions = self.next_pos[:, None] + (offsets[None, :] - (width - lengths)[:, None]).clamp(min=0)
        self.mask = torch.cat([self.mask, mask], dim=1)
        out = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        self.cache = out.past_key_values
        fed = lengths > 0
        self.logits = torch.where(fed[:, None], out.logits[:, -1].float(), self.logits)
        self.next_pos = self.next_pos + lengths


def _start(tokenizer, first_messages: list, max_tokens, tools) -> tuple[list, list, list]:
    """(token budget per row, prompt ids per row, the empty episodes) of a batch of episodes."""
    budget = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens] * len(first_messages)
    prompts = [
        tokenizer(render(tokenizer, m, tools, generation_prompt=True), add_special_tokens=False)["input_ids"]
        for m in first_messages
    ]
    return budget, prompts, [Episode(p, messages=list(m)) for p, m in zip(prompts, first_messages)]


@torch.no_grad()
def sample_episodes(
    model,
    tokenizer,
    envs: list,
    first_messages: list,
    params: SamplingParams,
    *,
    max_turns: int,
    max_tokens,
    tools=None,
    generator=None,
    group_size: int = 1,
    tags=None,
) -> list:
    """One episode per environment (`envs[i]` already reset, its conversation starting with
    `first_messages[i]`). `max_turns`: model turns per episode; `max_tokens`: tokens after the
    prompt (model and environment), one number or one per row. `generator`: one torch.Generator
    or one per row. `group_size`: rows come in runs of this many episodes of one prompt (a
    prompt's samples), whose prompt then runs once (its KV cache repeated), as in
    `decode.sample_batch`; runs whose prompts differ after all are prefilled row by row."""
    budget, prompts, episodes = _start(tokenizer, first_messages, max_tokens, tools)
    eos = eos_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        g = group_size if group_size > 1 and len(prompts) % group_size == 0 else 1
        shared = g > 1 and all(prompts[i] == prompts[i - i % g] for i in range(len(prompts)))
        cache = (
            _Cache(model, prompts[::g], tokenizer.pad_token_id, repeat=g)
            if shared
            else _Cache(model, prompts, tokenizer.pad_token_id)
        )
        live = [True] * len(envs)
        think = Thinking(params, prompts, lambda ids: tokenizer.decode(ids))
        for _ in range(max_turns):
            if not any(live):
                break
            turn = [[] for _ in envs]
            writing = list(live)  # rows still sampling this turn
            by_eos = [False] * len(envs)
            pending = [[] for _ in envs]  # sampled, not yet in the cache
            for _step in range(params.max_new_tokens):
                picked, logp = next_tokens(cache.logits, params, generator)
                tok = picked.tolist()
                for r, ep in enumerate(episodes):
                    if not writing[r]:
                        continue
                    forced = think.forced(r)
                    if forced is not None:  # the thinking budget's closing tag: context, not scored
                        tok[r] = forced
                    else:
                        ep.logprobs.append(logp[r])
                        ep.turn_of.append(ep.turns)
                    think.add(r, tok[r])
                    turn[r].append(tok[r])
                    pending[r] = [tok[r]]
                    ep.token_ids.append(tok[r])
                    ep.model_mask.append(forced is None)
                    if tok[r] in eos:
                        writing[r], by_eos[r] = False, True
                    elif len(ep.token_ids) >= budget[r]:
                        writing[r], live[r], ep.end = False, False, "token_limit"
                if not any(writing):
                    break
                cache.feed(pending)
                pending = [[] for _ in envs]
            chunks = [[] for _ in envs]
            for r, (env, ep) in enumerate(zip(envs, episodes)):
                if not live[r]:
                    continue
                obs = end_turn(tokenizer, env, ep, turn[r], by_eos[r], budget[r], max_turns, tools, tags)
                if obs is None:
                    live[r] = False
                    continue
                think.context(r, obs)
                chunks[r] = pending[r] + obs
            cache.feed(chunks)
    finally:
        model.train(was_training)
    for r, (env, ep) in enumerate(zip(envs, episodes)):
        counts = getattr(env, "counts", None)
        ep.counts = dict(counts) if isinstance(counts, dict) else {}
        if think.on:
            ep.reasoning_tokens, ep.answer_tokens = think.reasoning[r], think.answer[r]
        ep.thinking_cut = think.cut[r]
    return episodes


def end_turn(tokenizer, env, ep: Episode, turn: list, by_eos: bool, budget: int, max_turns: int, tools, tags):
    """After the model's turn (`turn`: its tokens, already in `ep`): the environment reads the
    answer after any reasoning and replies. Returns the observation tokens (appended to `ep` as
    context) to feed before the next turn, or None when the episode ended (`ep.end` set)."""
    eos = eos_ids(tokenizer)
    ep.turns += 1
    text = tokenizer.decode([t for t in turn if t not in eos], skip_special_tokens=True)
    reply = split_reasoning(text, tags) if tags else None
    if reply is None or reply.reasoning is None:
        ep.messages.append({"role": "assistant", "content": text})
    else:  # the environment reads the answer after the reasoning
        ep.messages.append({"role": "assistant", "content": reply.answer, "reasoning_content": reply.reasoning})
    result = env.step(ep.messages[-1])
    ep.turn_rewards.append(float(result.reward))
    if result.done or ep.turns >= max_turns:
        ep.end = "answer" if result.done else "turn_limit"
        return None
    obs = observation_ids(tokenizer, ep.messages, list(result.messages), by_eos, tools)
    ep.messages.extend(result.messages)
    if len(ep.token_ids) + len(obs) >= budget:
        ep.end = "token_limit"
        return None
    ep.token_ids.extend(obs)
    ep.model_mask.extend([False] * len(obs))
    return obs


def sample_episodes_on(
    backend,
    tokenizer,
    envs: list,
    first_messages: list,
    params: SamplingParams,
    *,
    max_turns: int,
    max_tokens,
    seeds: list,
    tools=None,
    tags=None,
    min_version: int = 0,
) -> list:
    """`sample_episodes` on a generation backend that takes token ids and returns token ids and
    log-probs (a vLLM engine or server, an `alignkit sample-serve`: `generation.backends`). Each
    turn, every live episode's whole sequence so far goes in as tokens (never text: the model's
    tokens stay as sampled, the environment's are the template's, as on the KV cache), and the
    engine's prefix cache keeps what earlier turns computed. Turn t of row r samples with seed
    `row_seed(seeds[r], t)`: the episodes do not depend on the batch. A thinking budget is the
    backend's (`budget.BudgetedBackend`): the tags it inserts come back marked False in `Sample.mask`.

    `min_version`: every turn is sampled once the backend holds at least that policy version (an
    asynchronous run's request); each model token records the version that sampled it
    (`Episode.versions`), the server's label where it gives one, else `min_version`. Weights that
    change between two turns (or, on `sample-serve`, between two tokens) are partial rollouts,
    as for single turns."""
    budget, prompts, episodes = _start(tokenizer, first_messages, max_tokens, tools)
    eos = eos_ids(tokenizer)
    live = [True] * len(envs)
    for t in range(max_turns):
        rows = [r for r in range(len(envs)) if live[r]]
        if not rows:
            break
        # a turn never runs past the episode's budget (nor past the engine's context)
        room = {r: min(params.max_new_tokens, budget[r] - len(episodes[r].token_ids)) for r in rows}
        for size in sorted(set(room.values())):
            group = [r for r in rows if room[r] == size]
            out = backend.sample(
                [episodes[r].prompt_ids + episodes[r].token_ids for r in group],
                params.but(n=1, max_new_tokens=size),
                seeds[group[0]],
                prompt_seeds=[row_seed(seeds[r], t) for r in group],
                min_version=min_version,
            )
            for r, (s,) in zip(group, out):
                ep, turn, by_eos = episodes[r], [], False
                logprobs = iter(s.logprobs)  # one per sampled token: a thinking budget's tags have none
                versions = s.versions or [min_version] * len(s.token_ids)  # one per token
                for tok, sampled, version in zip(s.token_ids, s.mask or [True] * len(s.token_ids), versions):
                    turn.append(tok)
                    ep.token_ids.append(tok)
                    ep.model_mask.append(sampled)
                    if sampled:
                        ep.logprobs.append(next(logprobs))
                        ep.versions.append(version)
                        ep.turn_of.append(ep.turns)
                    if tok in eos:
                        by_eos = True
                        break
                    if len(ep.token_ids) >= budget[r]:
                        live[r], ep.end = False, "token_limit"
                        break
                if s.reasoning_tokens is not None:  # the budgeted backend tracks reasoning per turn
                    ep.reasoning_tokens = (ep.reasoning_tokens or 0) + s.reasoning_tokens
                    ep.answer_tokens = (ep.answer_tokens or 0) + (s.answer_tokens or 0)
                    ep.thinking_cut = ep.thinking_cut or s.thinking_cut
                if live[r]:
                    obs = end_turn(tokenizer, envs[r], ep, turn, by_eos, budget[r], max_turns, tools, tags)
                    live[r] = obs is not None
    for env, ep in zip(envs, episodes):
        counts = getattr(env, "counts", None)
        ep.counts = dict(counts) if isinstance(counts, dict) else {}
    return episodes


def episode_metrics(episodes: list) -> dict:
    """Per-batch episode metrics (floats): turns per episode, the shares that ended by answering or
    at the turn or token limit, reward per turn, and (from environments that count them, like
    `envs.builtin.ToolEnvironment`) tool calls and tool errors per episode."""
    n = max(len(episodes), 1)
    turns = sum(e.turns for e in episodes)
    out = {
        "episode/turns": turns / n,
        "episode/reward_per_turn": sum(e.reward for e in episodes) / max(turns, 1),
        **{
            f"episode/ended_{kind}": sum(e.end == kind for e in episodes) / n
            for kind in ("answer", "turn_limit", "token_limit")
        },
    }
    for key in sorted({k for e in episodes for k in e.counts}):
        out[f"episode/{key}"] = sum(e.counts.get(key, 0) for e in episodes) / n
    return out
