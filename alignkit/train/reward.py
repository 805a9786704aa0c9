"""The reward-model recipe: a Bradley-Terry model on preference pairs, one or several named rewards.

The model is the causal LM's trunk with a linear head (`AutoModelForSequenceClassification`), read
at each sequence's last non-pad token; the run's `final/` directory loads back in `transformers` as
that sequence classifier. With `train.packing` (the default) each pair is laid out once as
[prompt][chosen][rejected] with several pairs to a row, as for the DPO family, and each reward is
read where transformers' classifier would read it: the last non-pad token of prompt + completion.
Without packing, rows are padded pairs (chosen rows, then rejected rows).
"""

from __future__ import annotations

import torch

from alignkit.config import RunConfig
from alignkit.data.batching import TokenBatch, collate_packed_groups, collate_pairs
from alignkit.data.tokenize import tokenize_pairs
from alignkit.errors import ModelError
from alignkit.logprobs import trunk_inputs
from alignkit.losses.combine import apply_terms, resolve_terms
from alignkit.train.recipes import PreparedData, example_sources, load_examples


def reward_trunk_and_head(model):
    """The classifier's transformer trunk and its `score` head, under peft wrappers too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk, head = getattr(base, base.base_model_prefix, None), getattr(base, "score", None)
    if trunk is None or head is None:
        raise ModelError(f"{type(base).__name__} has no trunk `{base.base_model_prefix}` and `score` head; "
                         "packed reward batches need a standard sequence classifier (or set train.packing=false).")
    return trunk, head


def pooled_positions(batch: TokenBatch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each segment's last non-pad token in its chain prompt + completion: the
    token transformers' classifier pools in a padded row (its predictor chain covers the prompt,
    so a completion made only of pad-id tokens pools the prompt's last token, as there)."""
    seg, pred, ids = batch.segment_ids, batch.predictor_positions(), batch.input_ids
    width = ids.shape[1]
    rows, cols = (seg >= 0).nonzero(as_tuple=True)
    segs = seg[rows, cols]
    src = pred[rows, cols]
    candidates = torch.cat([cols, src])  # each scored token and the token predicting it
    owner = torch.cat([segs, segs])
    rows2 = torch.cat([rows, rows])
    keep = (candidates >= 0) & (ids[rows2, candidates.clamp(min=0)] != pad_id)
    flat = torch.full((batch.num_segments,), -1, dtype=torch.long, device=ids.device)
    flat = flat.scatter_reduce(0, owner[keep], rows2[keep] * width + candidates[keep], reduce="amax")
    if (flat < 0).any():
        raise ValueError("a reward segment has no non-pad token to pool")
    return flat // width, flat % width


def pooled_hidden(model, batch: TokenBatch, pad_id: int) -> torch.Tensor:
    """[S, H] the trunk's final hidden state at each segment's pooled token (any layout)."""
    trunk, _ = reward_trunk_and_head(model)
    hidden = trunk(**trunk_inputs(model, batch)).last_hidden_state
    rows, cols = pooled_positions(batch, pad_id)
    return hidden[rows, cols]


def sequence_rewards(model, batch: TokenBatch, pad_id: int) -> torch.Tensor:
    """[S, K] rewards, one row per segment (chosen rows, then rejected rows)."""
    if not batch.packed:  # transformers' classifier pools each row at its last non-pad token
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    return reward_trunk_and_head(model)[1](pooled_hidden(model, batch, pad_id)).float()


def use_distinct_pad(tokenizer) -> str | None:
    """Make the pad token differ from end-of-sequence, so the classifier's pooling (last non-pad
    token) reads the reward at the end-of-turn token, after the whole reply, rather than one token
    before it. Returns a note for the user, or None when nothing changed."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None or pad != eos:
        return None
    for name in ("unk_token", "bos_token"):
        candidate = getattr(tokenizer, name)
        if candidate is not None and getattr(tokenizer, f"{name}_id") not in (eos, None):
            tokenizer.pad_token = candidate
            return (f"the tokenizer pads with its end-of-turn token {tokenizer.eos_token!r}; the reward model pads "
                    f"with {candidate!r} instead, so its reward is read at the end of each reply")
    return (f"the tokenizer pads with its end-of-turn token {tokenizer.eos_token!r} and has no other special token "
            "to pad with; the reward is read at the token before it")


class RewardRecipe:
    """Bradley-Terry reward model (`recipe: reward`); held-out accuracy at every evaluation."""

    name = "reward"
    data = "reward"
    needs_reference = False

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.terms = resolve_terms(cfg.loss, cfg.losses, data=self.data)
        self.reward_names = list(cfg.reward.objectives)
        self.labels, self.margins = {}, {}  # split -> tensors by example index
        self.pad_note = use_distinct_pad(tokenizer)
        self.features = {}  # split -> [N, 2, H] trunk outputs, when only the head trains

    def prepare(self) -> PreparedData:
        import functools

        from alignkit.data.reward import load_reward_examples

        loader = functools.partial(load_reward_examples, objectives=tuple(self.reward_names),
                                   use_margin=self.cfg.reward.use_margin)
        train, held, notes = load_examples(self.cfg, loader)
        d = self.cfg.data
        out = []
        if self.pad_note:
            notes.append(self.pad_note)
        for split, examples in (("train", train), ("eval", held)):
            items, stats = tokenize_pairs([e.pair for e in examples], self.tokenizer, d.max_length, d.max_prompt_length)
            self.labels[split] = torch.tensor([e.labels for e in examples], dtype=torch.long).reshape(-1, len(self.reward_names))
            self.margins[split] = torch.tensor([e.margin for e in examples], dtype=torch.float32)
            out.append(items)
            if split == "train":
                notes.append(stats.summary(d.max_length))
                if len(self.reward_names) > 1:
                    judged = (self.labels["train"] != 0).sum(0).tolist()
                    notes.append("judged pairs per objective: " + ", ".join(
                        f"{n} {j}/{len(examples)}" for n, j in zip(self.reward_names, judged)))
        return PreparedData(out[0], out[1], notes, sources=example_sources(train, held))

    @property
    def shares_prompts(self) -> bool:
        return self.cfg.train.packing

    def collate(self, items) -> TokenBatch:
        t = self.cfg.train
        if t.packing:
            return collate_packed_groups(items, self.tokenizer.pad_token_id, t.pack_tokens)
        return collate_pairs(items, self.tokenizer.pad_token_id)

    def weight(self, batch: TokenBatch) -> int:
        return batch.num_examples

    def prepare_with_model(self, model, data: PreparedData, fingerprint: dict, progress: bool = True) -> PreparedData:
        """With every block frozen (`model.freeze_layers` = all of them, no LoRA) only the head
        trains: the trunk, its final norm included, is frozen, so each sequence's pooled hidden
        state never changes. Compute it once, and train the head on it: further epochs then cost
        next to nothing (a linear probe, the cheapest reward model there is)."""
        from tqdm.auto import tqdm

        from alignkit.models import is_peft, transformer_blocks

        if is_peft(model) or self.cfg.model.freeze_layers < len(transformer_blocks(model)):
            return PreparedData(data.train, data.eval, [], sources=data.sources)  # notes already shown
        trunk, _ = reward_trunk_and_head(model)
        trunk.requires_grad_(False)
        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        device = next(model.parameters()).device
        for split, items in (("train", data.train), ("eval", data.eval)):
            if not items:
                continue
            feats = None
            for start in tqdm(range(0, len(items), bs), desc=f"trunk outputs ({split})", disable=not progress,
                              unit="batch", dynamic_ncols=True):
                batch = self.collate(items[start: start + bs]).to(device)
                with torch.no_grad():
                    h = pooled_hidden(model, batch, self.tokenizer.pad_token_id).float().cpu()  # [2b, H]
                if feats is None:
                    feats = torch.zeros(max(it.index for it in items) + 1, 2, h.shape[1])
                b = batch.num_examples
                feats[batch.example_ids, 0], feats[batch.example_ids, 1] = h[:b], h[b:]
            self.features[split] = feats
        note = (f"model.freeze_layers={self.cfg.model.freeze_layers} freezes every block: the trunk's outputs were "
                f"computed once ({len(data.train)} train, {len(data.eval)} eval pairs) and only the head trains")
        return PreparedData(data.train, data.eval, [note], sources=data.sources)

    def loss(self, model, batch: TokenBatch, split: str):
        if self.features:  # head only, on the frozen trunk's outputs
            head = reward_trunk_and_head(model)[1]
            f = self.features[split][batch.example_ids].to(next(head.parameters()).device)
            rewards = head(torch.cat([f[:, 0], f[:, 1]])).float()
        else:
            rewards = sequence_rewards(model, batch, self.tokenizer.pad_token_id)  # [2B, K]
        b, device = batch.num_examples, rewards.device
        labels = self.labels[split][batch.example_ids].to(device)
        inputs = {"chosen_rewards": rewards[:b], "rejected_rewards": rewards[b:], "labels": labels,
                  "margins": self.margins[split][batch.example_ids].to(device)}
        per_example, metrics = apply_terms(self.terms, inputs)
        if len(self.reward_names) > 1:
            correct = (labels * (rewards[:b] - rewards[b:]) > 0).float()
            for k, name in enumerate(self.reward_names):
                judged = labels[:, k] != 0
                metrics[f"accuracy/{name}"] = correct[judged, k].detach()
        return per_example.sum(), metrics
