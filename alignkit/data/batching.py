"""Token ids -> padded tensors with a per-token segment map.

Every scored token carries the index of the output slot ("segment") its log-prob is summed into;
unscored tokens (prompt, padding) carry -1. The log-prob code only reads segments, so other
layouts (prefix-shared pairs, packed rows) can reuse it unchanged.

Pair layout here: rows 0..B-1 hold prompt+chosen, rows B..2B-1 prompt+rejected; segment i is
pair i's chosen completion and segment B+i its rejected one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor  # [R, T] long, 1 for real tokens
    segment_ids: torch.Tensor  # [R, T] long, -1 where not scored
    num_segments: int
    example_ids: torch.Tensor  # [E] long: data-set indices of the examples in this batch

    @property
    def num_examples(self) -> int:
        return int(self.example_ids.numel())

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens processed (what tokens/s counts)."""
        return int(self.attention_mask.sum())

    @property
    def num_scored(self) -> int:
        return int((self.segment_ids >= 0).sum())

    def to(self, device) -> "TokenBatch":
        return TokenBatch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.segment_ids.to(device, non_blocking=True),
            self.num_segments,
            self.example_ids,
        )


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
        segments[r, n_unscored: len(ids)] = seg
        if mask and mask[0] is not None:  # only the masked completion tokens are scored
            keep = torch.tensor(mask[0], dtype=torch.bool)
            segments[r, n_unscored: len(ids)][~keep] = -1
    return input_ids, attention, segments


def collate_pairs(pairs: list, pad_id: int) -> TokenBatch:
    """TokenizedPairs -> a padded batch (chosen rows, then rejected rows)."""
    b = len(pairs)
    rows = [(p.prompt_ids + p.chosen_ids, len(p.prompt_ids), i, p.chosen_mask) for i, p in enumerate(pairs)]
    rows += [(p.prompt_ids + p.rejected_ids, len(p.prompt_ids), b + i, p.rejected_mask) for i, p in enumerate(pairs)]
    ids, att, seg = _pad_rows(rows, pad_id)
    return TokenBatch(ids, att, seg, 2 * b, torch.tensor([p.index for p in pairs], dtype=torch.long))


def collate_sft(items: list, pad_id: int) -> TokenBatch:
    """TokenizedSFTs -> a padded batch, one row and one segment per example."""
    rows = [(it.prompt_ids + it.completion_ids, len(it.prompt_ids), i) for i, it in enumerate(items)]
    ids, att, seg = _pad_rows(rows, pad_id)
    return TokenBatch(ids, att, seg, len(items), torch.tensor([it.index for it in items], dtype=torch.long))


def collate_groups(groups: list, pad_id: int) -> TokenBatch:
    """TokenizedGroups of S completions each -> rows s*B + i (completion s of group i), one
    segment per row, so per-segment log-probs reshape to [S, B]."""
    b, s = len(groups), len(groups[0].completions)
    if any(len(g.completions) != s for g in groups):
        raise ValueError("every group in a batch needs the same number of completions")
    rows = [(g.prompt_ids + g.completions[k], len(g.prompt_ids), k * b + i)
            for k in range(s) for i, g in enumerate(groups)]
    ids, att, seg = _pad_rows(rows, pad_id)
    return TokenBatch(ids, att, seg, s * b, torch.tensor([g.index for g in groups], dtype=torch.long))
