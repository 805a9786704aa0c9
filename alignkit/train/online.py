"""Online recipes: the policy samples while it trains, and learns from rewards of its own samples.

Each micro-batch is a *rollout*: its prompts, `generation.num_samples` completions sampled from the
current policy (`alignkit.generation.decode`: KV cache, each prompt's prefill shared by its
samples), their rewards, and a packed batch laying each prompt out once with its completions
(prefix sharing, as for pairs). The recipes differ only in which completions they train on and
the loss:

- `grpo`: all samples, group-normalised advantages, clipped ratio (GRPO, arXiv 2402.03300; Dr.
  GRPO's unscaled advantages and aggregation, arXiv 2503.20783; DAPO's clip-higher and token-level
  aggregation, arXiv 2503.14476);
- `rloo`: all samples, leave-one-out baseline (arXiv 2402.14740);
- `online_dpo`: the best and the worst sample of each prompt as a pair, any registered pair loss,
  `dpo` by default or `ipo` (online DPO, arXiv 2402.04792; online IPO, arXiv 2403.08635);
- `raft`: the best sample of each prompt, trained on with SFT (RAFT, arXiv 2304.06767); since
  every step samples from the current policy, the ranking and fine-tuning are iterated.

The losses themselves are pure functions in `alignkit.losses.online` and the loss registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import losses
from alignkit.config import RunConfig
from alignkit.data.batching import TokenBatch, collate_packed_groups
from alignkit.data.negative import TokenizedGroup
from alignkit.errors import ConfigError
from alignkit.generation.decode import SamplingParams
from alignkit.logprobs import SegmentLogps, segment_logps
from alignkit.losses import online as rl
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.rewards.functions import score_groups
from alignkit.train.recipes import PreparedData, RunningMean, example_sources, load_examples


def example_columns(examples: list) -> dict:
    """{column: one value per example} over the columns any of the prompt examples has."""
    keys = sorted({k for ex in examples for k in ex.columns})
    return {k: [ex.columns.get(k) for ex in examples] for k in keys}


def make_reward(spec):
    """`online.rewards` -> a reward callable: a reward-model directory, or anything `build_reward` reads."""
    from alignkit.rewards.verifiable import build_reward

    if isinstance(spec, str) and Path(spec).is_dir():
        from alignkit.rewards.model import RewardModel

        return RewardModel(spec)
    return build_reward(spec)


@dataclass
class Rollout:
    """One micro-batch of samples, ready for the loss (already on the model's device)."""

    batch: TokenBatch | None  # packed [prompt][completion 1]..[completion k] groups; None if nothing to train on
    advantages: torch.Tensor | None = None  # [S] per segment (grpo, rloo)
    generator_logps: torch.Tensor | None = None  # [M] the sampler's log-probs, tokens in segment order
    old_logps: torch.Tensor | None = None  # [M] the policy's before this rollout's first update (iterations > 1)
    ref: object = None  # the reference's SegmentLogps of the batch (KL penalty, online DPO)
    metrics: dict = field(default_factory=dict)
    updates: int = 0  # optimizer steps taken on this rollout so far

    def to(self, device) -> "Rollout":
        """Move to `device` in place (the recipe keeps this object to reuse it) and return it."""
        if self.batch is not None and self.batch.input_ids.device != torch.device(device):
            self.batch = self.batch.to(device)
            for name in ("advantages", "generator_logps", "old_logps"):
                value = getattr(self, name)
                setattr(self, name, None if value is None else value.to(device))
            if self.ref is not None:
                self.ref = SegmentLogps(**{k: None if v is None else v.to(device) for k, v in vars(self.ref).items()})
        return self

    def state_dict(self) -> dict:
        """Tensors, numbers and dicts only (a checkpoint loads it with weights_only=True)."""
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        b = self.batch
        return {"batch": None if b is None else {k: cpu(v) if torch.is_tensor(v) else v for k, v in vars(b).items()},
                "advantages": cpu(self.advantages), "generator_logps": cpu(self.generator_logps),
                "old_logps": cpu(self.old_logps),
                "ref": None if self.ref is None else {k: cpu(v) for k, v in vars(self.ref).items()},
                "metrics": {k: cpu(v) for k, v in self.metrics.items()}, "updates": self.updates}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Rollout":
        return cls(batch=None if state["batch"] is None else TokenBatch(**state["batch"]),
                   advantages=state["advantages"], generator_logps=state["generator_logps"],
                   old_logps=state["old_logps"], ref=None if state["ref"] is None else SegmentLogps(**state["ref"]),
                   metrics=dict(state["metrics"]), updates=state["updates"])

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens if self.batch is not None else 0

    @property
    def num_sequence_tokens(self) -> int:
        return self.batch.num_sequence_tokens if self.batch is not None else 0


def in_segment_order(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token log-probs, segments and entropies sorted by segment (stable: completion order within)."""
    order = torch.argsort(out.token_segments, stable=True)
    ent = out.token_entropy[order] if out.token_entropy is not None else None
    return out.token_logps[order], out.token_segments[order], ent


class OnlineRecipe:
    """Shared by the four online recipes: prompts in, rollouts, evaluation by held-out reward."""

    needs_reference = False  # the offline reference machinery does not apply; see `prepare_with_model`
    shares_prompts = True
    uses_reference = False

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        g, o = cfg.generation, cfg.online
        self.iterations = o.iterations
        self.params = SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k, n=g.num_samples,
                                     stop=tuple(g.stop))
        self.reward = make_reward(o.rewards)
        self.examples = {}  # split -> PromptExamples (their columns feed the rewards)
        self.reference = None
        self.backend = None  # set in prepare_with_model, once the model exists
        self._rollouts = {}  # micro-batch key -> Rollout, reused for `online.iterations` optimizer steps

    def prepare(self) -> PreparedData:
        from alignkit.data.prompts import load_prompt_examples, tokenize_prompts

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
            if cut:
                notes.append(f"{split}: {cut} of {len(items)} prompts were longer than {max_prompt} tokens and "
                             "keep their last tokens (raise data.max_length or data.max_prompt_length)")
        notes.append(f"{self.params.n} completions sampled per prompt, up to {g.max_new_tokens} new tokens, "
                     f"temperature {g.temperature}; reward: {getattr(self.reward, 'name', self.reward)}")
        return PreparedData(out[0], out[1], notes, sources=example_sources(train, held))

    def prepare_with_model(self, model, data: PreparedData, fingerprint: dict, progress: bool = True) -> PreparedData:
        from alignkit.generation.backends import make_backend
        from alignkit.models import resolve_model_path

        g = self.cfg.generation
        self.backend = make_backend(g.backend, model, self.tokenizer,
                                    resolve_model_path(self.cfg.model.name_or_path, self.cfg.cache_dir), g.batch_size)
        if self.uses_reference:  # a frozen copy of the initial policy (or LoRA's base, adapters off)
            from alignkit.train.reference import LiveReference

            self.reference = LiveReference(model)
        return PreparedData(data.train, data.eval, [], sources=data.sources)

    def weight(self, batch) -> int:
        return 1  # each loss is already a mean over its rollout

    # -- sampling and scoring --------------------------------------------------------------------

    def _score(self, model, items: list, split: str, params: SamplingParams, seed: int):
        """Sample `params.n` completions per prompt; (samples [P][n], rewards [P, n], metrics)."""
        exs = [self.examples[split][it.index] for it in items]
        start = time.perf_counter()
        self.backend.sync(model)  # the policy changed since the last rollout
        samples = self.backend.sample([it.prompt_ids for it in items], params, seed)
        gen_s = time.perf_counter() - start
        n = params.n
        rewards, parts = score_groups(self.reward, [list(ex.prompt) for ex in exs],
                                      [[s.text for s in group] for group in samples], example_columns(exs))
        lengths = torch.tensor([len(s.token_ids) for group in samples for s in group], dtype=torch.float32)
        stopped = torch.tensor([s.finish_reason == "stop" for group in samples for s in group], dtype=torch.float32)
        metrics = {"reward": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
                   "completion_length": lengths.mean(), "stopped_fraction": stopped.mean(),
                   "time/generation_s": torch.tensor(gen_s)}
        if len(parts) > 1:
            for name, values in parts.items():
                v = torch.tensor(values, dtype=torch.float32)
                metrics[f"reward/{name}"], metrics[f"reward_std/{name}"] = v.mean(), v.std() if v.numel() > 1 else v * 0
        if n > 1:
            metrics["zero_variance_groups"] = torch.tensor(rl.zero_variance_fraction(rewards))
        return samples, rewards, metrics

    def rollout(self, model, items: list, key: int) -> Rollout:
        """The rollout of micro-batch `key`, sampled once and reused for `online.iterations` steps."""
        if key in self._rollouts:
            return self._rollouts[key]
        # A new cycle: the rollouts whose `iterations` updates are done are not needed any more.
        self._rollouts = {k: r for k, r in self._rollouts.items() if r.updates < self.iterations}
        seed = self.cfg.seed * 1_000_003 + key  # a resumed run resamples the same completions
        samples, rewards, metrics = self._score(model, items, "train", self.params, seed)
        kept, picks, advantages = self.select(samples, rewards, metrics)
        groups = [TokenizedGroup(items[i].prompt_ids, [samples[i][k].token_ids for k in ks], i)
                  for i, ks in zip(kept, picks)]
        out = Rollout(None, metrics=metrics)
        if groups:
            device = next(model.parameters()).device
            t = self.cfg.train
            out.batch = collate_packed_groups(groups, self.tokenizer.pad_token_id, t.pack_tokens).to(device)
            # segment of completion k of kept prompt j is k * P' + j (`collate_packed_groups`)
            per_segment = [samples[i][picks[j][k]].logprobs for k in range(len(picks[0])) for j, i in enumerate(kept)]
            out.generator_logps = torch.tensor([lp for seg in per_segment for lp in seg], device=device)
            out.advantages = advantages.to(device) if advantages is not None else None
            if self.iterations > 1:
                with torch.no_grad():
                    out.old_logps = in_segment_order(segment_logps(model, out.batch, t.logprob_chunk_size))[0]
            if self.reference is not None:
                out.ref = self.reference.segment(out.batch, t.logprob_chunk_size)
        self._rollouts[key] = out
        return out

    def state_dict(self) -> dict:
        """The rollouts still to be trained on (`online.iterations` > 1): a run resumed between two
        updates of one rollout must reuse its samples and old log-probs, not sample anew from the
        updated policy."""
        return {"rollouts": {str(k): r.state_dict() for k, r in self._rollouts.items() if r.updates < self.iterations}}

    def load_state_dict(self, state: dict) -> None:
        self._rollouts = {int(k): Rollout.from_state_dict(r) for k, r in state["rollouts"].items()}

    def select(self, samples, rewards, metrics):
        """(kept prompts' positions, per kept prompt the sample indices to train on, per-segment
        advantages or None); each recipe defines it."""
        raise NotImplementedError

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, items: list) -> dict:
        """Held-out reward of each prompt's greedy completion (deterministic, so steps compare)."""
        params = SamplingParams(self.params.max_new_tokens, 0.0, n=1, stop=self.params.stop)
        _, rewards, metrics = self._score(model, items, "eval", params, seed=self.cfg.seed)
        return {k: float(v) for k, v in metrics.items() if not k.startswith("time/")}

    # -- loss helpers ----------------------------------------------------------------------------

    def _policy(self, model, rollout: Rollout, entropy: bool = True):
        out = segment_logps(model, rollout.batch, self.cfg.train.logprob_chunk_size, entropy=entropy)
        logps, segs, ent = in_segment_order(out)
        metrics = dict(rollout.metrics)
        if rollout.updates > 0:  # a reused rollout: no sampling happened for this step
            metrics["time/generation_s"] = torch.tensor(0.0)
        else:
            # Trainer and sampler saw the same weights: their log-probs of the sampled tokens must agree.
            diff = (logps.detach() - rollout.generator_logps).abs()
            metrics["logprob_mismatch"], metrics["logprob_mismatch_max"] = diff.mean(), diff.max()
        if ent is not None:
            metrics["entropy"] = ent.mean()
        return out, logps, segs, metrics

    @staticmethod
    def _empty(metrics: dict):
        return torch.zeros((), requires_grad=True), metrics


class PolicyGradientRecipe(OnlineRecipe):
    """GRPO and RLOO: every sample, weighted by its advantage, through the clipped ratio."""

    name = "grpo"

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.uses_reference = cfg.online.kl_coef > 0

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return rl.group_advantages(rewards, scale_by_std=self.cfg.online.scale_rewards)

    def select(self, samples, rewards, metrics):
        p, n = rewards.shape
        adv = self.advantages(rewards)  # [P, G]; segment of sample k of prompt i is k * P + i
        return list(range(p)), [list(range(n))] * p, adv.t().reshape(-1)

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self._empty(rollout.metrics)
        o = self.cfg.online
        out, logps, segs, metrics = self._policy(model, rollout)
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        ref = in_segment_order(rollout.ref)[0] if rollout.ref is not None else None
        loss, pg = rl.policy_gradient_loss(logps, old, rollout.advantages, segs, rollout.batch.num_segments,
                                           clip_low=o.clip_low, clip_high=o.clip_high, ref_token_logps=ref,
                                           kl_coef=o.kl_coef, aggregation=o.aggregation,
                                           max_completion_length=self.cfg.generation.max_new_tokens)
        if model.training:
            rollout.updates += 1
        return loss, {**metrics, **pg}


class RLOORecipe(PolicyGradientRecipe):
    name = "rloo"

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return rl.rloo_advantages(rewards)


class OnlineDPORecipe(OnlineRecipe):
    """Online DPO / IPO: each prompt's best and worst sample form a pair (prompts whose samples all
    score the same carry no preference and are left out)."""

    name = "online_dpo"
    uses_reference = True

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.terms = resolve_terms(cfg.loss, cfg.losses, data="paired")
        self.reward_shift = RunningMean()  # BCO's delta (loss bco_pair), carried over steps as offline

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.reward_shift.load_state_dict(state["reward_shift"])

    def select(self, samples, rewards, metrics):
        best, worst, valid = rl.best_worst_pairs(rewards)
        kept = valid.nonzero().flatten().tolist()
        metrics["pairs"] = torch.tensor(float(len(kept)))
        return kept, [[int(best[i]), int(worst[i])] for i in kept], None

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self._empty(rollout.metrics)
        out, _, _, metrics = self._policy(model, rollout)
        b = rollout.batch.num_examples
        inputs = {"policy_chosen_logps": out.logps[:b], "policy_rejected_logps": out.logps[b:],
                  "ref_chosen_logps": rollout.ref.logps[:b], "ref_rejected_logps": rollout.ref.logps[b:],
                  "chosen_counts": out.counts[:b], "rejected_counts": out.counts[b:],
                  "reward_shift": torch.tensor(self.reward_shift.value, device=out.logps.device)}
        per_example, pair_metrics = apply_terms(self.terms, inputs)
        if split == "train" and "bco/reward_mean" in pair_metrics:
            self.reward_shift.update(pair_metrics["bco/reward_mean"])
        if model.training:
            rollout.updates += 1
        return per_example.mean(), {**metrics, **{k: v.mean() for k, v in pair_metrics.items()}}


class RAFTRecipe(OnlineRecipe):
    """RAFT: SFT on each prompt's best sample (prompts whose samples all score the same are left
    out: nothing singles one out as better)."""

    name = "raft"

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.spec, self.sft_params = losses.resolve({"name": "sft"})

    def select(self, samples, rewards, metrics):
        best = rl.best_of_k(rewards)
        varied = rewards.max(1).values > rewards.min(1).values
        kept = varied.nonzero().flatten().tolist()
        metrics["kept_fraction"] = torch.tensor(len(kept) / max(1, rewards.shape[0]))
        metrics["reward_of_kept"] = rewards.max(1).values[varied].mean() if kept else torch.tensor(0.0)
        return kept, [[int(best[i])] for i in kept], None

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self._empty(rollout.metrics)
        out, _, _, metrics = self._policy(model, rollout)
        per_example, sft_metrics = self.spec.fn(out.logps, out.counts, **self.sft_params)
        if model.training:
            rollout.updates += 1
        loss = per_example.sum() / out.counts.sum().clamp(min=1)  # token-mean NLL, as SFT
        return loss, {**metrics, **{k: v.float().mean() for k, v in sft_metrics.items()}}


ONLINE = {"grpo": PolicyGradientRecipe, "rloo": RLOORecipe, "online_dpo": OnlineDPORecipe, "raft": RAFTRecipe}
