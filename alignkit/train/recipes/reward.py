"""`recipe: reward`: a Bradley-Terry reward model on preference pairs, one or several named rewards.

The model is the causal LM's trunk with a linear head (`AutoModelForSequenceClassification`), read
at each sequence's last non-pad token; the run's `final/` directory loads back in `transformers` as
that sequence classifier. With `train.packing` (the default) each pair is laid out once as
[prompt][chosen][rejected] with several pairs to a row, as for the DPO family, and each reward is
read where transformers' classifier would read it (`alignkit.heads.pooled_positions`). Without
packing, rows are padded pairs (chosen rows, then rejected rows).
"""

from __future__ import annotations

import functools
import math

import torch
from tqdm.auto import tqdm

from alignkit import logprob_passes as passes
from alignkit.data.batching import TokenBatch, collate_packed_groups, collate_pairs
from alignkit.data.reward import load_reward_examples
from alignkit.data.splits import PreparedData, example_sources, load_examples
from alignkit.data.tokenize import explain, tokenize_pairs
from alignkit.errors import ConfigError
from alignkit.heads import pooled_hidden, reward_trunk_and_head, sequence_rewards, use_distinct_pad
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.losses.reward import odin_terms
from alignkit.models import is_peft, transformer_blocks
from alignkit.train.base import OfflineRecipe, SetupContext

# ODIN's correlations from fewer replies than this get a note: a Pearson correlation's sampling
# noise is about 1/sqrt(n - 1), 0.13 at 64, against the 0.15 a quality head is meant to stay under.
SMALL_CORRELATION_SAMPLE = 64


class RewardRecipe(OfflineRecipe):
    """Bradley-Terry reward model (`recipe: reward`); held-out accuracy at every evaluation."""

    name = "reward"
    data = "reward"
    pack, pad = collate_packed_groups, collate_pairs

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.terms = resolve_terms(cfg.loss, cfg.losses, data=self.data)
        self.reward_names = list(cfg.reward.objectives)
        self.odin = cfg.reward.disentangle == "length"  # two heads: quality and length (ODIN)
        self.length_sign = None  # ODIN: +1 or -1, from the training pairs (`_choose_length_sign`)
        self.squared = False  # ODIN: the quality head's correlation penalised squared (set in `setup`)
        self.labels, self.margins, self.lengths, self.probs = {}, {}, {}, {}  # split -> tensors by example index
        self.steps_done, self.total_steps = 0, 1  # the share of training done (`progress`, w2s_confidence)
        reads = {n for t in self.terms for n in t.spec.inputs}
        if "probs" in reads and len(self.reward_names) > 1:
            raise ConfigError(
                "soft-label losses (soft_bradley_terry, w2s_confidence) train one reward: "
                "keep one name in reward.objectives"
            )
        self.reads_probs = "probs" in reads
        self.pad_note = use_distinct_pad(tokenizer)
        self.features = {}  # split -> [N, 2, H] trunk outputs, when only the head trains
        self.every_reply = {}  # split -> ([2N, H] trunk outputs, [2N] lengths): ODIN's correlations, head only

    def prepare(self) -> PreparedData:
        loader = functools.partial(
            load_reward_examples, objectives=tuple(self.reward_names), use_margin=self.cfg.reward.use_margin
        )
        train, held, notes = load_examples(self.cfg.data, self.cfg.seed, loader)
        d = self.cfg.data
        out = []
        if self.pad_note:
            notes.append(self.pad_note)
        for split, examples in (("train", train), ("eval", held)):
            items, stats = tokenize_pairs([e.pair for e in examples], self.tokenizer, d.max_length, d.max_prompt_length)
            self.labels[split] = torch.tensor([e.labels for e in examples], dtype=torch.long).reshape(
                -1, len(self.reward_names)
            )
            self.margins[split] = torch.tensor([e.margin for e in examples], dtype=torch.float32)
            self.probs[split] = torch.tensor(
                [e.prob if e.prob is not None else (e.labels[0] + 1) / 2 for e in examples], dtype=torch.float32
            )
            soft = sum(e.prob is not None for e in examples)
            if soft and not self.reads_probs:
                raise ConfigError(
                    f"{soft} {split} records carry `prob` (a soft label), which loss "
                    f"{', '.join(t.spec.name for t in self.terms)} does not read: use loss.name=soft_bradley_terry "
                    "(or w2s_confidence), or drop `prob` from the data."
                )
            lengths = torch.zeros(max((it.index for it in items), default=-1) + 1, 2)
            for it in items:  # what ODIN's heads are correlated with: the replies' lengths in tokens, before
                # data.max_length cut them (the model is used on whole replies, and `alignkit eval` measures
                # a reward's length bias against them; a cut length puts every long reply at the cap)
                lengths[it.index] = torch.tensor(it.reply_lengths, dtype=torch.float32)
            self.lengths[split] = lengths
            out.append(items)
            if split == "train":
                notes.append(stats.summary(d.max_length))
                if self.odin:
                    notes.append(self._choose_length_sign())
                if len(self.reward_names) > 1:
                    judged = (self.labels["train"] != 0).sum(0).tolist()
                    notes.append(
                        "judged pairs per objective: "
                        + ", ".join(f"{n} {j}/{len(examples)}" for n, j in zip(self.reward_names, judged))
                    )
        return PreparedData(out[0], out[1], notes, sources=example_sources(train, held))

    def setup(self, model, data: PreparedData, ctx: SetupContext) -> PreparedData:
        """With every block frozen (`model.freeze_layers` = all of them, no LoRA) only the head
        trains: the trunk, its final norm included, is frozen, so each sequence's pooled hidden
        state never changes. Compute it once, and train the head on it: further epochs then cost
        next to nothing (a linear probe, the cheapest reward model there is)."""
        self._ctx = ctx
        if self.odin:  # saved with the model: a reward read from it is the quality head alone
            base = model.get_base_model() if is_peft(model) else model
            base.config.alignkit_disentangle = "length"
        head_only = not is_peft(model) and self.cfg.model.freeze_layers >= len(transformer_blocks(model))
        # `auto` squares the exact correlations of a head trained alone (`losses.reward.odin_terms` says why)
        penalty = self.cfg.reward.correlation_penalty
        self.squared = penalty == "squared" or (penalty == "auto" and head_only)
        odin_note = self._correlation_note(head_only, len(data.train)) if self.odin else None
        if not head_only:
            return data.replace(notes=[odin_note] if odin_note else [])
        reward_trunk_and_head(model)[0].requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        for split, items in (("train", data.train), ("eval", data.eval)):
            if not items:
                continue
            # the initial model's frozen trunk on these tokens: the same in any run on them (a
            # sweep over head settings, ODIN's coefficients, computes them once)
            layout = f"pooled trunk outputs, fp32, pad {pad}, packing {self.cfg.train.packing}"
            key = passes.cache_key(ctx.fingerprint, items, layout)
            self.features[split] = passes.disk_cached(
                ctx.cache_root / "trunk_outputs" / f"{key}.safetensors",
                max(it.index for it in items) + 1,
                functools.partial(self._trunk_outputs, model, items, split, ctx),
                f"trunk outputs ({split})",
                ctx,
            )
            if self.odin:  # every reply of the split (chosen ones, then rejected), for the correlations
                rows = torch.tensor([it.index for it in items])
                feats, lengths = self.features[split][rows], self.lengths[split][rows]
                self.every_reply[split] = (
                    torch.cat([feats[:, 0], feats[:, 1]]),
                    torch.cat([lengths[:, 0], lengths[:, 1]]),
                )
        self.shard_model = False  # only the head trains, on these features: nothing to shard
        note = (
            f"model.freeze_layers={self.cfg.model.freeze_layers} freezes every block: the trunk's outputs were "
            f"computed once ({len(data.train)} train, {len(data.eval)} eval pairs, cached under "
            f"{ctx.cache_root / 'trunk_outputs'}) and only the head trains"
        )
        return data.replace(notes=[note] + ([odin_note] if odin_note else []))

    @torch.no_grad()
    def _trunk_outputs(self, model, items: list, split: str, ctx: SetupContext) -> torch.Tensor:
        """[N, 2, H] each pair's pooled final hidden states (chosen, rejected), every process
        computing its share of the batches."""
        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        device = next(model.parameters()).device
        feats = torch.zeros(max(it.index for it in items) + 1, 2, reward_trunk_and_head(model)[1].in_features)
        starts = ctx.shard(list(range(0, len(items), bs)))
        for start in tqdm(
            starts, desc=f"trunk outputs ({split})", disable=not ctx.progress, unit="batch", dynamic_ncols=True
        ):
            batch = self.collate(items[start : start + bs]).to(device)
            h = pooled_hidden(model, batch, self.tokenizer.pad_token_id).float().cpu()  # [2b, H]
            b = batch.num_examples
            feats[batch.example_ids, 0], feats[batch.example_ids, 1] = h[:b], h[b:]
        return ctx.all_sum(feats)  # the shares fill disjoint rows

    def loss(self, model, batch: TokenBatch, split: str):
        if self.features:  # head only, on the frozen trunk's outputs
            head = reward_trunk_and_head(model)[1]
            f = self.features[split][batch.example_ids].to(next(head.parameters()).device)
            rewards = head(torch.cat([f[:, 0], f[:, 1]])).float()
        else:
            rewards = sequence_rewards(model, batch, self.tokenizer.pad_token_id)  # [2B, K]
        b, device = batch.num_examples, rewards.device
        labels = self.labels[split][batch.example_ids].to(device)
        heads = rewards
        if self.odin:  # the preferences are fitted by the sum of the quality and length heads
            rewards = heads.sum(dim=1, keepdim=True)
        inputs = {
            "chosen_rewards": rewards[:b],
            "rejected_rewards": rewards[b:],
            "labels": labels,
            "margins": self.margins[split][batch.example_ids].to(device),
            "probs": self.probs[split][batch.example_ids].to(device),
            "progress": self.steps_done / self.total_steps if split == "train" else 1.0,
        }
        per_example, metrics = apply_terms(self.terms, inputs)
        if self.odin:
            term, odin_metrics = self._disentangle(model, heads, batch, split, labels)
            metrics.update(odin_metrics)
            return per_example.sum() + term * b, metrics  # the batch term counts once per example
        if len(self.reward_names) > 1:
            correct = (labels * (rewards[:b] - rewards[b:]) > 0).float()
            for k, name in enumerate(self.reward_names):
                judged = labels[:, k] != 0
                metrics[f"accuracy/{name}"] = correct[judged, k].detach()
        return per_example.sum(), metrics

    def _choose_length_sign(self) -> str:
        """ODIN's sign for the length head (`reward.length_sign`): `auto` takes the one the training
        pairs show, +1 when the preferred reply is the longer in at least half the pairs whose
        lengths differ. Returns the note that says which and why."""
        lengths, labels = self.lengths["train"], self.labels["train"][:, 0]
        longer = labels * torch.sign(lengths[:, 0] - lengths[:, 1])  # +1: the preferred reply is longer
        n_longer, n_differ = int((longer > 0).sum()), int((longer != 0).sum())
        setting = self.cfg.reward.length_sign
        if setting == "auto":
            self.length_sign = 1.0 if 2 * n_longer >= n_differ else -1.0
        else:
            self.length_sign = 1.0 if setting == "positive" else -1.0
        direction = "with" if self.length_sign > 0 else "against"
        return (
            f"reward.disentangle=length: the preferred reply is the longer in {n_longer} of the {n_differ} training "
            f"pairs whose lengths differ; the length head is pushed to correlate {direction} length "
            f"(reward.length_sign={setting})"
        )

    def _correlation_note(self, head_only: bool, n_train: int) -> str | None:
        """Where ODIN's correlations come from: every training reply when only the head trains, a
        micro-batch's replies otherwise (then a note when they are too few to estimate them); and,
        for the head alone, how the quality head's correlation is penalised."""
        if head_only:
            return (
                f"reward.disentangle=length: only the head trains, so ODIN's correlations are taken over all "
                f"{2 * n_train} training replies at every step (their trunk outputs are cached), not a micro-batch's; "
                f"the quality head's is penalised {'squared' if self.squared else 'absolute'} "
                f"(reward.correlation_penalty={self.cfg.reward.correlation_penalty})"
            )
        shares = self.ctx.dist.data_size  # the processes' micro-batches are gathered (`_disentangle`)
        n = 2 * self.cfg.train.batch_size * shares
        if n >= SMALL_CORRELATION_SAMPLE:
            return None
        where = f"2 x train.batch_size x {shares} processes" if shares > 1 else "2 x train.batch_size"
        return (
            f"reward.disentangle=length estimates each correlation over a micro-batch's {n} replies "
            f"({where}), whose sampling noise is about {1 / math.sqrt(n - 1):.2f}: the "
            "|correlation| term then mostly fights noise. Raise train.batch_size x processes to "
            f"{SMALL_CORRELATION_SAMPLE // 2} pairs or more (the authors' code gathers 256 replies), "
            "or train the head alone (every block frozen), where the correlations are taken over the whole "
            "training set."
        )

    def _disentangle(self, model, heads: torch.Tensor, batch: TokenBatch, split: str, labels: torch.Tensor):
        """ODIN's terms for this batch (`losses.reward.odin_terms`) and the quality head's accuracy.

        The correlations are sample estimates; over a micro-batch of 8 pairs (16 replies) their
        noise (about 0.26) is more than the 0.15 a quality head should stay under. When only the
        head trains the trunk outputs are cached, so the terms are taken over every reply of the
        split at each step: the exact correlations, for one small matmul (on HH-RLHF: gap 0.005 and
        r 0.016 against 0.089 and 0.059 from micro-batches, docs/benchmarks.md). Otherwise, with
        several processes, over the replies of every process's micro-batch, as the authors' code
        gathers them across devices: each process holds all of them (its own differentiable) and
        computes the same terms. The loss counts the terms once per example of this process's
        batch (b), and the loop adds the processes' gradients, so the gradient reaching this
        process's replies is scaled by B / b (B: the replies of every process): the correlations'
        gradient then counts once per example of the whole micro-batch, as in one process holding
        it, and the orthogonality term's, computed alike everywhere, once per example too. Two
        processes train what one process with both micro-batches trains (tests/test_distributed.py)."""
        b, ids = batch.num_examples, batch.example_ids
        head = reward_trunk_and_head(model)[1]
        weight = head.weight  # [2, H]: the quality and the length head
        if hasattr(weight, "full_tensor"):  # sharded by FSDP2: the whole (differentiable) matrix
            weight = weight.full_tensor()
        dist = self.ctx.dist
        if split in self.every_reply:  # head only: every reply of the split
            feats, lengths = self.every_reply[split]
            corr_heads = head(feats.to(weight.device)).float()
        else:
            lengths = torch.cat([self.lengths[split][ids, 0], self.lengths[split][ids, 1]])
            corr_heads = heads
            if split == "train" and dist.enabled:  # evaluation's batch counts may differ between processes
                corr_heads, lengths = dist.gather_rows(heads), dist.gather(lengths)
                k = corr_heads.shape[0] / heads.shape[0]
                corr_heads = corr_heads + (k - 1) * (corr_heads - corr_heads.detach())  # same values, gradient x k
        rw = self.cfg.reward
        term, metrics = odin_terms(
            corr_heads[:, 0],
            corr_heads[:, 1],
            lengths.to(heads.device),
            weight[0],
            weight[1],
            length_coef=rw.length_coef,
            orthogonal_coef=rw.orthogonal_coef,
            length_sign=self.length_sign,
            squared=self.squared,
        )
        quality = heads[:, 0]
        metrics["accuracy/quality"] = (labels[:, 0] * (quality[:b] - quality[b:]) > 0).float().detach()
        return term, metrics

    def schedule(self, items_of, keys: int) -> None:
        self.total_steps = max(1, keys // self.cfg.train.grad_accum)  # keys: micro-batches of the whole run

    def step_done(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state.get("steps_done", 0))

    def show_example(self, data: PreparedData, index: int) -> str:
        """Chosen and rejected, each with the one token its reward is read at."""
        item, pad, parts = data.train[index], self.tokenizer.pad_token_id, []
        for name, ids in (("chosen", item.chosen_ids), ("rejected", item.rejected_ids)):
            last = max((j for j, t in enumerate(ids) if t != pad), default=None)
            parts.append(
                explain(
                    self.tokenizer,
                    item.prompt_ids,
                    ids,
                    label=name,
                    scored=[j == last for j in range(len(ids))],
                    why="the reward is read at the last non-pad token"
                    if last is not None
                    else "all pad tokens: the reward is read at the prompt's last token",
                )
            )
        return "\n\n".join(parts)
