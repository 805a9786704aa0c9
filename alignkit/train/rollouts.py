"""What the online recipes share: the policy samples while it trains and learns from the rewards of
its own samples.

Each micro-batch is a *rollout*: its prompts, `generation.num_samples` completions sampled from the
current policy (the generation backend: alignkit's KV-cache sampler, each prompt's prefill shared
by its samples, or vLLM), their rewards, and a packed batch laying each prompt out once with its
completions (prefix sharing, as for pairs). A rollout carries per-token tensors (advantages,
returns, the sampler's and the old policy's log-probs), all [M] over the scored tokens in segment
order (`logprobs.in_segment_order`). The recipes (`recipes/grpo.py`, `rloo.py`, `online_dpo.py`,
`raft.py`, `ppo.py`) differ in which completions they train on, how advantages are formed, and
the loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.data.batching import TokenBatch, collate_packed_groups
from alignkit.data.negative import TokenizedGroup
from alignkit.data.prompts import load_prompt_examples, prompt_columns, tokenize_prompts
from alignkit.data.splits import PreparedData, example_sources, load_examples
from alignkit.errors import ConfigError
from alignkit.generation.backends import make_backend
from alignkit.generation.decode import SamplingParams, row_seed, sampling_params
from alignkit.logprob_passes import LiveReference
from alignkit.logprobs import SegmentLogps, in_segment_order, segment_logps
from alignkit.losses import online as rl
from alignkit.models import resolve_model_path
from alignkit.rewards.build import build_reward
from alignkit.rewards.functions import score_groups
from alignkit.generation.multiturn import episode_metrics
from alignkit.train.base import RecipeBase, SetupContext
from alignkit.train.episodes import EpisodeSampler, token_returns


@dataclass
class Rollout:
    """One micro-batch of samples, ready for the loss (on the model's device)."""

    batch: TokenBatch | None  # packed [prompt][completion 1]..[completion k] groups; None if nothing to train on
    groups: list = field(default_factory=list)  # the kept prompts' TokenizedGroups (to re-collate a minibatch)
    advantages: torch.Tensor | None = None  # [M] per token (per-sequence estimators broadcast theirs)
    returns: torch.Tensor | None = None  # [M] per token: the value targets (PPO)
    old_values: torch.Tensor | None = None  # [M] the critic's values at sampling time (PPO)
    generator_logps: torch.Tensor | None = None  # [M] the sampler's log-probs
    old_logps: torch.Tensor | None = None  # [M] the policy's before this rollout's first update
    ref: SegmentLogps | None = None  # the reference's log-probs of the batch (KL penalty, online DPO)
    turn_returns: torch.Tensor | None = None  # [M] multi-turn: the return of each token's turn (`train.episodes`)
    metrics: dict = field(default_factory=dict)
    updates: int = 0  # optimizer steps taken on this rollout so far
    key: int = 0  # the micro-batch it was sampled for (seeds what is drawn from it)

    _TOKEN_FIELDS = ("advantages", "returns", "old_values", "generator_logps", "old_logps", "turn_returns")

    def to(self, device) -> "Rollout":
        """Move to `device` in place (the recipe keeps this object to reuse it) and return it."""
        if self.batch is not None and self.batch.input_ids.device != torch.device(device):
            self.batch = self.batch.to(device)
            for name in self._TOKEN_FIELDS:
                value = getattr(self, name)
                setattr(self, name, None if value is None else value.to(device))
            if self.ref is not None:
                self.ref = SegmentLogps(**{k: None if v is None else v.to(device) for k, v in vars(self.ref).items()})
        return self

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens if self.batch is not None else 0

    @property
    def num_sequence_tokens(self) -> int:
        return self.batch.num_sequence_tokens if self.batch is not None else 0

    def state_dict(self) -> dict:
        """Tensors, numbers and dicts only (a checkpoint loads it with weights_only=True)."""
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        b = self.batch
        return {"batch": None if b is None else {k: cpu(v) if torch.is_tensor(v) else v for k, v in vars(b).items()},
                "groups": [{"prompt_ids": g.prompt_ids, "completions": g.completions, "index": g.index,
                            "masks": g.masks} for g in self.groups],
                **{name: cpu(getattr(self, name)) for name in self._TOKEN_FIELDS},
                "ref": None if self.ref is None else {k: cpu(v) for k, v in vars(self.ref).items()},
                "metrics": {k: cpu(v) for k, v in self.metrics.items()}, "updates": self.updates, "key": self.key}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Rollout":
        return cls(batch=None if state["batch"] is None else TokenBatch(**state["batch"]),
                   groups=[TokenizedGroup(**g) for g in state["groups"]],
                   **{name: state.get(name) for name in cls._TOKEN_FIELDS},
                   ref=None if state["ref"] is None else SegmentLogps(**state["ref"]),
                   metrics=dict(state["metrics"]), updates=state["updates"], key=state["key"])


def token_segments(batch: TokenBatch) -> torch.Tensor:
    """[M] the segment of each scored token, in segment order (as `in_segment_order` sorts them)."""
    pred = batch.predictor_positions()
    segs = batch.segment_ids[(batch.segment_ids >= 0) & (pred >= 0)]
    return torch.sort(segs, stable=True).values


def rollout_metrics(samples: list, rewards: torch.Tensor, parts: dict, generation_s: float) -> dict:
    """Metrics of sampled groups: reward (and each weighted term's), lengths, stops, zero-variance groups."""
    lengths = torch.tensor([len(s.token_ids) for group in samples for s in group], dtype=torch.float32)
    stopped = torch.tensor([s.finish_reason == "stop" for group in samples for s in group], dtype=torch.float32)
    metrics = {"reward": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
               "completion_length": lengths.mean(), "stopped_fraction": stopped.mean(),
               "time/generation_s": torch.tensor(generation_s)}
    if len(parts) > 1:
        for name, values in parts.items():
            v = torch.tensor(values, dtype=torch.float32)
            metrics[f"reward/{name}"], metrics[f"reward_std/{name}"] = v.mean(), v.std() if v.numel() > 1 else v * 0
    if rewards.shape[1] > 1:
        metrics["zero_variance_groups"] = torch.tensor(rl.zero_variance_fraction(rewards))
    episodes = [s.episode for group in samples for s in group if s.episode is not None]
    if episodes:
        metrics.update({k: torch.tensor(v) for k, v in episode_metrics(episodes).items()})
    return metrics


def policy_gradient(term, logps, old_logps, advantages, segs, num_segments: int, aggregation: str,
                    max_completion_length: int, ref_logps=None, kl_coef: float = 0.0, sampler_logps=None,
                    tis_cap: float = 0.0) -> tuple[torch.Tensor, dict]:
    """A registered per-token policy loss `term` (a LossTerm, e.g. ppo_clip), plus GRPO's k3 KL term
    when `ref_logps` is given and `kl_coef` > 0, reduced by `aggregation` (`online.aggregation`) as
    a sum to be divided by the step's `aggregation_weight`s (`losses.online.aggregate_sum`). All
    inputs [M] in segment order; metrics are token means (the KL is reported whenever a reference
    is given)."""
    extra = {"token_seq": segs} if "token_seq" in term.spec.inputs else {}  # sequence-level losses (GSPO)
    per_token, parts = term.spec.fn(logps, old_logps, advantages, **extra, **term.params)
    n = max(logps.numel(), 1)
    metrics = {k: v.detach().sum() / n for k, v in parts.items()}
    if tis_cap > 0 and sampler_logps is not None:
        # Truncated importance sampling (Yao et al., "Your Efficient RL Framework Secretly Brings You
        # Off-Policy RL Training", 2025): the sampler (vLLM in bf16, say) and the trainer disagree on
        # the probability of what was sampled; weight each token by min(pi_trainer / pi_sampler, C),
        # pi_trainer at the weights that sampled (old_logps), detached.
        w = torch.exp(old_logps.detach() - sampler_logps.to(old_logps.dtype)).clamp(max=tis_cap)
        per_token = per_token * w
        metrics["tis/weight_mean"] = w.sum() / n
        metrics["tis/capped_fraction"] = (w >= tis_cap).to(w.dtype).sum() / n
    if ref_logps is not None:
        kl = rl.kl_k3(logps, ref_logps.detach())
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
        metrics["kl"] = kl.detach().sum() / n
    return rl.aggregate_sum(per_token, segs, num_segments, aggregation, max_completion_length), metrics


class OnlineRecipe(RecipeBase):
    """Prompts in, rollouts out, evaluation by the held-out reward of greedy completions."""

    shares_prompts = True
    evaluate_at_start = True
    uses_reference = False  # keeps a frozen reference (the initial policy; LoRA: its base)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.iterations = cfg.online.iterations
        self.params = sampling_params(cfg.generation)
        # None: a recipe that learns without a reward (distill), or episodes the environment rewards
        self.reward = build_reward(cfg.online.rewards) if cfg.online.rewards is not None else None
        self.episodes = EpisodeSampler(cfg, tokenizer) if cfg.env.name is not None else None
        self.examples = {}  # split -> PromptExamples (their columns feed the rewards)
        self.reference = None
        self.backend = None  # set in setup, once the model exists
        self._rollouts = {}  # micro-batch key -> Rollout, reused for `iterations` optimizer steps
        self._used = []  # keys of the rollouts of the current step

    def prepare(self) -> PreparedData:
        d, g = self.cfg.data, self.cfg.generation
        max_prompt = d.max_prompt_length or d.max_length - g.max_new_tokens
        if max_prompt <= 0:
            raise ConfigError(f"`data.max_length` ({d.max_length}) leaves no room for prompts after "
                              f"`generation.max_new_tokens` ({g.max_new_tokens}); raise data.max_length.")
        train, held, notes = load_examples(self.cfg, load_prompt_examples)
        self.examples = {"train": train, "eval": held}
        out = []
        for split, examples in (("train", train), ("eval", held)):
            items, cut = tokenize_prompts(examples, self.tokenizer, max_prompt)
            out.append(items)
            if split == "train":
                self.train_items = items  # where dynamic sampling draws fresh prompts from
            if cut:
                notes.append(f"{split}: {cut} of {len(items)} prompts were longer than {max_prompt} tokens and "
                             "keep their last tokens (raise data.max_length or data.max_prompt_length)")
        if self.episodes is not None:
            e = self.cfg.env
            notes.append(f"{self.params.n} episodes per prompt in environment {e.name!r}: up to {e.max_turns} model turns "
                         f"of up to {g.max_new_tokens} tokens each, temperature {g.temperature}; rewarded by the "
                         f"environment (gamma {e.gamma}); tool calls parsed as {self.episodes.style}")
        else:
            notes.append(f"{self.params.n} completions sampled per prompt, up to {g.max_new_tokens} new tokens, "
                         f"temperature {g.temperature}; reward: {getattr(self.reward, 'name', self.reward) or 'none'}")
        return PreparedData(out[0], out[1], notes, sources=example_sources(train, held))

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData:
        self.ctx = ctx
        g = self.cfg.generation
        state_fn = None
        if ctx.dist.enabled and g.backend == "vllm":
            if not g.vllm_server:
                raise ConfigError("generation.backend=vllm with several processes needs a vLLM server every process "
                                  "samples from: start `alignkit vllm-serve --model M` and set generation.vllm_server.")
            if self.cfg.lora.enabled:
                raise ConfigError("generation.backend=vllm with several processes and LoRA is not supported yet; use "
                                  "one process, full fine-tuning, or generation.backend=transformers.")
            state_fn = lambda m: ctx.dist.model_state(m, full=True)  # noqa: E731  (gathered on the first process)
        self.backend = make_backend(g.backend, model, self.tokenizer,
                                    resolve_model_path(self.cfg.model.name_or_path, self.cfg.cache_dir), g.batch_size,
                                    vllm_server=g.vllm_server, vllm_sync_dir=g.vllm_sync_dir,
                                    vllm_token_file=g.vllm_token_file, vllm_dtype=g.vllm_dtype,
                                    vllm_memory=g.vllm_gpu_memory_utilization, vllm_kv_cache_gib=g.vllm_kv_cache_gib, max_model_len=self.cfg.data.max_length,
                                    seed=self.cfg.seed, writer=ctx.dist.is_main, barrier=ctx.dist.barrier,
                                    state_fn=state_fn, training=True)
        if self.uses_reference:
            self.reference = LiveReference(model)
        return data.replace()

    def weight(self, rollout: Rollout) -> int:
        """The loss's normaliser for this rollout (the loss is returned as a sum, see
        `losses.online.aggregate_sum`): `online.aggregation`'s over its sequences."""
        if rollout.batch is None:
            return 0
        return rl.aggregation_weight(token_segments(rollout.batch), rollout.batch.num_segments,
                                     self.cfg.online.aggregation)

    # -- sampling and scoring --------------------------------------------------------------------

    def score(self, model, items: list, split: str, params: SamplingParams, seed: int, sync: bool = True):
        """Sample `params.n` completions per prompt; (samples [P][n], rewards [P, n], metrics).
        Each prompt is sampled with its own seed, from `seed` and its example index: the samples do
        not depend on which other prompts share the batch or the process. `sync`: load the policy's
        weights into the sampler first (not again for more prompts at the same weights)."""
        samples, rewards, parts, gen_s = self.sample_and_reward(model, items, split, params, seed, sync)
        return samples, rewards, rollout_metrics(samples, rewards, parts, gen_s)

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
            fresh, pool = pool[:target - len(kept)], pool[target - len(kept):]
            s2, r2, m2 = self.score(model, fresh, "train", self.params, seed + 7919 * rounds, sync=False)
            extra, gen_s = extra + len(fresh), gen_s + float(m2["time/generation_s"])
            ok2 = varied(r2)
            dropped += ok2.count(False)
            kept += [(it, s, r) for it, s, r, k in zip(fresh, s2, r2, ok2) if k]
        metrics.update({"dynamic_sampling/dropped_groups": torch.tensor(float(dropped)),
                        "dynamic_sampling/extra_prompts": torch.tensor(float(extra)),
                        "dynamic_sampling/rounds": torch.tensor(float(rounds)),
                        "dynamic_sampling/filled": torch.tensor(len(kept) / max(target, 1)),
                        "time/generation_s": torch.tensor(gen_s)})
        if not kept:
            return [], [], rewards.new_zeros(0, n)
        return [k[0] for k in kept], [k[1] for k in kept], torch.stack([k[2] for k in kept])

    def sample_and_reward(self, model, items: list, split: str, params: SamplingParams, seed: int, sync: bool = True):
        exs = [self.examples[split][it.index] for it in items]
        start = time.perf_counter()
        if sync:
            self.backend.sync(model)  # the policy changed since the last rollout
        with self.ctx.full_params(*self.sampling_models(model)):  # processes sample different lengths
            if self.episodes is not None:
                samples, rewards = self.episodes.sample(model, exs, [it.index for it in items], params, seed,
                                                        self.cfg.generation.batch_size)
                return samples, rewards, {}, time.perf_counter() - start
            samples = self.backend.sample([it.prompt_ids for it in items], params, seed,
                                          prompt_seeds=[row_seed(seed, it.index) for it in items])
        gen_s = time.perf_counter() - start
        if self.reward is None:
            rewards, parts = torch.zeros(len(samples), params.n), {}
        else:
            rewards, parts = score_groups(self.reward, [list(ex.prompt) for ex in exs],
                                          [[s.text for s in group] for group in samples], prompt_columns(exs))
        buffer = self.cfg.online.overlong_buffer
        if buffer and split == "train":  # training signal only: held-out rewards stay the task's own
            lengths = torch.tensor([[len(s.token_ids) for s in group] for group in samples])
            penalty = rl.overlong_penalty(lengths, self.params.max_new_tokens, buffer).to(rewards.dtype)
            rewards = rewards + penalty
            parts = {**parts, "overlong_penalty": penalty.reshape(-1).tolist()}  # logged as reward/overlong_penalty
        return samples, rewards, parts, gen_s

    def sampling_models(self, model) -> tuple:
        """The sharded modules that run while a rollout is sampled and completed (PPO adds its value model)."""
        return (model,)

    def batches(self, model, items: list, key: int) -> list:
        """[the rollout of micro-batch `key`], sampled once and reused for `iterations` steps."""
        self._used.append(key)
        if key in self._rollouts:
            return [self._rollouts[key]]
        # A new cycle: the rollouts whose `iterations` updates are done are not needed any more.
        self._rollouts = {k: r for k, r in self._rollouts.items() if r.updates < self.iterations}
        seed = self.cfg.seed * 1_000_003 + key  # a resumed run resamples the same completions
        samples, rewards, metrics = self.score(model, items, "train", self.params, seed)
        if self.cfg.online.dynamic_sampling:
            items, samples, rewards = self.refill(model, items, samples, rewards, metrics, seed)
        kept, picks = self.select(samples, rewards, metrics) if items else ([], [])
        out = Rollout(None, metrics=metrics, key=key)
        if kept:
            device = next(model.parameters()).device
            out.groups = [self.group(items[i], [samples[i][k] for k in ks], i) for i, ks in zip(kept, picks)]
            out.batch = collate_packed_groups(out.groups, self.tokenizer.pad_token_id,
                                              self.cfg.train.pack_tokens).to(device)
            # segment of completion k of kept prompt j is k * P' + j (`collate_packed_groups`)
            per_segment = [samples[i][picks[j][k]] for k in range(len(picks[0])) for j, i in enumerate(kept)]
            out.generator_logps = torch.tensor([lp for s in per_segment for lp in s.logprobs], device=device)
            if self.episodes is not None:
                out.turn_returns = torch.tensor([g for s in per_segment for g in token_returns(s.episode, self.cfg.env.gamma)],
                                                device=device)
                if self.ctx.dist.is_main:
                    self.episodes.record(Path(self.cfg.output_dir) / "episodes.jsonl", key, per_segment[0])
            with self.ctx.full_params(*self.sampling_models(model)):
                self.fill(model, out, rewards[kept], picks)
        self._rollouts[key] = out
        return [out]

    def group(self, item, samples: list, index: int) -> TokenizedGroup:
        """The prompt and the samples trained on; an episode brings its own prompt (the environment's
        first messages, tools included) and its mask of model tokens."""
        if samples[0].episode is None:
            return TokenizedGroup(item.prompt_ids, [s.token_ids for s in samples], index)
        prompt = samples[0].episode.prompt_ids
        if any(s.episode.prompt_ids != prompt for s in samples):
            raise ValueError(f"environment {self.cfg.env.name!r} started the episodes of one prompt (example "
                             f"{item.index}) with different messages; `reset(record)` must depend on the record only.")
        return TokenizedGroup(prompt, [s.token_ids for s in samples], index, masks=[s.mask for s in samples])

    def select(self, samples, rewards, metrics) -> tuple[list, list]:
        """(kept prompts' positions, per kept prompt the sample indices to train on)."""
        raise NotImplementedError

    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        """Complete a rollout's per-token tensors (advantages, old log-probs, reference) before training.
        `rewards` [P', n] are the kept prompts' rewards, `picks` the samples trained on."""
        t = self.cfg.train
        if self.iterations > 1:
            with torch.no_grad():
                rollout.old_logps = in_segment_order(segment_logps(model, rollout.batch, t.logprob_chunk_size))[0]
        if self.reference is not None:
            rollout.ref = self.reference.segment(rollout.batch, t.logprob_chunk_size)

    def step_done(self) -> None:
        for key in self._used:
            self._rollouts[key].updates += 1
        self._used = []

    def state_dict(self) -> dict:
        """The rollouts still to be trained on (`iterations` > 1): a run resumed between two updates
        of one rollout must reuse its samples and old log-probs, not sample anew from the updated
        policy."""
        return {"rollouts": {str(k): r.state_dict() for k, r in self._rollouts.items() if r.updates < self.iterations}}

    def load_state_dict(self, state: dict) -> None:
        self._rollouts = {int(k): Rollout.from_state_dict(r) for k, r in state["rollouts"].items()}

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, items: list) -> dict:
        """Held-out reward of each prompt's greedy completion (deterministic, so steps compare), each
        process answering its share of the prompts."""
        mine = self.ctx.shard(items)
        samples, rewards, parts, _ = self.sample_and_reward(model, mine, "eval", self.params.but(temperature=0.0, n=1),
                                                            self.cfg.seed) if mine else ([], torch.zeros(0, 1), {}, 0.0)
        shares = self.ctx.gather_objects((samples, rewards, parts))
        samples = [g for share in shares for g in share[0]]
        rewards = torch.cat([share[1] for share in shares])
        parts = {k: [v for share in shares for v in share[2].get(k, [])] for k in shares[0][2]}
        metrics = rollout_metrics(samples, rewards, parts, 0.0)
        return {k: float(v) for k, v in metrics.items() if not k.startswith("time/")}

    # -- loss helpers ----------------------------------------------------------------------------

    def policy(self, model, rollout: Rollout, batch: TokenBatch | None = None, entropy: bool = True):
        """The policy's SegmentLogps of the rollout's batch (or `batch`), its token log-probs and
        segments in segment order, and the rollout's metrics plus the sampler/trainer mismatch."""
        out = segment_logps(model, batch or rollout.batch, self.cfg.train.logprob_chunk_size, entropy=entropy)
        logps, segs, ent = in_segment_order(out)
        metrics = dict(rollout.metrics)
        if rollout.updates > 0:  # a reused rollout: no sampling happened for this step
            metrics["time/generation_s"] = torch.tensor(0.0)
        elif batch is None:
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
        item = data.train[index]
        if self.episodes is not None:
            ids = self.episodes.prompt_ids(self.examples["train"][index])
            return ("episode prompt (the environment's first messages and tools, what the model continues):\n"
                    + self.tokenizer.decode(ids) + f"\n\n(+ {self.params.n} episodes per step in environment "
                    f"{self.cfg.env.name!r}; `alignkit data show --episode` samples one with the model)")
        return ("prompt (what the model continues):\n" + self.tokenizer.decode(item.prompt_ids)
                + f"\n\ncolumns passed to the reward: {self.examples['train'][index].columns}"
                + f"\n(+ {self.params.n} completions sampled per step, scored by {self.cfg.online.rewards})")
