"""Ulysses sequence parallelism for Hugging Face causal LMs: the layout, the attention, the gather.

A sequence-parallel (SP) group of N ranks shares one micro-batch [B, L]. Each rank holds
Ls = ceil(L / N) consecutive positions of every row (``shard_rows``, ``shard_positions``: the
rows are padded to N * Ls with a separate dummy segment), and runs the whole model on them. In
each attention layer one all-to-all trades the rank's sequence shard of every head for all L
positions of H / N heads, attention runs on the full sequence, and a second all-to-all trades
back (Ulysses, Jacobs et al. 2023, arXiv:2309.14509). Per-token outputs (log-probs, entropy)
are all-gathered back to [B, L] (``gather_rows``), so every loss, the sequence-level ones
included, runs unchanged on the full layout on every rank of the group. The gather's backward
keeps each rank's own slice; the all-to-alls' backward is the same exchange; summing the
parameter gradients over the group then gives the non-parallel step's gradient.

Why not DeepSpeed's ``UlyssesSPAttentionHF`` (deepspeed.runtime.sequence_parallel, 0.19.8): it
runs on CPU over gloo and matches the non-parallel step for one sequence per row, but it drops
the attention mask and relies on position ids, which only varlen flash attention reads. With
sdpa (our CPU path, and packed rows outside flash attention) it attends across the sequences
packed in a row: on two packed sequences its loss is off by 0.1 and gradients by 1.5. Here the
block-diagonal causal mask is rebuilt from the gathered position ids (a sequence starts where
its position is 0), as transformers does for packed rows. The mask is dense [B, 1, L, L] bool:
fine for sdpa on CPU; long sequences on GPU want varlen flash or flex block masks instead.

Collectives: ``all_to_all_single`` and ``all_gather`` on the SP process group (gloo on CPU:
torch 2.13's gloo supports both, uneven splits included; NCCL on GPU). Every rank of the group
must run the same forward and backward, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.algorithms import token_logprobs_and_entropy

ATTN_NAME = "ulysses_sdpa"


# ---- layout ----------------------------------------------------------------------------------------
def shard_length(length: int, size: int) -> int:
    """Positions per rank: ceil(length / size)."""
    return -(-length // size)


def shard_rows(x: torch.Tensor, rank: int, size: int, pad_value: int | float = 0) -> torch.Tensor:
    """Rank ``rank``'s slice [B, Ls] of rows [B, L], the rows padded with ``pad_value`` to size * Ls."""
    local = shard_length(x.shape[1], size)
    padded = F.pad(x, (0, local * size - x.shape[1]), value=pad_value)
    return padded[:, rank * local : (rank + 1) * local]


def shard_positions(position_ids: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """``shard_rows`` for position ids: the padding tail restarts at 0, a segment of its own, so it
    never joins (or is attended by) a real sequence."""
    length = position_ids.shape[1]
    pad = shard_length(length, size) * size - length
    tail = torch.arange(pad, dtype=position_ids.dtype, device=position_ids.device).expand(
        position_ids.shape[0], pad
    )
    padded = torch.cat([position_ids, tail], dim=1)
    local = padded.shape[1] // size
    return padded[:, rank * local : (rank + 1) * local]


def segment_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L]: query q may attend key k iff k <= q in the same sequence; a sequence
    starts wherever its position id is 0 (packed rows) and a row's first token always starts one."""
    starts = position_ids == 0
    starts[:, 0] = True
    segment = torch.cumsum(starts.to(torch.long), dim=1)  # [B, L]
    same = segment[:, :, None] == segment[:, None, :]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


# ---- collectives with autograd ---------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Chunk j of dim 0 goes to rank j; the backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    # Both buffers contiguous: the collective reads and writes raw memory, and empty_like of a
    # permuted view would keep its strides.
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _GatherRows(torch.autograd.Function):
    """[B, Ls] per rank -> [B, size * Ls] on every rank. Every rank computes the same loss from the
    result, so each rank's input gradient is its own slice of the output gradient (not a sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.rank, ctx.local = dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local].contiguous(), None


def gather_rows(x: torch.Tensor, group, length: int | None = None) -> torch.Tensor:
    """All ranks' shards [B, Ls] -> [B, length] (the unpadded rows), differentiable."""
    full = _GatherRows.apply(x, group)
    return full if length is None else full[:, :length]


def _sequence_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, H, Ls, D] (this rank's positions, all heads) -> [B, H / size, size * Ls, D]."""
    b, h, ls, d = x.shape
    chunks = x.reshape(b, size, h // size, ls, d).permute(1, 0, 2, 3, 4)  # [size, B, H/size, Ls, D]
    out = _AllToAll.apply(chunks, group)  # out[j]: rank j's positions of this rank's heads
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * ls, d)


def _heads_to_sequence(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, Hl, size * Ls, D] (all positions, this rank's heads) -> [B, Ls, size * Hl, D]."""
    b, hl, length, d = x.shape
    chunks = x.reshape(b, hl, size, length // size, d).permute(2, 0, 1, 3, 4)  # [size, B, Hl, Ls, D]
    out = _AllToAll.apply(chunks, group)  # out[j]: rank j's heads at this rank's positions
    return out.permute(1, 3, 0, 2, 4).reshape(b, length // size, size * hl, d)


# ---- the attention ---------------------------------------------------------------------------------
def make_ulysses_attention(group):
    """An HF attention function (the ``ALL_ATTENTION_FUNCTIONS`` signature) over ``group``."""
    size = dist.get_world_size(group)

    def ulysses_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        # query [B, H, Ls, D], key/value [B, K, Ls, D], rotary already applied with global positions
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError("sequence parallelism does not support sliding-window attention")
        position_ids = kwargs.get("position_ids")
        assert position_ids is not None, "the model must pass position_ids to its attention"
        heads, kv_heads = query.shape[1], key.shape[1]
        if heads % size:
            raise ValueError(f"sequence parallel size {size} must divide the {heads} attention heads")
        if kv_heads % size and size % kv_heads:
            raise ValueError(
                f"train.sequence_parallel={size} and the {kv_heads} KV heads must divide one another"
            )
        if kv_heads < size:  # GQA/MQA: one KV head per rank, replicated next to its query heads
            key = key.repeat_interleave(size // kv_heads, dim=1)
            value = value.repeat_interleave(size // kv_heads, dim=1)
        q = _sequence_to_heads(query, group, size)
        k = _sequence_to_heads(key, group, size)
        v = _sequence_to_heads(value, group, size)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        parts = [torch.empty_like(position_ids) for _ in range(size)]
        dist.all_gather(parts, position_ids.contiguous(), group=group)
        mask = segment_causal_mask(torch.cat(parts, dim=1))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling
        )  # [B, H/size, L, D]
        return _heads_to_sequence(out, group, size), None

    return ulysses_attention


def _no_mask(*args, **kwargs):
    return None  # the attention builds its mask from the gathered position ids


def use_ulysses(model, group) -> None:
    """Route ``model``'s attention through Ulysses over ``group`` (registered under ``ATTN_NAME``
    with transformers; one group per process). The model must have been loaded with sdpa."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, make_ulysses_attention(group))
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    model.set_attn_implementation(ATTN_NAME)


def sequence_parallel_logprobs(
    model,
    input_ids,
    position_ids,
    targets,
    group,
    temperature: float = 1.0,
    with_entropy: bool = True,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) [B, L] of a micro-batch whose positions are spread over
    ``group`` (every rank passes the same full [B, L] tensors and gets the same result).

    ``keep``: sorted columns of [B, L] whose log-probs are wanted (``MicroBatch.scored_positions``);
    each rank then runs the output head only at its own ones (transformers' ``logits_to_keep``) and
    the other columns are 0, as in ``trainer.batch.response_logprobs``. None: every column."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    length = input_ids.shape[1]
    local = shard_length(length, size)
    local_targets = shard_rows(targets, rank, size)
    inputs = dict(
        input_ids=shard_rows(input_ids, rank, size),
        position_ids=shard_positions(position_ids, rank, size),
        use_cache=False,
    )
    if keep is None:
        logits = model(**inputs).logits
        logp, entropy = token_logprobs_and_entropy(logits, local_targets, temperature, with_entropy)
    else:
        lo = rank * local
        mine = keep[(keep >= lo) & (keep < lo + local)] - lo
        # A shard without scored columns still runs the head at one column (its value dropped
        # below), so every parameter takes part in every rank's backward, as ZeRO's reduction needs.
        run = mine if len(mine) else mine.new_zeros(1)
        logits = model(**inputs, logits_to_keep=run).logits  # [B, K, V]
        logp, entropy = token_logprobs_and_entropy(logits, local_targets[:, run], temperature, with_entropy)
        logp = _place(logp, mine, local)
        entropy = None if entropy is None else _place(entropy, mine, local)
    logp = gather_rows(logp, group, length)
    if entropy is not None:
        entropy = gather_rows(entropy.detach(), group, length)
    return logp, entropy


def _place(values: torch.Tensor, columns: torch.Tensor, width: int) -> torch.Tensor:
    """[B, K] values at ``columns`` -> [B, width], 0 elsewhere; no columns: zeros that still carry
    ``values``' graph (with a zero gradient)."""
    out = values.new_zeros(values.shape[0], width)
    if len(columns):
        return out.index_copy(1, columns, values)
    return out + 0.0 * values[:, :1]


# ---- the trainer's groups ----------------------------------------------------------------------------
def check_model_heads(model_config, size: int) -> None:
    """ValueError unless the Ulysses attention can split ``model_config``'s heads over ``size`` ranks:
    the attention heads divisible by it, and the KV heads divisible by it or dividing it (then each
    rank gets one KV head, replicated next to its query heads)."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(
            f"train.sequence_parallel={size} must divide the model's {heads} attention heads; "
            f"pick a divisor of {heads}"
        )
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"train.sequence_parallel={size} and the model's {kv_heads} KV heads must divide one "
            f"another; pick a divisor or a multiple of {kv_heads} that divides {heads}"
        )
    if "sliding_attention" in (getattr(model_config, "layer_types", None) or ()):
        raise ValueError(
            f"train.sequence_parallel={size}: the model uses sliding-window attention, which the "
            "Ulysses attention does not support; set train.sequence_parallel=1"
        )


def new_sequence_parallel_group(rank: int, world_size: int, size: int):
    """This rank's group of ``size`` consecutive ranks (rank // size is its data-parallel index).
    Collective: every rank creates every group, in the same order, as ``dist.new_group`` requires."""
    assert world_size % size == 0, (world_size, size)
    mine = None
    for first in range(0, world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine
