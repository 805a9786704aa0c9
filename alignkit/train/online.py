"""Online recipes: the policy samples while it trains and learns from the rewards of its own samples.

`OnlineRecipe` is the one online recipe class: it loads and tokenizes prompts, samples each
micro-batch's rollout (the generation backend; a prompt's samples share its prefill; multi-turn
episodes when `env.name` is set; DAPO's dynamic sampling), scores it (`online.rewards` or the
environment), packs it, reuses it for `iterations` optimizer steps, saves it in checkpoints and
evaluates held-out prompts. What differs between methods is an `OnlineMethod` object the recipe is
built with (`train/recipes/<name>.py`, named in `alignkit.registries.recipes`): which samples it
trains on (`select`), what it completes the rollout with (`fill`: advantages, old and reference
log-probs, values), its loss and its normaliser. Methods are composed, not derived: GRPO, RLOO
and REINFORCE++ are one `PolicyGradient` method with different advantage estimators.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from pathlib import Path
from typing import Protocol

import torch

from alignkit.config import RunConfig, max_staleness
from alignkit.data.batching import TokenBatch, collate_packed_groups
from alignkit.data.negative import TokenizedGroup
from alignkit.data.prompts import PromptExample, load_prompt_examples, prompt_columns, tokenize_prompts
from alignkit.data.splits import PreparedData, example_sources, load_examples
from alignkit.data.vision import PixelPrompt
from alignkit.errors import ConfigError
from alignkit.generation.adapters import adapter_update_copy
from alignkit.generation.backends import GenerationBackend, TransformersBackend, make_backend
from alignkit.generation.budget import BudgetedBackend
from alignkit.generation.decode import SamplingParams, banned_tokens, row_seed, sampling_params, thinking_params
from alignkit.logprob_passes import LiveReference
from alignkit.logprobs import in_segment_order, segment_logps
from alignkit.losses import online as rl
from alignkit.losses.combine import resolve_terms
from alignkit.models import resolve_model_path
from alignkit.rewards.build import build_reward
from alignkit.rewards.functions import score_groups
from alignkit.train.async_rollouts import RolloutPipeline
from alignkit.train.base import SetupContext, Trainable
from alignkit.train.episodes import EpisodeSampler, episode_rewards, token_returns
from alignkit.train.rollouts import Rollout, policy_gradient, rollout_metrics, token_segments


class OnlineMethod(Protocol):
    """What an online method is made of. Every hook is declared; `OnlineRecipe` calls each one, and
    `MethodBase` gives the defaults."""

    name: str
    uses_reference: bool  # the recipe keeps a frozen reference model

    @property
    def iterations(self) -> int | None: ...  # optimizer steps per rollout (None: `online.iterations`)

    def bind(self, recipe: "OnlineRecipe") -> None: ...

    def prepare(self, data: PreparedData) -> PreparedData: ...

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData: ...

    def extra_modules(self, model, ctx: SetupContext) -> dict[str, Trainable]: ...

    def sampling_models(self) -> tuple: ...

    def visible(self, metrics: dict) -> dict: ...

    def select(self, samples: list, rewards: torch.Tensor, metrics: dict) -> tuple[list, list]: ...

    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None: ...

    def loss(self, model, rollout: Rollout, split: str) -> tuple[torch.Tensor, dict]: ...

    def weight(self, rollout: Rollout) -> int: ...

    def evaluate(self, model, items: list) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def show_example(self, data: PreparedData, index: int) -> str: ...


class MethodBase:
    """Defaults of `OnlineMethod`'s hooks: every sample trains, the rollout gets the common tensors
    (`OnlineRecipe.fill_common`), the normaliser is `online.aggregation`'s, evaluation is the
    held-out reward, no state."""

    name = "online"
    uses_reference = False
    iterations: int | None = None

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._recipe: OnlineRecipe | None = None

    @property
    def recipe(self) -> OnlineRecipe:
        assert self._recipe is not None, "bind(recipe) first"  # OnlineRecipe.__init__ binds its method
        return self._recipe

    def bind(self, recipe: "OnlineRecipe") -> None:
        self._recipe = recipe

    def prepare(self, data: PreparedData) -> PreparedData:
        return data

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData:
        return data

    def extra_modules(self, model, ctx: SetupContext) -> dict[str, Trainable]:
        return {}

    def sampling_models(self) -> tuple:
        """Modules besides the policy that run while a rollout is sampled and completed."""
        return ()

    def visible(self, metrics: dict) -> dict:
        """The rollout metrics this method reports (all of them)."""
        return metrics

    def select(self, samples, rewards, metrics) -> tuple[list, list]:
        """(kept prompts' positions, per kept prompt the sample indices to train on): all."""
        p, n = rewards.shape
        return list(range(p)), [list(range(n))] * p

    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        self.recipe.fill_common(model, rollout)

    def loss(self, model, rollout: Rollout, split: str):
        raise NotImplementedError

    def weight(self, rollout: Rollout) -> int:
        return self.recipe.aggregation_weight(rollout)

    def evaluate(self, model, items: list) -> dict:
        return self.recipe.evaluate_reward(model, items)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def show_example(self, data: PreparedData, index: int) -> str:
        return self.recipe.describe_example(data, index)


class SequenceAdvantages:
    """An advantage estimator over each prompt's samples: `advantages(rewards [P, G]) -> [P, G]`
    broadcast to every token of a sample, and `scale(rewards) -> [P, 1]`, what it divides a
    reward's distance from its baseline by (multi-turn credit uses it). Multi-turn episodes
    (`train.episodes`): turn t's tokens are credited with their own return G_t against the same
    baseline, A_t = A + (G_t - G_0) / scale, equal to A when G_t = G_0."""

    def __init__(self, advantages, scale):
        self.advantages, self.scale = advantages, scale

    def __call__(self, recipe: "OnlineRecipe", model, rollout: Rollout, rewards: torch.Tensor) -> None:
        recipe.fill_common(model, rollout)
        assert rollout.batch is not None  # `fill` runs only on a rollout with samples to train on
        device, segs = rollout.batch.input_ids.device, token_segments(rollout.batch)
        flat = lambda t: t.expand_as(rewards).t().reshape(-1).to(device)[segs]  # noqa: E731  (segment k * P + i)
        rollout.advantages = flat(self.advantages(rewards))
        if rollout.turn_returns is not None:
            rollout.advantages = rollout.advantages + (rollout.turn_returns - flat(rewards)) / flat(self.scale(rewards))


def unscaled(rewards: torch.Tensor) -> torch.Tensor:
    """[P, 1] ones: an estimator that does not rescale."""
    return torch.ones_like(rewards[:, :1])


class PolicyGradient(MethodBase):
    """Every sample, per-token advantages from `estimator(recipe, model, rollout, rewards)`, through
    the registered per-token policy loss (`loss`, default `ppo_clip`), with optional truncated
    importance sampling (`online.tis_cap`) and, when `kl_in_loss`, GRPO's k3 KL term (`online.kl_coef`)
    in the loss (`rollouts.policy_gradient`)."""

    def __init__(self, cfg, name: str, estimator, kl_in_loss: bool = True):
        super().__init__(cfg)
        self.name, self.estimator, self.kl_in_loss = name, estimator, kl_in_loss
        self.uses_reference = cfg.online.kl_coef > 0
        (self.term,) = resolve_terms(cfg.loss, [], data="rollout")

    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        self.estimator(self.recipe, model, rollout, rewards)

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self.recipe.empty(rollout.metrics)
        o = self.cfg.online
        out, logps, segs, metrics = self.recipe.policy(model, rollout)
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        ref = in_segment_order(rollout.ref)[0] if self.kl_in_loss and rollout.ref is not None else None
        loss, pg = policy_gradient(
            self.term,
            logps,
            old,
            rollout.advantages,
            segs,
            rollout.batch.num_segments,
            o.aggregation,
            self.cfg.generation.max_new_tokens,
            ref,
            o.kl_coef if self.kl_in_loss else 0.0,
            sampler_logps=rollout.generator_logps,
            tis_cap=o.tis_cap,
            is_mask=(o.is_mask_low, o.is_mask_high),
        )
        return loss, {**metrics, **pg}


def check_per_step(reward, method: str) -> bool:
    """Whether the run's reward is a process reward model with `per_step` rewards; refuses them
    where they cannot work."""
    terms = getattr(reward, "terms", None)
    if terms is not None and any(getattr(r, "per_step", False) for r, _ in terms):
        raise ConfigError(
            "`online.rewards`: a process reward model with `per_step: true` must be the only reward (its steps "
            "carry the credit); drop the other terms or `per_step`."
        )
    if not getattr(reward, "per_step", False):
        return False
    if method not in ("grpo", "rloo", "ppo"):
        raise ConfigError(
            f"`per_step` process rewards work with recipe grpo, rloo (per-token returns in the advantage) and "
            f"ppo (each step's reward on its last token); recipe {method} takes one reward per reply: drop "
            "`per_step` (the steps' `aggregate` is used)."
        )
    return True


def step_returns(tokenizer, sample, separator: str) -> list:
    """Per scored token of `sample`, the return of its step: the sum of `sample.step_rewards` from
    that step on (the rewards sit on each step's last token, undiscounted). A token belongs to the
    step whose text it ends in (the steps are the reply's parts between `separator`, as the process
    reward model split them); tokens after the last step belong to it. Where the reply's steps do
    not line up with its scores, every token gets the whole reply's reward."""
    scores = list(sample.step_rewards)
    total = float(sum(scores))
    mask = sample.mask or [True] * len(sample.token_ids)
    text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    ends, pos = [], 0
    for part in text.split(separator):
        if part.strip():
            ends.append(pos + len(part))
        pos += len(part) + len(separator)
    if len(ends) != len(scores):
        return [total] * sum(mask)
    later = [float(sum(scores[j:])) for j in range(len(scores))]
    # the text length of a token prefix grows with it: each step's last token is found by bisection
    # (a few decodes per step, not one per token)
    upto = lambda t: len(tokenizer.decode(sample.token_ids[: t + 1], skip_special_tokens=True))  # noqa: E731
    last = [bisect.bisect_right(range(len(mask)), end, key=upto) - 1 for end in ends[:-1]]
    out, step = [], 0
    for t, scored in enumerate(mask):
        while step < len(last) and t > last[step]:
            step += 1
        if scored:
            out.append(later[step])
    return out


def gathered_adapters(model, ctx: SetupContext):
    """A sharded LoRA policy's adapters for a sampling server: every process gathers the parameters
    (a collective), and the first one's copy is what the server gets (`writer`)."""
    with ctx.full_params(model):
        return adapter_update_copy(model)


class OnlineRecipe:
    """Prompts in, rollouts out, evaluation by the held-out reward of greedy completions; the
    method (`OnlineMethod`) decides which samples train, how their advantages are formed and the
    loss. Implements `alignkit.train.base.Recipe`."""

    shares_prompts = True
    evaluate_at_start = True
    shard_model = True

    def __init__(self, cfg, tokenizer, method: "OnlineMethod"):
        self.cfg, self.tokenizer, self.method = cfg, tokenizer, method
        self.name = method.name
        self._ctx: SetupContext | None = None  # set in `setup`: the device, precision and data-parallel helpers
        self.iterations = method.iterations if method.iterations is not None else cfg.online.iterations
        self.uses_reference = method.uses_reference  # keeps a frozen reference (the initial policy; LoRA: its base)
        self.params = thinking_params(
            # a vision-language model's image-layout tokens are never drawn, so the log-probs both
            # sides compare are of the distribution without them (vLLM's processed ones are)
            sampling_params(cfg.generation, logprobs="processed").but(banned=tuple(banned_tokens(tokenizer))),
            tokenizer,
            cfg.data.thinking_tags,
            cfg.generation.max_thinking_tokens,
        )
        # None: a recipe that learns without a reward (distill), or episodes the environment rewards
        self.reward = build_reward(cfg.online.rewards) if cfg.online.rewards is not None else None
        self.per_step = check_per_step(self.reward, method.name)
        self.episodes = EpisodeSampler(cfg, tokenizer) if cfg.env.name is not None else None
        self.examples: dict[str, list[PromptExample]] = {}  # split -> examples (their columns feed the rewards)
        self.reference: LiveReference | None = None
        self.backend: GenerationBackend | None = None  # set in setup, once the model exists
        self._rollouts: dict[int, Rollout] = {}  # micro-batch key -> Rollout, reused for `iterations` optimizer steps
        self._used: list[int] = []  # keys of the rollouts of the current step
        self.pipeline: RolloutPipeline | None = None  # online.async: rollouts sampled ahead of the trainer
        self._items_of = None  # key -> the items of micro-batch `key` (`schedule`)
        method.bind(self)

    @property
    def ctx(self) -> SetupContext:
        assert self._ctx is not None, "Recipe.setup has not run"  # the loop calls setup before any other hook
        return self._ctx

    @property
    def autocast(self):
        return self._ctx.autocast if self._ctx is not None else contextlib.nullcontext

    def check_images(self) -> None:
        """Prompts with images sample on alignkit's own sampler or on a vLLM engine in the training
        process (in lockstep, or one step off or streaming): the images travel with the prompts'
        token ids there, not yet to a sampling server or an environment."""
        g = self.cfg.generation
        unsupported = [
            (bool(g.sampler_server), "generation.sampler_server"),
            (self.episodes is not None, f"env.name: {self.cfg.env.name}"),
        ]
        found = [name for bad, name in unsupported if bad]
        if found:
            raise ConfigError(
                f"the prompts hold images, which online training samples in the training process for now (alignkit's "
                f"own sampler or a vLLM engine there); remove {', '.join(found)} (docs/vision.md)."
            )

    def prepare(self) -> PreparedData:
        d, g = self.cfg.data, self.cfg.generation
        max_prompt = d.max_prompt_length or d.max_length - g.max_new_tokens
        if max_prompt <= 0:
            raise ConfigError(
                f"`data.max_length` ({d.max_length}) leaves no room for prompts after "
                f"`generation.max_new_tokens` ({g.max_new_tokens}); raise data.max_length."
            )
        train, held, notes = load_examples(self.cfg.data, self.cfg.seed, load_prompt_examples)
        self.examples = {"train": train, "eval": held}
        out = []
        for split, examples in (("train", train), ("eval", held)):
            items, cut = tokenize_prompts(examples, self.tokenizer, max_prompt)
            out.append(items)
            if any(it.vision is not None for it in items):
                self.check_images()
            if split == "train":
                self.train_items = items  # where dynamic sampling draws fresh prompts from
            if cut:
                notes.append(
                    f"{split}: {cut} of {len(items)} prompts were longer than {max_prompt} tokens and "
                    "keep their last tokens (raise data.max_length or data.max_prompt_length)"
                )
        if self.episodes is not None:
            e = self.cfg.env
            notes.append(
                f"{self.params.n} episodes per prompt in environment {e.name!r}: up to {e.max_turns} model turns "
                f"of up to {g.max_new_tokens} tokens each, temperature {g.temperature}; rewarded by the "
                f"environment (gamma {e.gamma}); tool calls parsed as {self.episodes.style}; chat template: "
                f"{self.episodes.template.replace('_', ' ')} (episodes never re-render earlier turns)"
            )
        else:
            notes.append(
                f"{self.params.n} completions sampled per prompt, up to {g.max_new_tokens} new tokens, "
                f"temperature {g.temperature}; reward: {getattr(self.reward, 'name', self.reward) or 'none'}"
            )
        return self.method.prepare(PreparedData(out[0], out[1], notes, sources=example_sources(train, held)))

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData:
        self._ctx = ctx
        g = self.cfg.generation
        state_fn = None
        if ctx.dist.enabled and (g.backend == "vllm" or g.sampler_server):
            if not (g.vllm_server or g.sampler_server):
                raise ConfigError(
                    "generation.backend=vllm with several processes needs a vLLM server every process "
                    "samples from: start `alignkit vllm-serve --model M` and set generation.vllm_server."
                )
            if self.cfg.lora.enabled:  # the adapters, gathered from their shards on every process
                state_fn = lambda m: gathered_adapters(m, ctx)  # noqa: E731
            else:
                state_fn = lambda m: ctx.dist.model_state(m, full=True)  # noqa: E731  (gathered on the first process)
        self.backend = make_backend(
            g.backend,
            model,
            self.tokenizer,
            resolve_model_path(self.cfg.model.name_or_path, self.cfg.cache_dir),
            g.batch_size,
            vllm_server=g.vllm_server,
            sampler_server=g.sampler_server,
            request_timeout_s=g.request_timeout_s,
            weight_transport=g.weight_transport,
            lora_rank=self.cfg.lora.r if self.cfg.lora.enabled else None,  # vLLM serves the adapters
            vllm_sync_dir=g.vllm_sync_dir,
            vllm_token_file=g.vllm_token_file,
            vllm_dtype=g.vllm_dtype,
            vllm_memory=g.vllm_gpu_memory_utilization,
            vllm_kv_cache_gib=g.vllm_kv_cache_gib,
            max_model_len=self.cfg.data.max_length,
            seed=self.cfg.seed,
            writer=ctx.dist.is_main,
            barrier=ctx.dist.barrier,
            state_fn=state_fn,
            training=True,
            overlapped=self.cfg.online.async_.mode
            != "sync",  # an engine sampling while the trainer trains never sleeps
        )
        if g.max_thinking_tokens is not None and not isinstance(self.backend, TransformersBackend):
            self.backend = BudgetedBackend(self.backend, self.tokenizer)  # generated in phases (`generation.budget`)
        if hasattr(self.backend, "set_run"):  # a server: versions count per run (new on every start)
            import secrets

            self.backend.set_run(ctx.dist.broadcast(secrets.token_hex(6)))
        a = self.cfg.online.async_
        if a.mode != "sync":
            if isinstance(self.backend, TransformersBackend):  # in this process: a copy samples beside the trainer
                if ctx.dist.enabled:
                    raise ConfigError(
                        f"online.async.mode={a.mode} with several processes needs a sampler server: start "
                        "`alignkit sample-serve --model M` (or `alignkit vllm-serve`) and set "
                        "generation.sampler_server (or generation.vllm_server)."
                    )
                self.backend = TransformersBackend.detached(model, self.tokenizer, g.batch_size)
            bound = max_staleness(a)
            self.pipeline = RolloutPipeline(
                self.backend,
                self._sample_ahead,
                mode=a.mode,
                max_staleness=bound,
                # rollouts ahead: staleness counts optimizer steps, and each rollout trains `iterations` of them
                buffer_size=a.buffer_size or max(1, bound // self.iterations) * self.cfg.train.grad_accum,
                keys=0,  # set by `schedule`
                per_cycle=self.cfg.train.grad_accum,
                writer=ctx.dist.is_main,
                state_fn=state_fn,
                in_flight_updates=bool(g.sampler_server or g.vllm_server),
                barrier=ctx.dist.barrier if ctx.dist.enabled else None,
            )
        if self.uses_reference:
            self.reference = LiveReference(model)
        return self.method.setup(model, data.replace(), ctx)

    def schedule(self, items_of, keys: int) -> None:
        """The loop's plan: `items_of(key)`, the items of micro-batch `key`; `keys`, how many the run
        trains on (what an asynchronous run may sample ahead)."""
        self._items_of = items_of
        if self.pipeline is not None:
            self.pipeline.keys = keys

    def _sample_ahead(self, key: int, version: int) -> list:
        """Micro-batch `key`'s samples [P][n] for the pipeline (on its thread), by the sampler holding
        policy version `version` or later: the items and seeds `batches` uses in sync mode."""
        assert self._items_of is not None  # the loop calls `schedule` before any step
        items = self._items_of(key)
        return self._sample(
            self._sampler_model(), items, "train", self.params, self.cfg.seed * 1_000_003 + key, version
        )

    def _sampler_model(self):
        """The model the pipeline's episodes run (a copy of the policy in this process), else None."""
        return getattr(self.backend, "model", None) if self.episodes is not None else None

    def _sample(self, model, items: list, split: str, params: SamplingParams, seed: int, version: int) -> list:
        """`params.n` samples [P][n] per item from the generation backend (single turns) or episodes in
        the environment (`env.name`), run by `model` (the policy, or the copy of it in the pipeline's
        sampler), each prompt with its own seed from `seed` and its example index."""
        backend = self.backend
        assert backend is not None  # made in setup
        if self.episodes is not None:  # on the KV cache of `model`, or turn by turn on a vLLM / sampling server
            exs = [self.examples[split][it.index] for it in items]
            remote = None if isinstance(backend, TransformersBackend) else backend
            samples, _ = self.episodes.sample(
                model,
                exs,
                [it.index for it in items],
                params,
                seed,
                self.cfg.generation.batch_size,
                remote,
                min_version=version,
            )
            return samples
        return backend.sample(
            [PixelPrompt(it.prompt_ids, it.vision) if it.vision is not None else it.prompt_ids for it in items],
            params,
            seed,
            prompt_seeds=[row_seed(seed, it.index) for it in items],
            min_version=version,
        )

    def extra_modules(self, model, ctx: SetupContext) -> dict[str, Trainable]:
        return self.method.extra_modules(model, ctx)

    def weight(self, rollout: Rollout) -> int:
        """The loss's normaliser for this rollout (the loss is returned as a sum, see
        `losses.online.aggregate_sum`): the method's (default: `online.aggregation`'s over its sequences)."""
        return self.method.weight(rollout)

    def aggregation_weight(self, rollout: Rollout) -> int:
        if rollout.batch is None:
            return 0
        return rl.aggregation_weight(
            token_segments(rollout.batch), rollout.batch.num_segments, self.cfg.online.aggregation
        )

    def loss(self, model, rollout: Rollout, split: str):
        return self.method.loss(model, rollout, split)

    # -- sampling and scoring --------------------------------------------------------------------

    def score(self, model, items: list, split: str, params: SamplingParams, seed: int, sync: bool = True):
        """Sample `params.n` completions per prompt; (samples [P][n], rewards [P, n], metrics).
        Each prompt is sampled with its own seed, from `seed` and its example index: the samples do
        not depend on which other prompts share the batch or the process. `sync`: load the policy's
        weights into the sampler first (not again for more prompts at the same weights)."""
        samples, rewards, parts, gen_s = self.sample_and_reward(model, items, split, params, seed, sync)
        return samples, rewards, self.method.visible(rollout_metrics(samples, rewards, parts, gen_s))

    def refill(self, model, items: list, samples: list, rewards: torch.Tensor, metrics: dict, seed: int):
        """DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, Sec. 3.2): a group whose samples all
        got the same reward has zero advantage and teaches nothing, so it is dropped, and fresh
        prompts from the training set (not in this batch; a seeded draw, so a resumed run draws the
        same) are sampled in up to `online.dynamic_sampling_rounds` more rounds until the batch has
        as many groups as it was given. What is left short after the last round trains as it is.
        Returns the kept (items, samples, rewards); metrics count the dropped groups, the extra
        prompts sampled, the rounds and the share of the batch filled."""

        def varied(r: torch.Tensor) -> list:
            return (r != r[:, :1]).any(dim=1).tolist()

        target, n = len(items), rewards.shape[1]
        ok = varied(rewards)
        kept = [(it, s, r) for it, s, r, k in zip(items, samples, rewards, ok) if k]
        dropped, extra, rounds = target - len(kept), 0, 0
        taken = {it.index for it in items}
        order = torch.randperm(len(self.train_items), generator=torch.Generator().manual_seed(seed)).tolist()
        pool = [self.train_items[i] for i in order if self.train_items[i].index not in taken]
        gen_s = float(metrics["time/generation_s"])
        while len(kept) < target and rounds < self.cfg.online.dynamic_sampling_rounds and pool:
            rounds += 1
            fresh, pool = pool[: target - len(kept)], pool[target - len(kept) :]
            s2, r2, m2 = self.score(model, fresh, "train", self.params, seed + 7919 * rounds, sync=False)
            extra, gen_s = extra + len(fresh), gen_s + float(m2["time/generation_s"])
            ok2 = varied(r2)
            dropped += ok2.count(False)
            kept += [(it, s, r) for it, s, r, k in zip(fresh, s2, r2, ok2) if k]
        metrics.update(
            {
                "dynamic_sampling/dropped_groups": torch.tensor(float(dropped)),
                "dynamic_sampling/extra_prompts": torch.tensor(float(extra)),
                "dynamic_sampling/rounds": torch.tensor(float(rounds)),
                "dynamic_sampling/filled": torch.tensor(len(kept) / max(target, 1)),
                "time/generation_s": torch.tensor(gen_s),
            }
        )
        if not kept:
            return [], [], rewards.new_zeros(0, n)
        return [k[0] for k in kept], [k[1] for k in kept], torch.stack([k[2] for k in kept])

    def sample_and_reward(self, model, items: list, split: str, params: SamplingParams, seed: int, sync: bool = True):
        exs = [self.examples[split][it.index] for it in items]
        backend = self.backend
        assert backend is not None  # made in setup
        start = time.perf_counter()
        pipeline = self.pipeline
        if pipeline is not None:  # on the pipeline's sampler, after what is queued for it
            if sync:
                pipeline.sync_now(model)  # its versions, not the backend's own count
            own = self._sampler_model()
            samples = pipeline.run_now(lambda: self._sample(own, items, split, params, seed, pipeline.published))
        else:
            if sync:
                backend.sync(model)  # the policy changed since the last rollout
            with self.ctx.full_params(*self.sampling_models(model)):  # processes sample different lengths
                samples = self._sample(model, items, split, params, seed, 0)
        gen_s = time.perf_counter() - start
        rewards, parts = self.reward_samples(exs, samples, split, params)
        return samples, rewards, parts, gen_s

    def reward_samples(self, exs: list, samples: list, split: str, params: SamplingParams):
        """(rewards [P, n], reward parts) of each prompt's samples; an episode's reward is its
        discounted return G_0 (the environment's turn rewards)."""
        if self.episodes is not None:
            return episode_rewards(samples, self.cfg.env.gamma), {}
        parts: dict = {}
        if self.reward is None:
            rewards = torch.zeros(len(samples), params.n)
        elif self.per_step:  # each step's score kept on its sample; the reward is their sum
            flat = [(list(ex.prompt), s) for ex, group in zip(exs, samples) for s in group]
            steps = self.reward.step_scores([p for p, _ in flat], [s.text for _, s in flat])
            for (_, s), scores in zip(flat, steps):
                s.step_rewards = scores
            rewards = torch.tensor([sum(x) for x in steps], dtype=torch.float32).reshape(len(samples), params.n)
        else:
            rewards, parts = score_groups(
                self.reward,
                [list(ex.prompt) for ex in exs],
                [[s.text for s in group] for group in samples],
                prompt_columns(exs),
                tuple(self.cfg.data.thinking_tags),
            )
        buffer = self.cfg.online.overlong_buffer
        if buffer and split == "train":  # training signal only: held-out rewards stay the task's own
            lengths = torch.tensor([[len(s.token_ids) for s in group] for group in samples])
            penalty = rl.overlong_penalty(lengths, self.params.max_new_tokens, buffer).to(rewards.dtype)
            rewards = rewards + penalty
            parts = {**parts, "overlong_penalty": penalty.reshape(-1).tolist()}  # logged as reward/overlong_penalty
        return rewards, parts

    def sampling_models(self, model) -> tuple:
        """The sharded modules that run while a rollout is sampled and completed (PPO adds its value model)."""
        return (model, *self.method.sampling_models())

    def batches(self, model, items: list, key: int) -> list:
        """[the rollout of micro-batch `key`], sampled once and reused for `iterations` steps."""
        self._used.append(key)
        if key in self._rollouts:
            return [self._rollouts[key]]
        # A new cycle: the rollouts whose `iterations` updates are done are not needed any more.
        self._rollouts = {k: r for k, r in self._rollouts.items() if r.updates < self.iterations}
        seed = self.cfg.seed * 1_000_003 + key  # a resumed run resamples the same completions
        if self.pipeline is None:
            samples, rewards, metrics = self.score(model, items, "train", self.params, seed)
        else:
            samples, rewards, metrics = self.take(model, items, key)
        if self.cfg.online.dynamic_sampling:
            items, samples, rewards = self.refill(model, items, samples, rewards, metrics, seed)
        kept, picks = self.method.select(samples, rewards, metrics) if items else ([], [])
        out = Rollout(None, metrics=metrics, key=key)
        if kept:
            device = next(model.parameters()).device
            out.groups = [self.group(items[i], [samples[i][k] for k in ks], i) for i, ks in zip(kept, picks)]
            out.batch = collate_packed_groups(out.groups, self.tokenizer.pad_token_id, self.cfg.train.pack_tokens).to(
                device
            )
            # segment of completion k of kept prompt j is k * P' + j (`collate_packed_groups`)
            per_segment = [samples[i][picks[j][k]] for k in range(len(picks[0])) for j, i in enumerate(kept)]
            out.generator_logps = torch.tensor([lp for s in per_segment for lp in s.logprobs], device=device)
            if self.episodes is not None:
                out.turn_returns = torch.tensor(
                    [g for s in per_segment for g in token_returns(s.episode, self.cfg.env.gamma)], device=device
                )
                if self.ctx.dist.is_main:
                    self.episodes.record(Path(self.cfg.output_dir) / "episodes.jsonl", key, per_segment[0])
            elif self.per_step:
                sep = getattr(self.reward, "step_separator", "\n")
                out.turn_returns = torch.tensor(
                    [g for s in per_segment for g in step_returns(self.tokenizer, s, sep)], device=device
                )
            with self.ctx.full_params(*self.sampling_models(model)):
                self.fill(model, out, rewards[kept], picks)
        self._rollouts[key] = out
        return [out]

    def take(self, model, items: list, key: int):
        """`score` for an asynchronous run: micro-batch `key`'s samples from the pipeline (sampled
        ahead, by an older policy version), rewarded here; the metrics add the `async/` ones."""
        assert self.pipeline is not None
        got, async_metrics = self.pipeline.get(model, key)
        exs = [self.examples["train"][it.index] for it in items]
        rewards, parts = self.reward_samples(exs, got.samples, "train", self.params)
        metrics = self.method.visible(rollout_metrics(got.samples, rewards, parts, 0.0))
        metrics.update(async_metrics)
        if self.ctx.dist.is_main:
            self._log_rollout(key, items, got, async_metrics)
        return got.samples, rewards, metrics

    def _log_rollout(self, key: int, items: list, got, metrics: dict) -> None:
        """One line per asynchronous rollout in `rollouts.jsonl`: the step it trains, its examples,
        the policy version it was asked with and its staleness (what a resumed run must not repeat)."""
        import json

        assert self.pipeline is not None
        row = {
            "step": self.pipeline.version + 1,
            "key": key,
            "examples": [it.index for it in items],
            "version": got.version,
            "staleness_mean": float(metrics["async/staleness_mean"]),
            "staleness_max": float(metrics["async/staleness_max"]),
        }
        with open(Path(self.cfg.output_dir) / "rollouts.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def group(self, item, samples: list, index: int) -> TokenizedGroup:
        """The prompt and the samples trained on; an episode brings its own prompt (the environment's
        first messages, tools included) and its mask of model tokens."""
        if samples[0].episode is None:  # a thinking budget's inserted tags are masked out (`Sample.mask`)
            masks = [s.mask for s in samples] if any(s.mask is not None for s in samples) else None
            return TokenizedGroup(
                item.prompt_ids, [s.token_ids for s in samples], index, masks=masks, vision=item.vision
            )
        prompt = samples[0].episode.prompt_ids
        if any(s.episode.prompt_ids != prompt for s in samples):
            raise ValueError(
                f"environment {self.cfg.env.name!r} started the episodes of one prompt (example "
                f"{item.index}) with different messages; `reset(record)` must depend on the record only."
            )
        return TokenizedGroup(prompt, [s.token_ids for s in samples], index, masks=[s.mask for s in samples])

    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        """Complete a rollout's per-token tensors before training (the method's advantages, ...).
        `rewards` [P', n] are the kept prompts' rewards, `picks` the samples trained on."""
        self.method.fill(model, rollout, rewards, picks)

    def fill_common(self, model, rollout: Rollout) -> None:
        """What most methods need: the policy's log-probs before the first update when a rollout is
        reused (`iterations` > 1), and the reference's."""
        t = self.cfg.train
        assert rollout.batch is not None  # `fill` runs only on a rollout with samples to train on
        if self.iterations > 1:
            with torch.no_grad():
                rollout.old_logps = in_segment_order(
                    segment_logps(model, rollout.batch, t.logprob_chunk_size, sampling=self.params)
                )[0]
        if self.reference is not None:
            rollout.ref = self.reference.segment(rollout.batch, t.logprob_chunk_size)

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()  # requests in flight are abandoned, not waited for
            self.pipeline = None
        if self.backend is not None:
            self.backend.close()  # a colocated vLLM engine's process and memory go now, not at exit
            self.backend = None

    def step_done(self) -> None:
        for key in self._used:
            self._rollouts[key].updates += 1
        self._used = []
        if self.pipeline is not None:
            self.pipeline.step_done()

    def state_dict(self) -> dict:
        """The rollouts still to be trained on (`iterations` > 1): a run resumed between two updates
        of one rollout must reuse its samples and old log-probs, not sample anew from the updated
        policy; and the method's own state."""
        out = {
            "rollouts": {str(k): r.state_dict() for k, r in self._rollouts.items() if r.updates < self.iterations},
            **self.method.state_dict(),
        }
        if self.pipeline is not None:
            out["async"] = self.pipeline.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self._rollouts = {int(k): Rollout.from_state_dict(r) for k, r in state["rollouts"].items()}
        self.method.load_state_dict(state)
        if self.pipeline is not None:
            if "async" not in state:
                raise ConfigError(
                    f"the checkpoint was written by a run with online.async.mode=sync; resume it with that mode "
                    f"(this run sets {self.cfg.online.async_.mode})."
                )
            self.pipeline.load_state_dict(state["async"])
            if self.ctx.dist.is_main:  # lines of steps after the checkpoint were never trained here
                log = Path(self.cfg.output_dir) / "rollouts.jsonl"
                if log.is_file():
                    import json

                    keep = [
                        ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] <= self.pipeline.version
                    ]
                    log.write_text("".join(ln + "\n" for ln in keep))

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model, items: list) -> dict:
        return self.method.evaluate(model, items)

    @torch.no_grad()
    def evaluate_reward(self, model, items: list) -> dict:
        """Held-out reward of each prompt's greedy completion (deterministic, so steps compare), each
        process answering its share of the prompts."""
        mine = self.ctx.shard(items)
        samples, rewards, parts, _ = (
            self.sample_and_reward(model, mine, "eval", self.params.but(temperature=0.0, n=1), self.cfg.seed)
            if mine
            else ([], torch.zeros(0, 1), {}, 0.0)
        )
        shares = self.ctx.gather_shares((samples, rewards, parts))
        samples = [g for share in shares for g in share[0]]
        rewards = torch.cat([share[1] for share in shares])
        parts = {k: [v for share in shares for v in share[2].get(k, [])] for k in shares[0][2]}
        metrics = rollout_metrics(samples, rewards, parts, 0.0)
        return {k: float(v) for k, v in metrics.items() if not k.startswith("time/")}

    # -- loss helpers ----------------------------------------------------------------------------

    def policy(self, model, rollout: Rollout, batch: TokenBatch | None = None, entropy: bool = True):
        """The policy's SegmentLogps of the rollout's batch (or `batch`), its token log-probs and
        segments in segment order, and the rollout's metrics plus the sampler/trainer mismatch."""
        scored = batch or rollout.batch
        assert scored is not None  # methods ask only for a rollout with samples to train on
        out = segment_logps(model, scored, self.cfg.train.logprob_chunk_size, entropy=entropy, sampling=self.params)
        logps, segs, ent = in_segment_order(out)
        metrics = dict(rollout.metrics)
        if rollout.updates > 0:  # a reused rollout: no sampling happened for this step
            metrics["time/generation_s"] = torch.tensor(0.0)
        elif batch is None:
            assert rollout.generator_logps is not None  # `batches` sets it with the batch
            # Trainer and sampler saw the same weights: their log-probs of the sampled tokens must agree.
            diff = (logps.detach() - rollout.generator_logps).abs()
            metrics["logprob_mismatch"], metrics["logprob_mismatch_max"] = diff.mean(), diff.max()
        if ent is not None:
            metrics["entropy"] = ent.mean()
        return out, logps, segs, metrics

    @staticmethod
    def empty(metrics: dict):
        return torch.zeros((), requires_grad=True), metrics  # weight 0: nothing to train on

    def show_example(self, data: PreparedData, index: int) -> str:
        return self.method.show_example(data, index)

    def describe_example(self, data: PreparedData, index: int) -> str:
        """The prompt and what the run does with it (the default `show_example`)."""
        item = data.train[index]
        if self.episodes is not None:
            ids = self.episodes.prompt_ids(self.examples["train"][index])
            return (
                "episode prompt (the environment's first messages and tools, what the model continues):\n"
                + self.tokenizer.decode(ids)
                + f"\n\n(+ {self.params.n} episodes per step in environment "
                f"{self.cfg.env.name!r}; `alignkit data show --episode` samples one with the model)"
            )
        return (
            "prompt (what the model continues):\n"
            + self.tokenizer.decode(item.prompt_ids)
            + f"\n\ncolumns passed to the reward: {self.examples['train'][index].columns}"
            + f"\n(+ {self.params.n} completions sampled per step, scored by {self.cfg.online.rewards})"
        )
