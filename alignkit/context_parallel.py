"""Context parallelism: each sequence of a micro-batch split along its length over the N processes
of a context group, with DeepSpeed-Ulysses' all-to-all over attention heads (Jacobs et al., arXiv
2309.14509).

Every process of a group holds the same micro-batch and runs the model on its contiguous 1/N of the
positions (padded to a multiple of N): embeddings, MLPs and norms are per token, and rotary
embeddings take each position's own index. Attention alone needs the whole sequence: before it, an
all-to-all trades "every head, my positions" for "my H/N heads, every position" ([B, H, T/N, D] ->
[B, H/N, T, D]); SDPA runs on full sequences of a share of the heads (with the batch's own mask:
causal, or a packed / prefix-shared layout's block mask); a second all-to-all trades back. The
backward of each all-to-all is the other one. Activation memory per process is about 1/N of a
whole sequence's, except the attention mask of a packed layout ([T, T] per row, whole).

Log-probs: each process scores the tokens whose predicting position it holds; the token log-probs
(and entropies) are then gathered across the group in the one-process order, so the loss, its
metrics and KL are computed from the whole sequence, identically on every process of the group.
The gather's backward gives each process the gradient of its own tokens (every process computes
the same loss), and the parameter gradients of the group's processes add up to the whole
sequence's (`steps.run_batches` scales for that).

Departures from the paper: key and value heads are repeated to the query heads' count before the
all-to-all when their count does not divide by N (grouped-query attention with few KV heads);
the paper assumes multi-head attention."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from alignkit.errors import ConfigError

ATTENTION = "alignkit_context_parallel"  # the attention implementation name registered with transformers


@dataclass
class ContextGroup:
    group: object  # the torch.distributed process group of this process's context group
    rank: int  # this process's place in the group
    size: int


_active: ContextGroup | None = None  # the group of this run (set by `distributed.Dist`)
_attending: dict | None = None  # {"mask": [R, 1, T, T] additive or None, "causal": bool} during a sharded forward


def configure(group: ContextGroup | None) -> None:
    global _active
    _active = group


def active() -> ContextGroup | None:
    return _active


# -- all-to-all with autograd ------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, cp: ContextGroup) -> torch.Tensor:
    import torch.distributed as tdist

    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: the collective writes it flat
    tdist.all_to_all_single(out, x, group=cp.group)
    return out


def _seq_to_heads(x: torch.Tensor, cp: ContextGroup) -> torch.Tensor:
    """[B, H, T/N, D] (my positions, every head) -> [B, H/N, T, D] (my heads, every position)."""
    b, h, t, d = x.shape
    n = cp.size
    parts = x.reshape(b, n, h // n, t, d).permute(1, 0, 2, 3, 4)  # [N, B, H/N, T/N, D]: part j goes to rank j
    got = _all_to_all(parts, cp)  # got[i]: rank i's positions of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d)


def _heads_to_seq(x: torch.Tensor, cp: ContextGroup) -> torch.Tensor:
    """[B, H/N, T, D] -> [B, H, T/N, D], the inverse of `_seq_to_heads`."""
    b, hn, t, d = x.shape
    n = cp.size
    parts = x.reshape(b, hn, n, t // n, d).permute(2, 0, 1, 3, 4)  # [N, B, H/N, T/N, D]: positions of rank j
    got = _all_to_all(parts, cp)  # got[i]: my positions of rank i's heads
    return got.permute(1, 0, 2, 3, 4).reshape(b, n * hn, t // n, d)


class _Exchange(torch.autograd.Function):
    """`forward(x, cp)` (one of the two exchanges) whose backward is the other one."""

    @staticmethod
    def forward(ctx, x, cp, to_heads: bool):
        ctx.cp, ctx.to_heads = cp, to_heads
        return _seq_to_heads(x, cp) if to_heads else _heads_to_seq(x, cp)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq(grad, ctx.cp) if ctx.to_heads else _seq_to_heads(grad, ctx.cp)), None, None


class _GatherRows(torch.autograd.Function):
    """[n] on every process of the group -> [N, n] (all of them, in group order); the backward keeps
    this process's row: each process computes the same loss from the gathered values."""

    @staticmethod
    def forward(ctx, x, cp):
        import torch.distributed as tdist

        ctx.rank = cp.rank
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        tdist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank].contiguous(), None


# -- attention ---------------------------------------------------------------------------------


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: SDPA as `sdpa` computes it, with Ulysses' all-to-all
    around it while a sharded forward runs (`attending`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _attending is None or _active is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    cp = _active
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ConfigError(
            f"dist.context_parallel: {type(module).__name__} uses sliding-window attention or logit "
            "soft-capping, which alignkit's context-parallel attention does not compute; train it "
            "without dist.context_parallel."
        )
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads % cp.size:  # grouped-query attention with fewer KV heads than processes: repeat them
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    q, k, v = (_Exchange.apply(t, cp, True) for t in (query, key, value))
    mask = _attending["mask"]
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None if mask is None else mask.to(q.dtype),
        dropout_p=dropout,
        is_causal=mask is None,
        scale=scaling,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    out = _Exchange.apply(out, cp, False)  # [B, H, T/N, D]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `ATTENTION` an attention implementation transformers models can be loaded with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def check_attention(attn_implementation: str | None, cp_size: int) -> None:
    if attn_implementation not in (None, "sdpa"):
        raise ConfigError(
            f"`dist.context_parallel: {cp_size}` runs its own attention (SDPA with Ulysses' all-to-all); "
            f"model.attn_implementation={attn_implementation} cannot be used with it. Remove "
            "model.attn_implementation (or set it to sdpa)."
        )


def check_heads(config, cp_size: int) -> None:
    heads = getattr(config, "num_attention_heads", None)
    if heads is None or heads % cp_size:
        raise ConfigError(
            f"`dist.context_parallel: {cp_size}`: the model has {heads} attention heads, which {cp_size} "
            f"processes cannot split evenly (Ulysses gives each process whole heads). Use a context size "
            f"that divides {heads}."
        )


# -- a sharded forward -------------------------------------------------------------------------


def padded_length(t: int, cp: ContextGroup) -> int:
    return -(-t // cp.size) * cp.size


def local_span(t_padded: int, cp: ContextGroup) -> tuple[int, int]:
    per = t_padded // cp.size
    return cp.rank * per, (cp.rank + 1) * per


def _pad(x: torch.Tensor, width: int, value) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def local_inputs(batch, cp: ContextGroup, dtype: torch.dtype) -> tuple[dict, torch.Tensor | None]:
    """(the model's keyword inputs for this process's positions, the whole [R, 1, T, T] additive
    mask or None for plain causal rows). Plain rows are right-padded: causal attention gives their
    tokens what the padding mask would (a pad key comes after every real query)."""
    ids = batch.input_ids
    r, t = ids.shape
    width = padded_length(t, cp)
    lo, hi = local_span(width, cp)
    ids = _pad(ids, width, 0)
    if batch.packed:
        positions = _pad(batch.position_ids, width, 0)
        allowed = batch.allowed
        if width != t:
            grown = torch.zeros((r, width, width), dtype=torch.bool, device=allowed.device)
            grown[:, :t, :t] = allowed
            idx = torch.arange(t, width, device=allowed.device)
            grown[:, idx, idx] = True  # a padding query attends to itself (no row of -inf)
            allowed = grown
        mask = torch.zeros((r, 1, width, width), dtype=dtype, device=ids.device)
        mask = mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    else:
        positions = torch.arange(width, device=ids.device).expand(r, width)
        mask = None
    return {"input_ids": ids[:, lo:hi], "position_ids": positions[:, lo:hi]}, mask


@contextlib.contextmanager
def attending(mask: torch.Tensor | None):
    """Forwards inside use Ulysses' attention with `mask` (None: causal) over the whole sequence."""
    global _attending
    before = _attending
    _attending = {"mask": mask}
    try:
        yield
    finally:
        _attending = before


def gather_tokens(values: torch.Tensor, owner: torch.Tensor, cp: ContextGroup) -> torch.Tensor:
    """The token values [n_mine] each process computed, for the tokens `owner` [N] (the process
    holding each token's predicting position, in the one-process order) assigns it, as [N] in that
    order on every process; differentiable in `values`."""
    counts = torch.bincount(owner, minlength=cp.size).tolist()
    width = max(counts) if counts else 0
    padded = values.new_zeros(width)
    padded = torch.cat([values, padded[: width - values.shape[0]]]) if values.shape[0] < width else values
    rows = _GatherRows.apply(padded, cp)  # [N, width]
    flat = torch.cat([rows[i, : counts[i]] for i in range(cp.size)])  # grouped by owner, in order within
    order = torch.argsort(owner, stable=True)  # flat[j] is the value of token order[j]
    return flat[torch.argsort(order)]
