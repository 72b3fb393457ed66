"""Qwen2 and dense Qwen3 in both namings: the trainer's HF tensors and vLLM's fused, tensor-parallel ones.

Qwen3 is Qwen2 without the q/k/v biases (``attention_bias``, false in its configs) and with a per-head
RMSNorm of queries and keys (``q_norm``, ``k_norm``: [head_dim] each, replicated on every TP rank);
its ``head_dim`` is set in config.json (128), not ``hidden_size / num_heads``.

The mapping table (per decoder layer i, ``L = model.layers.{i}``; TP rank k of ``tp``; ``hd`` head
dim, ``Hq``/``Hkv`` query/KV heads, ``I`` MLP width, ``V`` vocab, ``Vp`` = V padded to 64):

| vLLM tensor (rank k)              | rows / cols of the HF tensors                          | split    |
|-----------------------------------|--------------------------------------------------------|----------|
| model.embed_tokens.weight [Vp/tp, H] | embed rows [k*Vp/tp, (k+1)*Vp/tp) clipped to V, rest 0 | vocab    |
| L.self_attn.qkv_proj.weight / .bias  | q rows of heads [k*Hq/tp..]; k, v rows of KV shard s  | column   |
| L.self_attn.o_proj.weight [H, Hq*hd/tp] | o_proj columns [k*Hq*hd/tp ..)                      | row      |
| L.mlp.gate_up_proj.weight [2I/tp, H] | gate rows [k*I/tp ..), then up rows [k*I/tp ..)       | column   |
| L.mlp.down_proj.weight [H, I/tp]     | down_proj columns [k*I/tp ..)                         | row      |
| L.input_layernorm / post_attention_layernorm, model.norm | whole                       | replicated |
| L.self_attn.q_norm / k_norm (Qwen3) | whole                                                 | replicated |
| lm_head.weight (untied only)      | like embed_tokens                                       | vocab    |

KV shard ``s = k // max(1, tp // Hkv)``: when tp > Hkv each KV head is replicated on tp/Hkv ranks
(vLLM ``QKVParallelLinear.num_kv_head_replicas``). Tied embeddings: vLLM's lm_head *is*
embed_tokens, so there is no lm_head tensor; HF's state_dict lists it, as an alias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from areal_like.core.realloc.layout import (
    DestinationLayout,
    EngineTensor,
    Placement,
    Rect,
    TensorSpec,
    full_rect,
    replicated_destination,
)

MODEL_TYPES = ("qwen2", "qwen3")
"""config.json ``model_type`` values the plan maps."""

VLLM_VOCAB_PADDING = 64
"""vLLM's DEFAULT_VOCAB_PADDING_SIZE: embedding and lm_head rows are padded to a multiple of it."""


@dataclass(frozen=True)
class Qwen2Dims:
    """The shapes that determine a Qwen2 model's tensors."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = True
    head_dim: int | None = None
    """Defaults to hidden_size // num_heads."""
    attention_bias: bool = True
    """Biases on the q/k/v projections (Qwen2, Qwen2.5); Qwen3 has none."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys (Qwen3's ``q_norm``/``k_norm``)."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Qwen2Dims.{name}={getattr(self, name)}: must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Qwen2Dims: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def head_size(self) -> int:
        """``head_dim`` once resolved (``__post_init__`` fills in the default)."""
        assert self.head_dim is not None
        return self.head_dim

    @classmethod
    def from_config(cls, config) -> Qwen2Dims:
        """From a transformers ``Qwen2Config`` or ``Qwen3Config`` (``model_type`` picks the family)."""
        model_type = getattr(config, "model_type", "qwen2")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r}: the weight-reallocation plan knows {', '.join(MODEL_TYPES)} "
                "(Qwen2, Qwen2.5, dense Qwen3); set realloc.enabled=false to send whole state dicts to "
                "the engines instead"
            )
        qwen3 = model_type == "qwen3"
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            attention_bias=bool(getattr(config, "attention_bias", False)) if qwen3 else True,
            qk_norm=qwen3,
        )

    def specs(self, dtype: str) -> list[TensorSpec]:
        """Logical tensors in ``Qwen2ForCausalLM``'s (``Qwen3ForCausalLM``'s) ``named_parameters()``
        order (tied lm_head omitted)."""
        H, I, hd = self.hidden_size, self.intermediate_size, self.head_size  # noqa: E741
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        out = [TensorSpec("model.embed_tokens.weight", (self.vocab_size, H), dtype)]
        for i in range(self.num_layers):
            p = f"model.layers.{i}"
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                out.append(TensorSpec(f"{p}.self_attn.{name}_proj.weight", (rows, H), dtype))
                if self.attention_bias:
                    out.append(TensorSpec(f"{p}.self_attn.{name}_proj.bias", (rows,), dtype))
            out.append(TensorSpec(f"{p}.self_attn.o_proj.weight", (H, q), dtype))
            if self.qk_norm:
                out += [
                    TensorSpec(f"{p}.self_attn.q_norm.weight", (hd,), dtype),
                    TensorSpec(f"{p}.self_attn.k_norm.weight", (hd,), dtype),
                ]
            out += [
                TensorSpec(f"{p}.mlp.gate_proj.weight", (I, H), dtype),
                TensorSpec(f"{p}.mlp.up_proj.weight", (I, H), dtype),
                TensorSpec(f"{p}.mlp.down_proj.weight", (H, I), dtype),
                TensorSpec(f"{p}.input_layernorm.weight", (H,), dtype),
                TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), dtype),
            ]
        out.append(TensorSpec("model.norm.weight", (H,), dtype))
        if not self.tie_word_embeddings:
            out.append(TensorSpec("lm_head.weight", (self.vocab_size, H), dtype))
        return out

    @property
    def tied_aliases(self) -> dict[str, str]:
        """HF state_dict names that share storage with a logical tensor."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.tie_word_embeddings else {}


def hf_destination(dims: Qwen2Dims, dtype: str, num_engines: int) -> DestinationLayout:
    """M HF engines (TP 1), each loading the full ``state_dict`` (tied lm_head as an alias)."""
    return replicated_destination(dims.specs(dtype), num_engines, dims.tied_aliases)


def vllm_destination(
    dims: Qwen2Dims, dtype: str, num_engines: int, tp_size: int, vocab_padding: int = VLLM_VOCAB_PADDING
) -> DestinationLayout:
    """M vLLM engines of ``tp_size`` ranks each; engine rank ``e*tp_size + k`` is TP rank k of engine e."""
    H, I, hd = dims.hidden_size, dims.intermediate_size, dims.head_size  # noqa: E741
    Hq, Hkv = dims.num_heads, dims.num_kv_heads
    if num_engines < 1 or tp_size < 1:
        raise ValueError(f"num_engines={num_engines}, tp_size={tp_size}: both must be >= 1")
    if Hq % tp_size or I % tp_size:
        raise ValueError(
            f"tp_size={tp_size} must divide num_heads={Hq} and intermediate_size={I} (vLLM's rule)"
        )
    if Hkv % tp_size and tp_size % Hkv:
        raise ValueError(f"tp_size={tp_size} and num_kv_heads={Hkv}: one must divide the other (vLLM's rule)")
    vocab_padded = -(-dims.vocab_size // vocab_padding) * vocab_padding
    if vocab_padded % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the padded vocabulary {vocab_padded}")

    q_rows = Hq // tp_size * hd
    kv_heads_per_rank = max(1, Hkv // tp_size)
    kv_rows = kv_heads_per_rank * hd
    kv_replicas = max(1, tp_size // Hkv)
    i_rows = I // tp_size
    o_cols = Hq * hd // tp_size
    vocab_rows = vocab_padded // tp_size

    def vocab_parallel(name: str, src: str, k: int) -> EngineTensor:
        start = k * vocab_rows
        stop = min(start + vocab_rows, dims.vocab_size)
        placements = (Placement(src, Rect(start, stop, 0, H), 0),) if stop > start else ()
        return EngineTensor(name, (vocab_rows, H), dtype, placements, padded=stop - start < vocab_rows)

    def rank_tensors(k: int) -> tuple[EngineTensor, ...]:
        s = k // kv_replicas  # KV shard served by this rank
        q_part = Rect(k * q_rows, (k + 1) * q_rows, 0, 1)
        kv_part = Rect(s * kv_rows, (s + 1) * kv_rows, 0, 1)
        out = [vocab_parallel("model.embed_tokens.weight", "model.embed_tokens.weight", k)]
        for i in range(dims.num_layers):
            p = f"model.layers.{i}"
            for suffix, cols in (("weight", H), ("bias", 1)) if dims.attention_bias else (("weight", H),):
                q, kk, v = (f"{p}.self_attn.{n}_proj.{suffix}" for n in "qkv")
                out.append(
                    EngineTensor(
                        f"{p}.self_attn.qkv_proj.{suffix}",
                        (q_rows + 2 * kv_rows, H) if suffix == "weight" else (q_rows + 2 * kv_rows,),
                        dtype,
                        (
                            Placement(q, Rect(q_part.row0, q_part.row1, 0, cols), 0),
                            Placement(kk, Rect(kv_part.row0, kv_part.row1, 0, cols), q_rows),
                            Placement(v, Rect(kv_part.row0, kv_part.row1, 0, cols), q_rows + kv_rows),
                        ),
                    )
                )
            out.append(
                EngineTensor(
                    f"{p}.self_attn.o_proj.weight",
                    (H, o_cols),
                    dtype,
                    (Placement(f"{p}.self_attn.o_proj.weight", Rect(0, H, k * o_cols, (k + 1) * o_cols), 0),),
                )
            )
            if dims.qk_norm:
                out += [_whole(f"{p}.self_attn.{n}_norm.weight", (hd,), dtype) for n in "qk"]
            out += [
                EngineTensor(
                    f"{p}.mlp.gate_up_proj.weight",
                    (2 * i_rows, H),
                    dtype,
                    (
                        Placement(f"{p}.mlp.gate_proj.weight", Rect(k * i_rows, (k + 1) * i_rows, 0, H), 0),
                        Placement(
                            f"{p}.mlp.up_proj.weight", Rect(k * i_rows, (k + 1) * i_rows, 0, H), i_rows
                        ),
                    ),
                ),
                EngineTensor(
                    f"{p}.mlp.down_proj.weight",
                    (H, i_rows),
                    dtype,
                    (Placement(f"{p}.mlp.down_proj.weight", Rect(0, H, k * i_rows, (k + 1) * i_rows), 0),),
                ),
            ]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out.append(_whole(f"{p}.{norm}.weight", (H,), dtype))
        out.append(_whole("model.norm.weight", (H,), dtype))
        if not dims.tie_word_embeddings:
            out.append(vocab_parallel("lm_head.weight", "lm_head.weight", k))
        return tuple(out)

    per_rank = [rank_tensors(k) for k in range(tp_size)]
    return DestinationLayout(
        ranks=tuple(per_rank[k] for _ in range(num_engines) for k in range(tp_size)),
        engine_of=tuple(e for e in range(num_engines) for _ in range(tp_size)),
        tp_rank_of=tuple(k for _ in range(num_engines) for k in range(tp_size)),
        naming="vllm",
    )


def _whole(name: str, shape: tuple[int, ...], dtype: str) -> EngineTensor:
    return EngineTensor(name, shape, dtype, (Placement(name, full_rect(shape), 0),))


def dims_for_bytes(target_bytes: int, dtype_bytes: int) -> Qwen2Dims:
    """A Qwen2-shaped model of about ``target_bytes`` (benchmarks). Qwen2.5's per-layer aspect
    ratios (MLP 5.25x hidden rounded to 64, 2 KV heads of dim 64, tied embeddings, vocab 16x
    hidden so decoder layers carry most bytes), with depth near hidden/64 as in Qwen2.5-7B
    (28 x 3584): the width whose depth for the target size comes closest to that."""

    def make(hidden: int, layers: int) -> Qwen2Dims:
        return Qwen2Dims(
            16 * hidden, hidden, round(5.25 * hidden / 64) * 64, layers, hidden // 64, 2, True, 64
        )

    def size(dims: Qwen2Dims) -> int:
        return sum(s.numel for s in dims.specs("float32")) * dtype_bytes

    best = None
    for hidden in range(128, 16384, 128):
        fixed, per_layer = size(make(hidden, 1)), size(make(hidden, 2)) - size(make(hidden, 1))
        layers = max(1, round((target_bytes - fixed + per_layer) / per_layer))
        dims = make(hidden, layers)
        score = (abs(size(dims) - target_bytes) > 0.05 * target_bytes, abs(math.log(layers * 64 / hidden)))
        if best is None or score < best[0]:
            best = (score, dims)
        if layers == 1:
            break
    assert best is not None, "the loop runs at least once"
    return best[1]
