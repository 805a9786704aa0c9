"""`recipe: ppo`: PPO with a learned value model, as in "Secrets of RLHF in Large Language Models
Part I: PPO" (Zheng et al., arXiv 2307.04964, PPO-max).

Per rollout (`fill`): the sequence rewards are normalised by their running statistics and clipped
(`ppo.normalize_rewards`, `ppo.reward_clip`); the per-token KL to the reference (`online.kl_coef`,
`online.kl_estimator`) is subtracted from every token's reward and the sequence reward added on the
last token; the value model scores every completion position; GAE (`ppo.gamma`, `ppo.lam`) gives
per-token advantages and returns; advantages are whitened over the rollout. Then `ppo.epochs`
passes over the rollout, each in `ppo.minibatches` optimizer steps on a seeded share of its
prompts: the clipped policy loss (`loss`, default `ppo_clip`) plus the clipped value loss
(`ppo_value`, `critic.value_clip`), the policy and the value model each with its own AdamW. An
NLL term on SFT data can be mixed into the policy loss (`ppo.ptx_coef`, PPO-ptx of InstructGPT).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from alignkit.data import formats
from alignkit.data.batching import TokenBatch, collate_packed_groups, collate_packed_sft
from alignkit.data.tokenize import tokenize_sft
from alignkit.errors import ConfigError
from alignkit.heads import reward_trunk_and_head, token_values
from alignkit.logprobs import in_segment_order, segment_logps
from alignkit.losses import get as get_loss
from alignkit.losses import ppo as P
from alignkit.losses.combine import resolve_terms
from alignkit.losses.online import aggregate_sum, aggregation_weight
from alignkit.models import apply_lora, disable_dropout, load_model, transformer_blocks
from alignkit.train.base import OptimSettings, SetupContext, Trainable
from alignkit.train.online import MethodBase, OnlineRecipe
from alignkit.train.rollouts import Rollout, policy_gradient, token_segments


class PPO(MethodBase):
    name = "ppo"
    iterations: int  # ppo.epochs * ppo.minibatches (set in __init__)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg)
        p = cfg.ppo
        self.tokenizer = tokenizer
        self.iterations = p.epochs * p.minibatches  # optimizer steps per rollout
        self.uses_reference = cfg.online.kl_coef > 0
        (self.policy_loss,) = resolve_terms(cfg.loss, [], data="rollout")
        self.value_loss = get_loss("ppo_value")
        self.moments = P.RunningMoments()  # every sequence reward seen (PPO-max reward normalisation)
        self.value_model = None  # built in extra_modules
        self._minibatch = None  # ((rollout key, update), (batch, token mask)) of the current update
        self.ptx = []  # tokenized SFT examples for the ptx term

    def prepare(self, data):
        p, d = self.cfg.ppo, self.cfg.data
        if p.ptx_coef > 0:
            loaded = formats.load_sft_examples(p.ptx_data, on_bad_record=d.on_bad_record)
            self.ptx, stats = tokenize_sft(loaded.examples, self.tokenizer, d.max_length, d.max_prompt_length)
            data.notes += [f"ppo.ptx_data: {loaded.summary()}; {stats.summary(d.max_length)}"]
        return data

    def extra_modules(self, model, ctx: SetupContext) -> dict:
        """The value model: the trunk of the policy (or of the reward model `critic.init` names) with
        a scalar head, its own optimizer and schedule."""
        c, t = self.cfg.critic, self.cfg.train
        self.value_model = self.build_value(ctx.device)
        settings = OptimSettings(
            c.learning_rate, c.weight_decay, tuple(t.adam_betas), c.max_grad_norm, t.warmup_ratio, t.lr_schedule
        )
        return {
            "value": Trainable(
                "value",
                self.value_model,
                settings,
                self.tokenizer,
                rebuild=lambda: self.build_value(torch.device("cpu")),
            )
        }

    def build_value(self, device):
        c = self.cfg.critic
        path = self.cfg.model.name_or_path if c.init == "policy" else c.init
        mc = dataclasses.replace(self.cfg.model, name_or_path=path, freeze_layers=c.freeze_layers)
        value = load_model(
            mc,
            device=device,
            cache_dir=self.cfg.cache_dir,
            reward_names=["value"],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if self.cfg.train.disable_dropout:
            disable_dropout(value)
        if c.freeze_layers and c.freeze_layers >= len(transformer_blocks(value)):
            reward_trunk_and_head(value)[0].requires_grad_(
                False
            )  # every block: the final norm too, as for reward models
        if c.lora:
            value = apply_lora(value, self.cfg.lora, self.cfg.model.quantization, c.freeze_layers)
        return value

    def sampling_models(self) -> tuple:
        return (self.value_model,)

    @torch.no_grad()
    def fill(self, model, rollout: Rollout, rewards: torch.Tensor, picks: list) -> None:
        """Per-token advantages, returns and old values of the rollout (PPO-max's order of steps)."""
        o, p, t = self.cfg.online, self.cfg.ppo, self.cfg.train
        batch = rollout.batch
        assert batch is not None and rollout.generator_logps is not None  # sampled: `fill` runs on a full rollout
        device = batch.input_ids.device
        segs, num = token_segments(batch), batch.num_segments
        rollout.old_logps = in_segment_order(
            segment_logps(model, batch, t.logprob_chunk_size, sampling=self.recipe.params)
        )[0]
        diff = (rollout.old_logps - rollout.generator_logps).abs()  # same weights: must agree
        rollout.metrics.update(logprob_mismatch=diff.mean(), logprob_mismatch_max=diff.max())
        kl = torch.zeros_like(rollout.old_logps)
        if self.recipe.reference is not None:
            rollout.ref = self.recipe.reference.segment(batch, t.logprob_chunk_size)
            kl = P.kl_per_token(rollout.old_logps, in_segment_order(rollout.ref)[0], estimator=o.kl_estimator)
        values, value_segs = token_values(self.value_model, batch)
        rollout.old_values = values[torch.argsort(value_segs, stable=True)]
        seq_rewards = rewards.t().reshape(-1).to(device)  # [S]: segment of sample k of prompt j is k * P' + j
        self.moments.update(self.recipe.ctx.gather(seq_rewards))  # every process's rewards: the statistics stay global
        if p.normalize_rewards:
            seq_rewards = P.normalize_rewards(seq_rewards, self.moments.mean, self.moments.std, clip=p.reward_clip)
        elif p.reward_clip > 0:
            seq_rewards = seq_rewards.clamp(-p.reward_clip, p.reward_clip)
        if self.recipe.per_step and rollout.turn_returns is not None:
            # a process reward model's steps: each step's score on its last token, scaled by the
            # running std of the replies' rewards (no shift: a shift per step would depend on their number)
            steps = P.step_rewards_from_returns(rollout.turn_returns.to(kl.dtype), segs, num)
            if p.normalize_rewards:
                steps = steps / max(float(self.moments.std), 1e-8)
            if p.reward_clip > 0:
                steps = steps.clamp(-p.reward_clip, p.reward_clip)
            token_rewards, shaped = P.kl_shaped_rewards(torch.zeros_like(seq_rewards), kl, segs, num, kl_coef=o.kl_coef)
            token_rewards = token_rewards + steps
        else:
            token_rewards, shaped = P.kl_shaped_rewards(seq_rewards, kl, segs, num, kl_coef=o.kl_coef)
        advantages, rollout.returns = P.gae(token_rewards, rollout.old_values, segs, num, gamma=p.gamma, lam=p.lam)
        # whitened over the whole rollout, every process's tokens included
        rollout.advantages = (
            P.whiten(advantages, over=self.recipe.ctx.gather(advantages)) if p.whiten_advantages else advantages
        )
        rollout.metrics.update(
            {
                "kl": kl.mean(),
                "reward_normalized": seq_rewards.mean(),
                "advantages/mean": advantages.mean(),
                "advantages/std": advantages.std(unbiased=False),
                "returns/mean": rollout.returns.mean(),
                "value/mean": rollout.old_values.mean(),
                "value/explained_variance": P.explained_variance(rollout.old_values, rollout.returns),
            }
        )

    def minibatch(self, rollout: Rollout) -> tuple[TokenBatch, torch.Tensor]:
        """The batch of this update's share of the rollout's prompts, and a mask over the rollout's
        tokens (segment order) selecting theirs. Update u is minibatch u mod M of epoch u // M; each
        epoch draws a seeded permutation of the prompts (so a resumed run draws the same)."""
        cached = self._minibatch
        if cached is not None and cached[0] == (rollout.key, rollout.updates):
            return cached[1]
        assert rollout.batch is not None  # PPO trains on every sample: a rollout always has a batch
        m, prompts = self.cfg.ppo.minibatches, len(rollout.groups)
        epoch, part = divmod(rollout.updates, m)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + rollout.key * 7919 + epoch)
        chosen = sorted(torch.randperm(prompts, generator=gen)[part::m].tolist())
        batch = collate_packed_groups(
            [rollout.groups[j] for j in chosen], self.tokenizer.pad_token_id, self.cfg.train.pack_tokens
        ).to(rollout.batch.input_ids.device)
        segs = token_segments(rollout.batch)
        keep = torch.isin(segs % prompts, torch.tensor(chosen, device=segs.device))
        # token order is preserved: segments k * P + j map to k * |J| + rank(j)
        self._minibatch = ((rollout.key, rollout.updates), (batch, keep))
        return batch, keep

    def weight(self, rollout: Rollout) -> int:
        batch, _ = self.minibatch(rollout)
        return aggregation_weight(token_segments(batch), batch.num_segments, self.cfg.online.aggregation)

    def loss(self, model, rollout: Rollout, split: str):
        o, c = self.cfg.online, self.cfg.critic
        batch, keep = self.minibatch(rollout)
        # `fill` set every per-token tensor (or a checkpoint restored them)
        assert rollout.old_logps is not None and rollout.advantages is not None and rollout.generator_logps is not None
        assert rollout.old_values is not None and rollout.returns is not None
        out, logps, segs, metrics = self.recipe.policy(model, rollout, batch=batch)
        pg, pg_metrics = policy_gradient(
            self.policy_loss,
            logps,
            rollout.old_logps[keep],
            rollout.advantages[keep],
            segs,
            batch.num_segments,
            o.aggregation,
            self.cfg.generation.max_new_tokens,
            sampler_logps=rollout.generator_logps[keep],
            tis_cap=o.tis_cap,
            is_mask=(o.is_mask_low, o.is_mask_high),
        )
        values, value_segs = token_values(self.value_model, batch)
        values = values[torch.argsort(value_segs, stable=True)]
        clip = c.value_clip if c.value_clip > 0 else math.inf
        per_token, v_metrics = self.value_loss.fn(
            values, rollout.old_values[keep], rollout.returns[keep], clip_range=clip
        )
        value_loss = aggregate_sum(
            per_token, segs, batch.num_segments, o.aggregation, self.cfg.generation.max_new_tokens
        )
        w = max(1, self.weight(rollout))  # both losses are sums over this minibatch (see `weight`)
        metrics.update(pg_metrics, **v_metrics, value_loss=value_loss.detach() / w, policy_loss=pg.detach() / w)
        loss = pg + value_loss  # disjoint parameters: each optimizer sees only its own module's gradient
        if self.cfg.ppo.ptx_coef > 0:
            nll = self.ptx_nll(model, rollout)
            metrics["ptx_nll"] = nll.detach()
            loss = loss + self.cfg.ppo.ptx_coef * nll * w
        return loss, metrics

    def ptx_nll(self, model, rollout: Rollout) -> torch.Tensor:
        """Token-mean NLL of one batch of `ppo.ptx_data`, chosen by the rollout and update (no state:
        a resumed run takes the same batch)."""
        if not self.ptx:
            raise ConfigError(f"ppo.ptx_data {self.cfg.ppo.ptx_data} holds no usable examples.")
        size = self.cfg.train.batch_size
        start = ((rollout.key * self.iterations + rollout.updates) * size) % len(self.ptx)
        items = [self.ptx[(start + i) % len(self.ptx)] for i in range(size)]
        batch = collate_packed_sft(items, self.tokenizer.pad_token_id, self.cfg.train.pack_tokens)
        assert rollout.batch is not None  # PPO trains on every sample: a rollout always has a batch
        out = segment_logps(model, batch.to(rollout.batch.input_ids.device), self.cfg.train.logprob_chunk_size)
        return -out.logps.sum() / out.counts.sum().clamp(min=1)

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state["moments"])


def build(cfg, tokenizer) -> OnlineRecipe:
    return OnlineRecipe(cfg, tokenizer, PPO(cfg, tokenizer))
