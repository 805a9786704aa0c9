"""`recipe: distill`: on-policy distillation (GKD, Agarwal et al., "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", arXiv 2306.13649), with advantage-guided
distillation (ADPA, Gao et al., arXiv 2502.17927) as a loss.

Each rollout, the student (the trained model) samples `generation.num_samples` completions per
prompt, as every online recipe does; GKD's on-policy case (its student-data fraction lambda = 1):
the student learns on the sequences it generates, so it is corrected where it actually goes. A
frozen teacher (`teacher.name_or_path`, same tokenizer) reads the same packed batch and gives its
next-token distribution at every completion position. The registered `distill` losses compare
whole distributions there (`reverse_kl`, the default; `generalized_jsd` with `beta`; `adpa`, whose
advantage also needs `teacher.reference`), alone or as a weighted `losses` list, and positions are
averaged per sequence and then over sequences (`online.aggregation`). No reward is needed; given
`online.rewards`, the samples' reward is logged.

With `env.name` the student's samples are multi-turn episodes (`alignkit.train.episodes`): the
teacher reads each whole episode, tool results and template tokens included, and the divergence is
taken at the student's own tokens only (the episode's mask makes the others unscored context), so
the student learns the teacher's turns in the situations its own earlier turns led to. The
environment's rewards are logged, not trained on.

Memory: the LM heads are applied to `train.logprob_chunk_size` positions at a time, and each chunk
is recomputed in the backward pass (activation checkpointing), so the [positions, vocabulary]
log-probabilities of the student, the teacher and the teacher's reference exist for one chunk at a
time, never for the batch. Where the models' output heads differ in size (padded vocabularies),
both distributions are taken over the first V = min(head sizes) >= len(tokenizer) tokens and
renormalised (the padding rows carry no real token).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.checkpoint import checkpoint

from alignkit.config import ModelConfig
from alignkit.data.batching import TokenBatch, collate_packed_groups
from alignkit.data.negative import TokenizedGroup
from alignkit.errors import ConfigError
from alignkit.logprobs import is_model_distribution, sampling_scores, scored_hidden
from alignkit.losses import online as rl
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.models import backbone_and_head, load_model, load_tokenizer
from alignkit.train.online import MethodBase, OnlineRecipe
from alignkit.train.rollouts import Rollout, rollout_metrics

# What the `distill` losses may read (their positional parameters), each [N, V] log-probabilities.
INPUTS = ("student_logps", "teacher_logps", "teacher_ref_logps")
PROBE = "The answer is 1,234.5 - naive cafe? Yes!\nuser: 42 <|im_end|>"


def tokenizer_mismatch(a, b) -> str | None:
    """How tokenizers `a` and `b` differ in a way that changes token ids, or None if they agree."""
    if len(a) != len(b):
        return f"their vocabularies have {len(a)} and {len(b)} tokens"
    ids_a, ids_b = a.encode(PROBE, add_special_tokens=False), b.encode(PROBE, add_special_tokens=False)
    if ids_a != ids_b:
        return f"the probe string {PROBE!r} encodes to {ids_a} and to {ids_b}"
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        token = next(t for t in sorted(set(va) | set(vb)) if va.get(t) != vb.get(t))
        return f"token {token!r} has id {va.get(token)} in one and {vb.get(token)} in the other"
    return None


class Distill(MethodBase):
    name = "distill"

    def __init__(self, cfg, tokenizer):
        if not cfg.teacher.name_or_path:
            raise ConfigError(
                "recipe distill learns from a teacher: set `teacher.name_or_path` to a causal LM with "
                "the student's tokenizer, e.g. "
                "`teacher.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct`."
            )
        super().__init__(cfg)
        self.tokenizer = tokenizer
        # without a reward (or an environment's), the reward metrics are left out (`visible`)
        self.has_reward = cfg.online.rewards is not None or cfg.env.name is not None
        self.terms = resolve_terms(cfg.loss, cfg.losses, data="distill")
        for t in self.terms:
            unknown = [n for n in t.spec.inputs if n not in INPUTS]
            if unknown:
                raise ConfigError(
                    f"loss `{t.spec.name}` needs {', '.join(unknown)}; recipe distill gives its losses "
                    f"{', '.join(INPUTS)} (the losses of kind distill: `alignkit losses`)."
                )
        self.uses_ref = any("teacher_ref_logps" in t.spec.inputs for t in self.terms)
        names = ", ".join(t.spec.name for t in self.terms)
        if self.uses_ref and not cfg.teacher.reference:
            raise ConfigError(
                f"loss {names} reads the teacher's reference model (its advantage is log pi_teacher - "
                "log pi_reference): set `teacher.reference` to the model the teacher was DPO-trained "
                "from."
            )
        if cfg.teacher.reference and not self.uses_ref:
            raise ConfigError(
                f"`teacher.reference` is set, but loss {names} does not read it (only `adpa` does); "
                "remove it, or add {name: adpa} to `losses`."
            )
        self.check_tokenizers()
        self.teacher = self.teacher_ref = None  # loaded in setup
        self.vocab = self.student_head = self.max_id = None  # head and embedding sizes, set in setup

    def check_tokenizers(self) -> None:
        """The teacher (and its reference) must give every token the student's id: it scores the
        student's token ids. Checked before any model loads."""
        student = self.cfg.model.name_or_path
        for key in ("name_or_path", "reference") if self.uses_ref else ("name_or_path",):
            path = getattr(self.cfg.teacher, key)
            other = load_tokenizer(
                ModelConfig(name_or_path=path, trust_remote_code=self.cfg.model.trust_remote_code), self.cfg.cache_dir
            )
            why = tokenizer_mismatch(self.tokenizer, other)
            if why:
                raise ConfigError(
                    f"`teacher.{key}` {path} and the student `model.name_or_path` {student} do not "
                    f"share a tokenizer: {why}. Distillation scores the student's tokens under the "
                    "teacher id for id, so both must tokenize alike (e.g. SmolLM2-135M with SmolLM2-360M "
                    "or -1.7B)."
                )

    # -- models ----------------------------------------------------------------------------------

    def setup(self, model, out, ctx):
        t = self.cfg.teacher
        self.teacher = self.load_frozen(t.name_or_path, ctx.device)
        self.teacher_ref = self.load_frozen(t.reference, ctx.device) if self.uses_ref else None
        frozen = [m for m in (self.teacher, self.teacher_ref) if m is not None]
        sizes = [backbone_and_head(m)[1].weight.shape[0] for m in (model, *frozen)]
        self.vocab, self.student_head = min(sizes), sizes[0]
        if self.vocab < len(self.tokenizer):
            raise ConfigError(
                f"a model's output head has {self.vocab} rows for a tokenizer of {len(self.tokenizer)} "
                f"tokens (heads: student, teacher{', reference' if self.uses_ref else ''}: {sizes})."
            )
        # the smallest input embedding among the frozen models: a sampled id at or past it cannot be read
        self.max_id = min(m.get_input_embeddings().num_embeddings for m in frozen)
        n = sum(p.numel() for p in self.teacher.parameters())
        note = (
            f"teacher {t.name_or_path} ({n / 1e6:.1f}M parameters, {next(self.teacher.parameters()).dtype}) scores "
            f"every sampled position over {self.vocab} tokens; loss: "
            + " + ".join(f"{x.weight:g} x {x.spec.name}" for x in self.terms)
        )
        return out.replace(notes=[note + (f"; advantage against {t.reference}" if self.uses_ref else "")])

    def load_frozen(self, path: str, device):
        mc = dataclasses.replace(
            self.cfg.model,
            name_or_path=path,
            revision=None,
            dtype=self.cfg.teacher.dtype,
            gradient_checkpointing=False,
            freeze_layers=0,
        )
        model = load_model(mc, device=device, for_training=False, cache_dir=self.cfg.cache_dir)
        return model.eval().requires_grad_(False)

    # -- rollouts --------------------------------------------------------------------------------

    def visible(self, metrics: dict) -> dict:
        if self.has_reward:
            return metrics
        return {k: v for k, v in metrics.items() if not k.startswith(("reward", "zero_variance"))}

    def fill(self, model, rollout: Rollout, rewards, picks) -> None:
        """Nothing to precompute: the teacher scores each batch when it is trained on (it is frozen, so
        a reused or resumed rollout gets the same distributions)."""

    # -- the loss --------------------------------------------------------------------------------

    def loss(self, model, rollout: Rollout, split: str):
        if rollout.batch is None:
            return self.recipe.empty(rollout.metrics)
        per_token, segs, token_metrics = self.positions(model, rollout.batch)
        metrics = {**rollout.metrics, **token_metrics}
        sampled = metrics.pop("sampled_logps")
        if rollout.updates > 0:  # a reused rollout: no sampling happened for this step
            metrics["time/generation_s"] = torch.tensor(0.0)
        else:  # trainer and sampler saw the same weights: their log-probs of the sampled tokens must agree
            assert rollout.generator_logps is not None  # `batches` sets it with the batch
            diff = (sampled - rollout.generator_logps.to(sampled.dtype)).abs()
            metrics["logprob_mismatch"], metrics["logprob_mismatch_max"] = diff, diff.max()
        o = self.cfg.online
        loss = rl.aggregate_sum(
            per_token, segs, rollout.batch.num_segments, o.aggregation, self.cfg.generation.max_new_tokens
        )
        return loss, metrics

    def positions(self, model, batch: TokenBatch):
        """Per completion position, in segment order: the loss [M], the segments [M] and metrics {name: [M]}
        (the terms' own, `teacher_kl` = KL(student || teacher), `entropy` and the student's log-prob
        of the sampled token, `sampled_logps`)."""
        h_s, targets, segs, head = scored_hidden(model, batch)
        order = torch.argsort(segs, stable=True)
        h_s, targets, segs = h_s[order], targets[order], segs[order]
        with torch.no_grad():
            if self.max_id < self.student_head:  # the student can sample an id the teacher cannot read
                bad = int(batch.input_ids.max())
                if bad >= self.max_id:
                    raise ConfigError(
                        f"the student sampled token id {bad}, past the teacher's {self.max_id} "
                        "embeddings (its head has rows past the tokenizer's vocabulary)."
                    )
            h_t = scored_hidden(self.teacher, batch)[0][order]
            h_r = scored_hidden(self.teacher_ref, batch)[0][order] if self.teacher_ref is not None else None
        losses: list[torch.Tensor] = []
        metrics: dict[str, list[torch.Tensor]] = {}
        size = self.cfg.train.logprob_chunk_size
        for start in range(0, h_s.shape[0], size):
            part = slice(start, start + size)
            args = (head, h_s[part], h_t[part], None if h_r is None else h_r[part], targets[part])
            if torch.is_grad_enabled() and h_s.requires_grad:
                loss, m = checkpoint(self._chunk, *args, use_reentrant=False)  # recomputed in the backward pass
            else:
                loss, m = self._chunk(*args)
            losses.append(loss)
            for k, v in m.items():
                metrics.setdefault(k, []).append(v)
        if not losses:
            empty = h_s.new_zeros(0, dtype=torch.float32)
            return empty, segs, {"sampled_logps": empty}
        return torch.cat(losses), segs, {k: torch.cat(v) for k, v in metrics.items()}

    def _chunk(self, head, h_s, h_t, h_r, targets):
        """The terms on one chunk of positions: (loss [n], metrics {name: [n]})."""
        v = self.vocab
        student = torch.log_softmax(head(h_s).float()[:, :v], dim=-1)  # [n, V]
        inputs = {"student_logps": student}
        with torch.no_grad():
            inputs["teacher_logps"] = torch.log_softmax(backbone_and_head(self.teacher)[1](h_t).float()[:, :v], -1)
            if h_r is not None:
                inputs["teacher_ref_logps"] = torch.log_softmax(
                    backbone_and_head(self.teacher_ref)[1](h_r).float()[:, :v], -1
                )
        loss, metrics = apply_terms(self.terms, inputs)
        with torch.no_grad():
            s, q = student.detach(), student.detach().exp()
            metrics["teacher_kl"] = (q * (s - inputs["teacher_logps"])).sum(-1)
            metrics["entropy"] = -(q * s).sum(-1)
            if is_model_distribution(self.recipe.params):
                metrics["sampled_logps"] = s.gather(-1, targets[:, None]).squeeze(-1)
            else:  # the sampler recorded the log-probs of the distribution it drew from (top-k, top-p, ...)
                x = sampling_scores(s, self.recipe.params, keep=targets)  # shift-invariant: log-probs in, as logits
                metrics["sampled_logps"] = x.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(x, -1)
        return loss, metrics

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, items: list) -> dict:
        """On each held-out prompt's greedy reply (deterministic, so steps compare): the loss (the
        run's aggregation), and token means of `teacher_kl`, `entropy` and the terms' metrics; the
        reward too when `online.rewards` is given. Each process answers its share of the prompts."""
        recipe = self.recipe
        mine = recipe.ctx.shard(items)
        samples, rewards, parts, sums = [], torch.zeros(0, 1), {}, {}
        if mine:
            greedy = recipe.params.but(temperature=0.0, n=1)
            samples, rewards, parts, _ = recipe.sample_and_reward(model, mine, "eval", greedy, self.cfg.seed)
            groups = [
                TokenizedGroup(it.prompt_ids, [g[0].token_ids], j) for j, (it, g) in enumerate(zip(mine, samples))
            ]
            batch = collate_packed_groups(groups, self.tokenizer.pad_token_id, self.cfg.train.pack_tokens)
            batch = batch.to(next(model.parameters()).device)
            with recipe.ctx.full_params(model):
                per_token, segs, metrics = self.positions(model, batch)
            agg, n = self.cfg.online.aggregation, batch.num_segments
            metrics.pop("sampled_logps")
            sums = {
                "loss": float(rl.aggregate_sum(per_token, segs, n, agg, self.cfg.generation.max_new_tokens)),
                "loss_weight": float(rl.aggregation_weight(segs, n, agg)),
                "tokens": float(per_token.numel()),
                **{k: float(v.double().sum()) for k, v in metrics.items()},
            }
        shares = recipe.ctx.gather_shares((samples, rewards, parts, sums))
        samples = [g for share in shares for g in share[0]]
        rewards = torch.cat([share[1] for share in shares])
        parts = {k: [v for share in shares for v in share[2].get(k, [])] for k in {k for s in shares for k in s[2]}}
        total = {k: sum(share[3].get(k, 0.0) for share in shares) for k in {k for s in shares for k in s[3]}}
        out = {
            k: float(v)
            for k, v in rollout_metrics(samples, rewards, parts, 0.0).items()
            if not k.startswith("time/") and (self.has_reward or not k.startswith(("reward", "zero_variance")))
        }
        tokens = max(total.pop("tokens", 0.0), 1.0)
        out["loss"] = total.pop("loss", 0.0) / max(total.pop("loss_weight", 0.0), 1.0)
        out.update({k: v / tokens for k, v in total.items()})
        return out

    def show_example(self, data, index: int) -> str:
        item = data.train[index]
        return (
            "prompt (what the student continues):\n"
            + self.tokenizer.decode(item.prompt_ids)
            + f"\n\n(+ {self.recipe.params.n} completions sampled per step from the student; the teacher "
            f"{self.cfg.teacher.name_or_path} scores every completion position with its next-token distribution)"
        )


def build(cfg, tokenizer) -> OnlineRecipe:
    return OnlineRecipe(cfg, tokenizer, Distill(cfg, tokenizer))
