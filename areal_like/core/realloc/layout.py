"""Layout records: which process holds which region of which tensor, on each side of a weight sync.

Pure Python (no torch), so plans can be built, printed and tested anywhere.

Geometry: every tensor is seen through a 2-D view ``[rows, cols]`` = ``[shape[0], prod(shape[1:])]``
(a 1-D tensor of n elements is ``[n, 1]``, a scalar ``[1, 1]``). A ``Rect`` is a half-open block of
that view. Tensor-parallel slices are rectangles (column-parallel layers split rows, row-parallel
layers split columns), and a ZeRO-3 flat shard is at most three rectangles (a partial first row,
whole rows, a partial last row; see ``flat_range_rects``). So intersections stay rectangles and a
transfer never needs one entry per row.

Producers and consumers:
- ``TensorSpec``: the *logical* tensors, named and shaped as the trainer's HF module names them;
  made by ``areal_like.core.realloc.sources.tensor_specs`` (from a module) or ``Qwen2Dims.specs``.
- ``SourceLayout``: which flat element range of each logical tensor each trainer rank holds
  (ZeRO-0/1/2: everything; ZeRO-3: DeepSpeed's even, padded flat partition).
- ``DestinationLayout``: for each engine rank, the tensors it holds under the engine's own names,
  each assembled from rectangles of logical tensors (fused q/k/v, gate/up, TP slices).
Both are consumed by ``areal_like.core.realloc.plan.make_plan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "uint8": 1}
"""Item size of every dtype the plan accepts (names as ``str(torch.dtype)`` without 'torch.')."""


def check_dtype(dtype: str, where: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{where}: dtype {dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}")


def view2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[rows, cols]`` view of a tensor of ``shape`` (see the module docstring)."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True, order=True)
class Rect:
    """Rows ``[row0, row1)`` x columns ``[col0, col1)`` of a tensor's 2-D view."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def rows(self) -> int:
        return self.row1 - self.row0

    @property
    def cols(self) -> int:
        return self.col1 - self.col0

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def intersect(self, other: Rect) -> Rect | None:
        r0, r1 = max(self.row0, other.row0), min(self.row1, other.row1)
        c0, c1 = max(self.col0, other.col0), min(self.col1, other.col1)
        return Rect(r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None

    def within(self, rows: int, cols: int) -> bool:
        return 0 <= self.row0 < self.row1 <= rows and 0 <= self.col0 < self.col1 <= cols

    def __str__(self) -> str:
        return f"[{self.row0}:{self.row1}, {self.col0}:{self.col1}]"


def full_rect(shape: tuple[int, ...]) -> Rect:
    rows, cols = view2d(shape)
    return Rect(0, rows, 0, cols)


def flat_range_rects(start: int, end: int, cols: int) -> list[Rect]:
    """The flat elements ``[start, end)`` of a ``[*, cols]`` view as at most three rectangles."""
    if end <= start:
        return []
    r0, c0 = divmod(start, cols)
    r1, c1 = divmod(end, cols)
    if r0 == r1:
        return [Rect(r0, r0 + 1, c0, c1)]
    out = []
    if c0 > 0:
        out.append(Rect(r0, r0 + 1, c0, cols))
        r0 += 1
    if r1 > r0:
        out.append(Rect(r0, r1, 0, cols))
    if c1 > 0:
        out.append(Rect(r1, r1 + 1, 0, c1))
    return out


@dataclass(frozen=True)
class TensorSpec:
    """One logical tensor, as the trainer's module names it."""

    name: str
    """HF parameter name, e.g. 'model.layers.0.self_attn.q_proj.weight'."""
    shape: tuple[int, ...]
    """Full (unsharded) shape, e.g. [out_features, in_features] for a linear weight."""
    dtype: str
    """Wire dtype: what the engines hold ('bfloat16' on GPU, 'float32' for the CPU HF engine).
    Senders cast into it while packing, so an fp32 trainer sends half the bytes to a bf16 engine."""

    def __post_init__(self) -> None:
        check_dtype(self.dtype, f"TensorSpec {self.name!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"TensorSpec {self.name!r}: negative dimension in shape {self.shape}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class SourceShard:
    """Trainer rank ``rank`` holds flat elements ``[start, end)`` of logical tensor ``name``."""

    rank: int
    name: str
    start: int
    end: int


@dataclass(frozen=True)
class SourceLayout:
    """What each of ``num_ranks`` trainer ranks holds (the sending side of a plan)."""

    specs: tuple[TensorSpec, ...]
    """Logical tensors in trainer order (``named_parameters`` order)."""
    num_ranks: int
    shards: tuple[SourceShard, ...]
    """Every (rank, tensor, flat range) held; ranges of different ranks may overlap (replicas)."""
    kind: str
    """'replicated' (ZeRO-0/1/2: every rank holds every parameter) or 'zero3' (flat partitions)."""
    _index: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    """Name -> spec, built in ``__post_init__``."""

    @classmethod
    def replicated(cls, specs: list[TensorSpec], num_ranks: int) -> SourceLayout:
        _check_specs(specs, num_ranks)
        shards = tuple(SourceShard(r, s.name, 0, s.numel) for s in specs for r in range(num_ranks))
        return cls(tuple(specs), num_ranks, shards, "replicated")

    @classmethod
    def zero3(cls, specs: list[TensorSpec], num_ranks: int) -> SourceLayout:
        """DeepSpeed ZeRO-3 ``ds_tensor`` partitioning: the flat parameter is padded to a multiple of
        ``num_ranks`` and split evenly; rank r holds ``[r*p, (r+1)*p)`` with ``p = ceil(numel/N)``
        (``partition_parameters.py::_partition_param``), the padding being no one's data."""
        _check_specs(specs, num_ranks)
        shards = []
        for s in specs:
            part = zero3_partition_numel(s.numel, num_ranks)
            for r in range(num_ranks):
                start, end = r * part, min((r + 1) * part, s.numel)
                if start < end:
                    shards.append(SourceShard(r, s.name, start, end))
        return cls(tuple(specs), num_ranks, tuple(shards), "zero3")

    @classmethod
    def for_zero_stage(cls, specs: list[TensorSpec], num_ranks: int, zero_stage: int) -> SourceLayout:
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={zero_stage}: allowed values are 0, 1, 2, 3")
        return cls.zero3(specs, num_ranks) if zero_stage == 3 else cls.replicated(specs, num_ranks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.name: s for s in self.specs})

    def spec(self, name: str) -> TensorSpec:
        return self._index[name]

    def has(self, name: str) -> bool:
        return name in self._index


def zero3_partition_numel(numel: int, num_ranks: int) -> int:
    """Elements per rank of one ZeRO-3 parameter (its ``ds_tensor.numel()``), padding included."""
    return -(-numel // num_ranks)


def _check_specs(specs: list[TensorSpec], num_ranks: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks}: need at least one trainer rank")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor specs name {dup[:3]} more than once; names must be unique")


@dataclass(frozen=True)
class Placement:
    """One rectangle of a logical tensor copied into an engine tensor."""

    src: str
    """Logical tensor name (a ``TensorSpec.name``)."""
    rect: Rect
    """Region of the logical tensor's 2-D view."""
    dst_row: int
    """Row of the engine tensor's 2-D view where ``rect``'s first row lands."""
    dst_col: int = 0
    """Column of the engine tensor's 2-D view where ``rect``'s first column lands."""


@dataclass(frozen=True)
class EngineTensor:
    """One tensor an engine rank holds, under the engine's own name and (TP-sharded) shape."""

    name: str
    """Engine parameter name, e.g. vLLM 'model.layers.0.self_attn.qkv_proj.weight'."""
    shape: tuple[int, ...]
    dtype: str
    placements: tuple[Placement, ...] = ()
    """Where each region comes from; together they cover the tensor exactly (padding excepted)."""
    alias_of: str | None = None
    """Another engine tensor of the same rank that this one shares storage with (tied
    embeddings: HF state_dict lists 'lm_head.weight' too); no bytes are sent for an alias."""
    padded: bool = False
    """True when some elements are no one's data (vLLM vocab padding); they are zero-filled."""


@dataclass(frozen=True)
class DestinationLayout:
    """What every engine rank needs (the receiving side of a plan). Engine rank index = position."""

    ranks: tuple[tuple[EngineTensor, ...], ...]
    """Per engine rank, its tensors in the engine's load order."""
    engine_of: tuple[int, ...]
    """Engine (replica) id of each engine rank."""
    tp_rank_of: tuple[int, ...]
    """Tensor-parallel rank of each engine rank within its engine."""
    naming: str = "hf"
    """Whose names the tensors carry: 'hf' (HFEngine) or 'vllm'."""

    def __post_init__(self) -> None:
        n = len(self.ranks)
        if n == 0:
            raise ValueError("DestinationLayout: no engine ranks; need at least one engine")
        if len(self.engine_of) != n or len(self.tp_rank_of) != n:
            raise ValueError(
                f"DestinationLayout: {n} engine ranks but engine_of has {len(self.engine_of)} and "
                f"tp_rank_of {len(self.tp_rank_of)} entries; give one per engine rank"
            )

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def rank_name(self, rank: int) -> str:
        return f"engine {self.engine_of[rank]} tp {self.tp_rank_of[rank]}"


def replicated_destination(
    specs: list[TensorSpec], num_engines: int, aliases: dict[str, str] | None = None
) -> DestinationLayout:
    """Every engine holds every logical tensor whole under its logical name (the HF engine, TP 1).

    ``aliases`` maps an extra engine name to the logical tensor it shares storage with, e.g.
    ``{'lm_head.weight': 'model.embed_tokens.weight'}`` for tied embeddings.
    """
    if num_engines < 1:
        raise ValueError(f"num_engines={num_engines}: need at least one engine")
    by_name = {s.name: s for s in specs}
    aliases = aliases or {}
    for alias, target in aliases.items():
        if target not in by_name:
            raise ValueError(f"alias {alias!r} -> {target!r}: no tensor spec named {target!r}")
        if alias in by_name:
            raise ValueError(f"alias {alias!r} is also a logical tensor; drop it from the aliases")
    tensors = tuple(
        EngineTensor(s.name, s.shape, s.dtype, (Placement(s.name, full_rect(s.shape), 0, 0),)) for s in specs
    ) + tuple(
        EngineTensor(alias, by_name[target].shape, by_name[target].dtype, alias_of=target)
        for alias, target in aliases.items()
    )
    return DestinationLayout(
        ranks=tuple(tensors for _ in range(num_engines)),
        engine_of=tuple(range(num_engines)),
        tp_rank_of=(0,) * num_engines,
        naming="hf",
    )


def check_destination(source: SourceLayout, dest: DestinationLayout) -> None:
    """Every placement names a logical tensor, stays in bounds, matches its dtype, and the
    placements of each engine tensor tile it without overlap (exactly, unless ``padded``)."""
    for rank, tensors in enumerate(dest.ranks):
        names = {t.name for t in tensors}
        where_rank = f"engine rank {rank} ({dest.rank_name(rank)})"
        if len(names) != len(tensors):
            raise ValueError(f"{where_rank}: duplicate engine tensor names")
        for t in tensors:
            where = f"{where_rank}, tensor {t.name!r}"
            check_dtype(t.dtype, where)
            if t.alias_of is not None:
                target = next((u for u in tensors if u.name == t.alias_of), None)
                if target is None or target.alias_of is not None or target.shape != t.shape:
                    raise ValueError(
                        f"{where}: alias_of={t.alias_of!r} must name a non-alias tensor of shape {t.shape}"
                    )
                continue
            rows, cols = view2d(t.shape)
            covered_rects: list[Rect] = []
            for p in t.placements:
                if not source.has(p.src):
                    raise ValueError(f"{where}: placement source {p.src!r} is not a trainer tensor")
                spec = source.spec(p.src)
                if spec.dtype != t.dtype:
                    raise ValueError(
                        f"{where}: dtype {t.dtype} but source {p.src!r} has wire dtype {spec.dtype}; "
                        "give the TensorSpec the engine's dtype"
                    )
                if not p.rect.within(*view2d(spec.shape)):
                    raise ValueError(f"{where}: source rect {p.rect} is outside {p.src!r} {spec.shape}")
                dst = Rect(p.dst_row, p.dst_row + p.rect.rows, p.dst_col, p.dst_col + p.rect.cols)
                if not dst.within(rows, cols):
                    raise ValueError(f"{where}: placement of {p.src!r}{p.rect} at {dst} is outside {t.shape}")
                if any(dst.intersect(other) for other in covered_rects):
                    raise ValueError(f"{where}: placements overlap at {dst}")
                covered_rects.append(dst)
            covered = sum(r.numel for r in covered_rects)
            if covered != rows * cols and not (t.padded and covered < rows * cols):
                raise ValueError(
                    f"{where}: placements cover {covered} of {rows * cols} elements; every element needs "
                    "exactly one source (set padded=True only for padding rows such as vLLM's vocab)"
                )
