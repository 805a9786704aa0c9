"""Token ids -> tensors with a per-token segment map, padded or packed.

Every scored token carries the index of the output slot ("segment") its log-prob is summed into;
unscored tokens (prompt, padding) carry -1. `pred_index` names, per token, the position whose
hidden state predicts it (t - 1 in a plain row). The log-prob code reads only these two maps, so
every layout below shares it.

Padded pair layout: rows 0..B-1 hold prompt+chosen, rows B..2B-1 prompt+rejected; segment i is
pair i's chosen completion and segment B+i its rejected one.

Packed layout (`pack_groups`): each example is laid out once as [prompt][completion 1][completion
2]..., every completion continuing the prompt's positions, with an attention mask that lets a
completion see the prompt and itself but not its sibling completions (prefix sharing, arXiv
2410.20305); several examples share a row, each attending only to itself (packing), so no compute
goes to padding or to a second copy of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.vision import collate_vision


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor  # [R, T] long, 1 for real tokens
    segment_ids: torch.Tensor  # [R, T] long, -1 where not scored
    num_segments: int
    example_ids: torch.Tensor  # [E] long: data-set indices of the examples in this batch
    pred_index: torch.Tensor | None = None  # [R, T] long: position predicting each token (None: t - 1)
    position_ids: torch.Tensor | None = None  # [R, T] long, packed layouts only
    allowed: torch.Tensor | None = None  # [R, T, T] bool: query may attend key (packed layouts only)
    shared_tokens: int = 0  # prompt tokens a packed layout did not repeat (what a plain layout would add)
    # the model's pixel inputs (vision-language models), their images in the order their tokens
    # occur in the rows (row-major), which is the order the model fills image tokens in
    vision: dict | None = None

    @property
    def num_examples(self) -> int:
        return int(self.example_ids.numel())

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens processed (what tokens/s counts)."""
        return int(self.attention_mask.sum())

    @property
    def num_sequence_tokens(self) -> int:
        """Tokens of the sequences as written out one by one (each prompt once per completion): the
        count throughput is reported in, whatever the layout, so layouts compare fairly."""
        return self.num_tokens + self.shared_tokens

    @property
    def num_scored(self) -> int:
        return int((self.segment_ids >= 0).sum())

    @property
    def packed(self) -> bool:
        return self.allowed is not None

    def to(self, device) -> "TokenBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TokenBatch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.segment_ids),
            self.num_segments,
            self.example_ids,
            move(self.pred_index),
            move(self.position_ids),
            move(self.allowed),
            self.shared_tokens,
            None if self.vision is None else {k: v.to(device, non_blocking=True) for k, v in self.vision.items()},
        )

    def predictor_positions(self) -> torch.Tensor:
        """[R, T] position whose hidden state predicts each token (-1 for a row's first token)."""
        if self.pred_index is not None:
            return self.pred_index
        t = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (t - 1).expand_as(self.input_ids)


def _pad_rows(rows: list, pad_id: int) -> TokenBatch:
    """rows: list of (token ids, number of leading unscored tokens, segment id[, completion mask])."""
    width = max(len(row[0]) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), -1, dtype=torch.long)
    for r, (ids, n_unscored, seg, *mask) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[r, : len(ids)] = 1
        segments[r, max(n_unscored, 1) : len(ids)] = seg  # token 0 has no predictor
        if mask and mask[0] is not None:  # only the masked completion tokens are scored
            keep = torch.tensor(mask[0], dtype=torch.bool)
            segments[r, n_unscored : len(ids)][~keep] = -1
            segments[r, 0] = -1
    return input_ids, attention, segments


def collate_pairs(pairs: list, pad_id: int) -> TokenBatch:
    """TokenizedPairs -> a padded batch (chosen rows, then rejected rows)."""
    b = len(pairs)
    rows = [(p.prompt_ids + p.chosen_ids, len(p.prompt_ids), i, p.chosen_mask) for i, p in enumerate(pairs)]
    rows += [(p.prompt_ids + p.rejected_ids, len(p.prompt_ids), b + i, p.rejected_mask) for i, p in enumerate(pairs)]
    ids, att, seg = _pad_rows(rows, pad_id)
    vision = collate_vision([p.vision for p in pairs] * 2)
    return TokenBatch(ids, att, seg, 2 * b, torch.tensor([p.index for p in pairs], dtype=torch.long), vision=vision)


def collate_sft(items: list, pad_id: int) -> TokenBatch:
    """TokenizedSFTs -> a padded batch, one row and one segment per example."""
    rows = [(it.prompt_ids + it.completion_ids, len(it.prompt_ids), i) for i, it in enumerate(items)]
    ids, att, seg = _pad_rows(rows, pad_id)
    index = torch.tensor([it.index for it in items], dtype=torch.long)
    return TokenBatch(
        ids, att, seg, len(items), index, vision=collate_vision([getattr(it, "vision", None) for it in items])
    )


def collate_groups(groups: list, pad_id: int) -> TokenBatch:
    """TokenizedGroups of S completions each -> rows s*B + i (completion s of group i), one
    segment per row, so per-segment log-probs reshape to [S, B]."""
    b, s = len(groups), len(groups[0].completions)
    if any(len(g.completions) != s for g in groups):
        raise ValueError("every group in a batch needs the same number of completions")
    rows = [
        (g.prompt_ids + g.completions[k], len(g.prompt_ids), k * b + i) for k in range(s) for i, g in enumerate(groups)
    ]
    ids, att, seg = _pad_rows(rows, pad_id)
    vision = collate_vision([getattr(g, "vision", None) for g in groups] * s)
    return TokenBatch(ids, att, seg, s * b, torch.tensor([g.index for g in groups], dtype=torch.long), vision=vision)


def completions_of(item) -> list:
    """The completion token lists of a tokenized example (SFT, pair or group)."""
    if hasattr(item, "completions"):
        return item.completions
    if hasattr(item, "chosen_ids"):
        return [item.chosen_ids, item.rejected_ids]
    return [item.completion_ids]


def cut_by_budget(seq: list, sizes: list, budget: int) -> list:
    """Consecutive runs of `seq` whose sizes add up to at most `budget` (an element over it alone)."""
    runs, current, used = [], [], 0
    for x, n in zip(seq, sizes):
        if current and used + n > budget:
            runs.append(current)
            current, used = [], 0
        current.append(x)
        used += n
    return runs + [current] if current else runs


def example_tokens(item, shared_prompt: bool) -> int:
    """Non-pad tokens an example adds to a batch: its prompt once in a prefix-shared layout, once
    per completion in a padded one (what `train.max_tokens_per_batch` budgets)."""
    comps = completions_of(item)
    return len(item.prompt_ids) * (1 if shared_prompt else len(comps)) + sum(len(c) for c in comps)


def group_rows(prompt: list, completions: list, segments: list, masks: list | None = None) -> dict:
    """One example as [prompt][completion 1][completion 2]...: token ids, positions, branch ids
    (0 prompt, k for completion k), segments and predictor offsets, all relative to the example."""
    masks = masks or [None] * len(completions)
    ids, pos, branch, seg, pred = list(prompt), list(range(len(prompt))), [0] * len(prompt), [-1] * len(prompt), []
    pred += [i - 1 for i in range(len(prompt))]
    for k, (comp, s, m) in enumerate(zip(completions, segments, masks), start=1):
        start = len(ids)
        for j, tok in enumerate(comp):
            ids.append(tok)
            pos.append(len(prompt) + j)
            branch.append(k)
            # The first completion token is predicted by the prompt's last token, for every branch.
            pred.append((len(prompt) - 1) if j == 0 else start + j - 1)
            scored = (m is None or m[j]) and pred[-1] >= 0
            seg.append(s if scored else -1)
    return {"ids": ids, "pos": pos, "branch": branch, "seg": seg, "pred": pred}


def pack_groups(groups: list, pad_id: int, capacity: int) -> tuple:
    """Lay examples (from `group_rows`) into rows of at most `capacity` tokens, first-fit by
    decreasing length; returns (input_ids, attention_mask, segment_ids, pred_index, position_ids,
    allowed, order) with allowed[r, q, k] true when token q may attend token k, and `order` the
    examples' indices in the order they occur in the rows (row-major)."""
    capacity = max(capacity, max(len(g["ids"]) for g in groups))
    rows, used = [], []
    for gi in sorted(range(len(groups)), key=lambda i: -len(groups[i]["ids"])):
        n = len(groups[gi]["ids"])
        for r, u in enumerate(used):
            if u + n <= capacity:
                rows[r].append(gi)
                used[r] += n
                break
        else:
            rows.append([gi])
            used.append(n)
    width = max(used)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    att = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, -1, dtype=torch.long)
    pred = torch.full(shape, -1, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    doc = torch.full(shape, -1, dtype=torch.long)  # which example a token belongs to (-1: padding)
    branch = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        offset = 0
        for gi in members:
            g = groups[gi]
            n = len(g["ids"])
            sl = slice(offset, offset + n)
            ids[r, sl] = torch.tensor(g["ids"])
            att[r, sl] = 1
            seg[r, sl] = torch.tensor(g["seg"])
            pred[r, sl] = torch.tensor([p + offset if p >= 0 else -1 for p in g["pred"]])
            pos[r, sl] = torch.tensor(g["pos"])
            doc[r, sl] = gi
            branch[r, sl] = torch.tensor(g["branch"])
            offset += n
    q, k = doc[:, :, None], doc[:, None, :]
    bq, bk = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (q == k) & (q >= 0) & causal & ((bk == 0) | (bk == bq))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
    return ids, att, seg, pred, pos, allowed, [gi for members in rows for gi in members]


def collate_packed_groups(items: list, pad_id: int, capacity: int) -> TokenBatch:
    """Items with `prompt_ids` and several completions -> one packed, prefix-shared batch. Pair
    items give [prompt][chosen][rejected] with segments i and B + i, as in `collate_pairs`; group
    items (D2O) give completion k of example i segment k * B + i, as in `collate_groups`."""
    b = len(items)
    groups = []
    for i, it in enumerate(items):
        comps = completions_of(it)
        masks = [it.chosen_mask, it.rejected_mask] if hasattr(it, "chosen_mask") else getattr(it, "masks", None)
        groups.append(group_rows(it.prompt_ids, comps, [k * b + i for k in range(len(comps))], masks))
    s = len(completions_of(items[0]))
    ids, att, seg, pred, pos, allowed, order = pack_groups(groups, pad_id, capacity)
    shared = sum((s - 1) * len(it.prompt_ids) for it in items)
    vision = collate_vision([getattr(items[i], "vision", None) for i in order])  # one copy per shared prompt
    index = torch.tensor([it.index for it in items], dtype=torch.long)
    return TokenBatch(ids, att, seg, s * b, index, pred, pos, allowed, shared, vision)


def collate_packed_sft(items: list, pad_id: int, capacity: int) -> TokenBatch:
    """SFT items packed into rows (one segment per example)."""
    groups = [group_rows(it.prompt_ids, [it.completion_ids], [i]) for i, it in enumerate(items)]
    ids, att, seg, pred, pos, allowed, order = pack_groups(groups, pad_id, capacity)
    index = torch.tensor([it.index for it in items], dtype=torch.long)
    vision = collate_vision([getattr(items[i], "vision", None) for i in order])
    return TokenBatch(ids, att, seg, len(items), index, pred, pos, allowed, vision=vision)
