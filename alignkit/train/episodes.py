"""Multi-turn episodes as the online recipes' samples (`env.name`): the model answers, the
environment replies (tool results), and the whole episode trains as one sequence.

`EpisodeSampler.sample` runs `generation.num_samples` episodes per prompt on the KV-cache sampler
(`alignkit.generation.multiturn`), each with its own environment instance, and returns them as
`Sample`s whose `mask` marks the model's own tokens. The rollout lays each episode out after its
prompt like any completion, with that mask: the environment's tokens (tool results, the template's
turn markers) are in the context the model attends to but carry no segment, so no loss, log-prob
ratio, KL or advantage ever touches them (tests/test_episodes.py checks their gradient is zero).

Rewards: an episode's reward is its discounted return G_0 = sum_t gamma^t r_t over the turn
rewards the environment gave (`env.gamma`, 1 by default: the plain sum). GRPO and RLOO also credit
each turn with its own return G_t = sum_{t'>=t} gamma^(t'-t) r_t' against the group's baseline
(`token_returns`): a simple form of the turn-level credit of MT-GRPO (Zeng et al., "Reinforcing
Multi-Turn Reasoning in LLM Agents via Turn-Level Credit Assignment", arXiv 2505.11821, which
normalises turn and outcome rewards separately); with gamma = 1 and only a final reward every turn's return is the
episode's, and the
advantages are exactly single-turn GRPO's.

Tools: the environment's JSON schemas go through the chat template (`apply_chat_template(tools=)`)
when it supports tools; otherwise (SmolLM2's template, for one) a system message describes them
and the `<tool_call>` format (`envs.toolcalls.fallback_instructions`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alignkit.envs import load_environment_class
from alignkit.envs.builtin import bind_executor, resolve_tools, runs_code
from alignkit.envs.sandbox import UNSAFE_WARNING, make_executor
from alignkit.envs.toolcalls import fallback_instructions, template_style
from alignkit.errors import ConfigError
from alignkit.generation.decode import Sample, SamplingParams, row_seed
from alignkit.generation.multiturn import (
    Episode,
    TemplateError,
    render,
    sample_episodes,
    sample_episodes_on,
    template_kind,
)


def discounted_returns(turn_rewards: list, gamma: float) -> list:
    """[G_0, ..., G_T]: G_t = r_t + gamma * G_{t+1}, with G_T = 0 after the last turn (a turn cut
    by the token budget got no reward and has nothing to come)."""
    out = [0.0]
    for r in reversed(turn_rewards):
        out.append(float(r) + gamma * out[-1])
    return out[::-1]


def token_returns(episode: Episode, gamma: float) -> list:
    """The return of each model token's turn, one per model token (the scored tokens, in order)."""
    g = discounted_returns(episode.turn_rewards, gamma)
    return [g[t] for t in episode.turn_of]


def episode_rewards(samples: list, gamma: float) -> torch.Tensor:
    """[P, n]: each episode's discounted return G_0, the reward its group's advantage compares."""
    return torch.tensor(
        [[discounted_returns(s.episode.turn_rewards, gamma)[0] for s in group] for group in samples],
        dtype=torch.float32,
    ).reshape(len(samples), -1)


def record_of(example) -> dict:
    """The record an environment's `reset` reads: the prompt record's columns, and `prompt` (the
    user's text for a one-message prompt, else the message list)."""
    msgs = [dict(m) for m in example.prompt]
    prompt = msgs[0]["content"] if len(msgs) == 1 and msgs[0]["role"] == "user" else msgs
    return {**example.columns, "prompt": prompt}


def spans(tokenizer, episode: Episode) -> list:
    """[(text, scored)]: the episode after its prompt as runs of model (scored) and environment tokens."""
    out, run, flag = [], [], None
    for t, m in zip(episode.token_ids, episode.model_mask):
        if flag is not None and m != flag:
            out.append((tokenizer.decode(run), flag))
            run = []
        run.append(t)
        flag = m
    if run:
        out.append((tokenizer.decode(run), flag))
    return out


class EpisodeSampler:
    """Builds one environment per episode from `env` and samples episodes for prompt examples."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.env_cfg = cfg.env
        self.cls = load_environment_class(cfg.env.name)
        self.style = template_style(tokenizer)
        self.tools = resolve_tools(cfg.env.tools) if cfg.env.tools is not None else None
        self.executor = make_executor(cfg.env.sandbox)
        self.tags = tuple(cfg.data.thinking_tags)
        try:  # a template episodes cannot continue stops the run here, before the model loads
            self.template = template_kind(tokenizer, self.tags)
        except TemplateError as e:
            raise ConfigError(str(e)) from None
        env = self.make()  # a bad `env.args` or `env.tools` fails here, before the model loads
        if isinstance(getattr(env, "tools", None), dict) and runs_code(env.tools):
            if self.executor.name == "none":
                print(UNSAFE_WARNING, file=sys.stderr, flush=True)
            self.executor.check()  # no sandbox here: stop before training, saying how to get one

    def make(self):
        e = self.env_cfg
        try:
            env = self.cls(**e.args)
        except TypeError as err:
            raise ConfigError(f"`env.args` {e.args!r} do not fit environment {e.name!r}: {err}") from None
        if self.tools is not None:
            if not isinstance(getattr(env, "tools", None), dict):
                raise ConfigError(
                    f"`env.tools`: environment {e.name!r} has no `tools` to replace (a tool environment "
                    "keeps {name: (schema, function)} in `tools`, as envs.builtin.ToolEnvironment)."
                )
            env.tools = self.tools
        if isinstance(getattr(env, "tools", None), dict):
            env.tools = bind_executor(env.tools, self.executor)
        if hasattr(env, "style"):  # parse calls in the template's format; the fallback teaches hermes blocks
            env.style = "hermes" if self.style == "fallback" else self.style
        return env

    def start(self, env, example) -> tuple[list, list | None]:
        """Reset `env` on `example`: (the first messages, the tool schemas for the template or None)."""
        msgs = [dict(m) for m in env.reset(record_of(example))]
        schemas = list(getattr(env, "schemas", None) or [])
        if not schemas:
            return msgs, None
        if self.style != "fallback":
            return msgs, schemas
        text = fallback_instructions(schemas)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + text}
            return msgs, None
        return [{"role": "system", "content": text}] + msgs, None

    def prompt_ids(self, example) -> list:
        """The tokens the model continues for `example` (its first messages, tools included)."""
        msgs, tools = self.start(self.make(), example)
        return self.tokenizer(render(self.tokenizer, msgs, tools, generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]

    @torch.no_grad()
    def sample(
        self,
        model,
        examples: list,
        indices: list,
        params: SamplingParams,
        seed: int,
        batch_size: int,
        backend=None,
        min_version: int = 0,
    ) -> tuple[list, torch.Tensor]:
        """`params.n` episodes per example: (samples [P][n] with `mask` and `episode` set, rewards
        [P, n] = each episode's discounted return). Episode k of example i draws from its own
        generator, seeded by (seed, indices[i], k), as single-turn sampling does. `backend`: a
        token-in, token-out generation backend (vLLM, `sample-serve`) that samples each turn instead
        of `model` on the KV cache (`multiturn.sample_episodes_on`; `model` is then unused), once it
        holds policy version `min_version`; its samples carry each model token's version."""
        e, n = self.env_cfg, params.n
        out: list[list[Sample | None]] = [[None] * n for _ in examples]  # every one filled below
        returns = [[0.0] * n for _ in examples]  # each episode's discounted return G_0
        rows = [(i, k) for i in range(len(examples)) for k in range(n)]
        for start in range(0, len(rows), batch_size * n):
            chunk = rows[start : start + batch_size * n]
            envs = [self.make() for _ in chunk]
            firsts, tools = [], None
            for env, (i, _) in zip(envs, chunk):
                msgs, tools = self.start(env, examples[i])
                firsts.append(msgs)
            budgets = []
            for msgs, (i, _) in zip(firsts, chunk):
                prompt = len(
                    self.tokenizer(
                        render(self.tokenizer, msgs, tools, generation_prompt=True), add_special_tokens=False
                    )["input_ids"]
                )
                room = self.cfg.data.max_length - prompt
                if room <= 0:
                    raise ConfigError(
                        f"{examples[i].source}: the episode's prompt is {prompt} tokens (tools included), "
                        f"`data.max_length` is {self.cfg.data.max_length}: raise data.max_length."
                    )
                budgets.append(min(room, e.max_tokens or room))
            seeds = [row_seed(seed, indices[i], k) for i, k in chunk]
            common = dict(max_turns=e.max_turns, max_tokens=budgets, tools=tools, tags=self.tags)
            if backend is not None:
                episodes = sample_episodes_on(
                    backend, self.tokenizer, envs, firsts, params, seeds=seeds, min_version=min_version, **common
                )
            else:
                device = next(model.parameters()).device
                gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
                episodes = sample_episodes(
                    model, self.tokenizer, envs, firsts, params, generator=gens, group_size=n, **common
                )
            for ep, (i, k) in zip(episodes, chunk):
                text = self.tokenizer.decode(ep.token_ids, skip_special_tokens=True)
                out[i][k] = Sample(
                    ep.token_ids,
                    ep.logprobs,
                    "stop" if ep.end == "answer" else "length",
                    text,
                    mask=ep.model_mask,
                    episode=ep,
                    versions=ep.versions or None,  # one per model token (staleness counts the model's tokens)
                    reasoning_tokens=ep.reasoning_tokens,
                    answer_tokens=ep.answer_tokens,
                    thinking_cut=ep.thinking_cut,
                )
                returns[i][k] = discounted_returns(ep.turn_rewards, e.gamma)[0]
        rewards = torch.tensor(returns, dtype=torch.float32).reshape(len(examples), n)
        return out, rewards

    def record(self, path: Path, key: int, sample: Sample) -> None:
        """Append one episode to RUN/episodes.jsonl (what `alignkit report` shows)."""
        ep = sample.episode
        assert isinstance(ep, Episode)  # an episode sampler's samples carry their episode
        row = {
            "key": key,
            "prompt": self.tokenizer.decode(ep.prompt_ids),
            "turns": ep.turns,
            "end": ep.end,
            "turn_rewards": ep.turn_rewards,
            "reward": discounted_returns(ep.turn_rewards, self.env_cfg.gamma)[0],
            "counts": ep.counts,
            "spans": [[t, m] for t, m in spans(self.tokenizer, ep)],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def show_episode(recipe, model, index: int) -> str:
    """`alignkit data show --episode`: one episode of training example `index`, sampled as training
    samples it (the run's seed and sampling settings), with the tokens the loss scores marked."""
    from alignkit.data.tokenize import explain

    sampler, tok = recipe.episodes, recipe.tokenizer
    samples, rewards = sampler.sample(
        model, [recipe.examples["train"][index]], [index], recipe.params.but(n=1), recipe.cfg.seed, 1
    )
    ep = samples[0][0].episode
    lines = [
        f"episode: {ep.turns} turns, ended by {ep.end}, turn rewards {ep.turn_rewards}, reward "
        f"{float(rewards[0, 0]):g}, counts {ep.counts}",
        "  [scored] marks the model's own tokens; [context] the environment's (in the context, not in the loss)",
    ]
    lines += [f"  [{'scored' if m else 'context'}] {text!r}" for text, m in spans(tok, ep)]
    lines.append("")
    lines.append(
        explain(
            tok,
            ep.prompt_ids,
            ep.token_ids,
            label="episode",
            scored=list(ep.model_mask),
            max_rows=64,
            why="the model's tokens; tool results and turn markers are context only",
        )
    )
    return "\n".join(lines)
