"""The reallocation plan on its own: layouts, sender choice, buckets, and the bytes it delivers
(executed in one process with the same pack/unpack code the distributed executors use)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from areal_like.core.realloc import (
    EngineTensor,
    Placement,
    Qwen2Dims,
    ReallocConfig,
    Rect,
    SourceLayout,
    TensorSpec,
    hf_destination,
    make_plan,
    replicated_destination,
    vllm_destination,
)
from areal_like.core.realloc.ipc import colocated_hosts
from areal_like.core.realloc.layout import DestinationLayout, flat_range_rects, zero3_partition_numel
from areal_like.core.realloc.pack import (
    FlatSource,
    allocate_staging,
    checksum_matches,
    execute_locally,
    pack_bucket,
)
from areal_like.core.realloc.plan import ALIGN_BYTES
from areal_like.core.realloc.sources import flat_sources, tensor_specs
from areal_like.core.realloc.synthetic import layout_sources, random_weights, wire_cast

# vocab 37 exercises vLLM's vocab padding; 2 KV heads with tp 4 exercises KV-head replication.
DIMS = Qwen2Dims(
    vocab_size=37, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
)
# Qwen3: no q/k/v biases, per-head q/k norms, and a head dim that is not hidden_size / num_heads.
QWEN3_DIMS = Qwen2Dims(
    vocab_size=37, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, attention_bias=False, qk_norm=True,
)  # fmt: skip


def _layout(kind: str, specs, num_ranks: int) -> SourceLayout:
    return (
        SourceLayout.zero3(specs, num_ranks) if kind == "zero3" else SourceLayout.replicated(specs, num_ranks)
    )


def _run(plan, weights) -> dict[int, dict[str, torch.Tensor]]:
    sources = {r: layout_sources(plan.source, weights, r) for r in range(plan.source.num_ranks)}
    staging = {e: allocate_staging(plan, e) for e in range(plan.dest.num_ranks)}
    execute_locally(plan, sources, staging)
    return staging


def _vllm_reference(dims: Qwen2Dims, w: dict[str, torch.Tensor], tp: int, k: int) -> dict[str, torch.Tensor]:
    """vLLM's rank-k tensors built with torch ops, independently of the plan's placements."""
    kv_shards = min(tp, dims.num_kv_heads)
    s = k // (tp // kv_shards)
    vocab_padded = -(-dims.vocab_size // 64) * 64
    embed = F.pad(w["model.embed_tokens.weight"], (0, 0, 0, vocab_padded - dims.vocab_size))
    out = {"model.embed_tokens.weight": embed.chunk(tp)[k], "model.norm.weight": w["model.norm.weight"]}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}"
        for suffix in ("weight", "bias") if dims.attention_bias else ("weight",):
            q, kk, v = (w[f"{p}.self_attn.{n}_proj.{suffix}"] for n in "qkv")
            out[f"{p}.self_attn.qkv_proj.{suffix}"] = torch.cat(
                [q.chunk(tp)[k], kk.chunk(kv_shards)[s], v.chunk(kv_shards)[s]]
            )
        out[f"{p}.self_attn.o_proj.weight"] = w[f"{p}.self_attn.o_proj.weight"].chunk(tp, dim=1)[k]
        if dims.qk_norm:
            for norm in ("q_norm", "k_norm"):
                out[f"{p}.self_attn.{norm}.weight"] = w[f"{p}.self_attn.{norm}.weight"]
        out[f"{p}.mlp.gate_up_proj.weight"] = torch.cat(
            [w[f"{p}.mlp.gate_proj.weight"].chunk(tp)[k], w[f"{p}.mlp.up_proj.weight"].chunk(tp)[k]]
        )
        out[f"{p}.mlp.down_proj.weight"] = w[f"{p}.mlp.down_proj.weight"].chunk(tp, dim=1)[k]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}.{norm}.weight"] = w[f"{p}.{norm}.weight"]
    return out


# ---- layouts ---------------------------------------------------------------------------------------
def test_zero3_layout_follows_deepspeeds_padded_even_split():
    specs = [TensorSpec("a", (10,), "float32"), TensorSpec("b", (2,), "float32")]
    layout = SourceLayout.zero3(specs, 3)
    held = {(s.rank, s.name): (s.start, s.end) for s in layout.shards}
    assert zero3_partition_numel(10, 3) == 4
    assert held == {(0, "a"): (0, 4), (1, "a"): (4, 8), (2, "a"): (8, 10), (0, "b"): (0, 1), (1, "b"): (1, 2)}


def test_flat_ranges_become_at_most_three_rectangles_that_tile_them():
    rng = random.Random(0)
    for _ in range(200):
        cols = rng.randint(1, 9)
        start = rng.randint(0, 60)
        end = rng.randint(start, 70)
        rects = flat_range_rects(start, end, cols)
        cells = sorted(
            r * cols + c
            for rect in rects
            for r in range(rect.row0, rect.row1)
            for c in range(rect.col0, rect.col1)
        )
        assert len(rects) <= 3
        assert cells == list(range(start, end))


# ---- delivered bytes -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["replicated", "zero3"])
@pytest.mark.parametrize("num_ranks", [1, 2, 3])
@pytest.mark.parametrize("num_engines", [1, 2])
@pytest.mark.parametrize("bucket_bytes", [256, 1 << 20])
def test_hf_engines_receive_the_trainer_weights_bit_for_bit(kind, num_ranks, num_engines, bucket_bytes):
    specs = DIMS.specs("float32")
    weights = random_weights(specs, seed=1)
    plan = make_plan(
        _layout(kind, specs, num_ranks), hf_destination(DIMS, "float32", num_engines), bucket_bytes
    )
    staging = _run(plan, weights)
    for e in range(num_engines):
        for name, tensor in weights.items():
            assert torch.equal(staging[e][name], tensor), (e, name)
        assert staging[e]["lm_head.weight"] is staging[e]["model.embed_tokens.weight"]


@pytest.mark.parametrize("kind", ["replicated", "zero3"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("num_engines", [1, 2])
@pytest.mark.parametrize("dims", [DIMS, QWEN3_DIMS], ids=["qwen2", "qwen3"])
def test_vllm_tensor_parallel_ranks_receive_fused_and_sliced_tensors(kind, tp, num_engines, dims):
    specs = dims.specs("bfloat16")
    weights = random_weights(specs, seed=2)
    plan = make_plan(
        _layout(kind, specs, 2), vllm_destination(dims, "bfloat16", num_engines, tp), 512, checksum=True
    )
    staging = _run(plan, weights)
    cast = wire_cast(weights, specs)
    for e in range(num_engines * tp):
        expected = _vllm_reference(dims, cast, tp, e % tp)
        assert set(staging[e]) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(staging[e][name], tensor), (e, name)


def test_an_fp32_trainer_fills_a_bf16_engine_with_the_cast_values():
    specs = DIMS.specs("bfloat16")
    weights = random_weights(specs, seed=3, dtype=torch.float32)
    plan = make_plan(SourceLayout.zero3(specs, 2), hf_destination(DIMS, "bfloat16", 1), 4096)
    staging = _run(plan, weights)
    for name, tensor in wire_cast(weights, specs).items():
        assert staging[0][name].dtype == torch.bfloat16
        assert torch.equal(staging[0][name], tensor)


def test_a_row_larger_than_a_bucket_is_cut_by_columns():
    specs = [TensorSpec("w", (3, 40), "float32"), TensorSpec("b", (5,), "float32")]
    plan = make_plan(SourceLayout.zero3(specs, 2), replicated_destination(specs, 1), 64)
    assert any(p.rect.cols < 40 for b in plan.buckets for p in b.pieces if p.tensor == "w")
    weights = random_weights(specs, seed=4)
    staging = _run(plan, weights)
    assert all(torch.equal(staging[0][n], weights[n]) for n in weights)


# ---- plan shape ------------------------------------------------------------------------------------
@pytest.mark.parametrize("checksum", [False, True])
def test_buckets_stay_under_the_limit_with_aligned_non_overlapping_pieces(checksum):
    specs = DIMS.specs("float32")
    plan = make_plan(
        SourceLayout.zero3(specs, 3), vllm_destination(DIMS, "float32", 2, 2), 1000, checksum=checksum
    )
    for b in plan.buckets:
        assert plan.bucket_nbytes(b) <= 1000
        spans = sorted((p.offset, p.offset + p.nbytes) for p in b.pieces)
        assert all(start % ALIGN_BYTES == 0 for start, _ in spans)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
        assert spans[-1][1] <= b.payload_bytes


def test_each_region_goes_on_the_wire_once_for_all_replicas():
    specs = DIMS.specs("float32")
    plan = make_plan(SourceLayout.replicated(specs, 2), hf_destination(DIMS, "float32", 3), 4096)
    summary = plan.summary()
    assert summary.wire_bytes == sum(s.nbytes for s in specs)
    assert summary.delivered_bytes == 3 * summary.wire_bytes
    assert all(b.peers == (2, 3, 4) for b in plan.buckets)


def test_zero2_replicas_share_the_sending_evenly():
    specs = Qwen2Dims(64, 64, 128, 8, 4, 2).specs("float32")
    plan = make_plan(SourceLayout.replicated(specs, 4), replicated_destination(specs, 1), 1 << 16)
    sent = plan.summary().sender_bytes
    assert len(sent) == 4
    assert max(sent.values()) <= 1.15 * min(sent.values())


def test_zero3_ranks_send_only_their_own_shard():
    specs = DIMS.specs("float32")
    layout = SourceLayout.zero3(specs, 3)
    held = {(s.rank, s.name): (s.start, s.end) for s in layout.shards}
    plan = make_plan(layout, vllm_destination(DIMS, "float32", 1, 2), 2048)
    for b in plan.buckets:
        for p in b.pieces:
            start, end = held[(b.sender, p.tensor)]
            cols = layout.spec(p.tensor).shape[1] if len(layout.spec(p.tensor).shape) > 1 else 1
            assert start <= p.rect.row0 * cols + p.rect.col0 and (p.rect.row1 - 1) * cols + p.rect.col1 <= end


def test_colocated_replicas_copy_locally_and_zero3_shards_cross_between_trainers():
    specs = DIMS.specs("float32")
    dest = hf_destination(DIMS, "float32", 2)
    local = make_plan(SourceLayout.replicated(specs, 2), dest, 4096, hosts=colocated_hosts(2, 2))
    assert local.summary().wire_bytes == 0 and local.num_members == 2
    mixed = make_plan(SourceLayout.zero3(specs, 2), dest, 4096, hosts=colocated_hosts(2, 2))
    s = mixed.summary()
    # Each rank's shard is copied into its own engine and broadcast to the other trainer rank.
    assert s.wire_bytes == s.local_bytes == sum(x.nbytes for x in specs)
    assert {b.members for b in mixed.buckets if not b.is_local} == {(0, 1), (1, 0)}
    weights = random_weights(specs, seed=5)
    staging = _run(mixed, weights)
    assert all(torch.equal(staging[e][n], weights[n]) for e in (0, 1) for n in weights)


def test_the_printed_plan_names_senders_links_and_totals():
    specs = DIMS.specs("float32")
    text = make_plan(SourceLayout.zero3(specs, 2), vllm_destination(DIMS, "float32", 1, 2), 4096).format()
    assert "trainer rank 0" in text and "trainer rank 1" in text
    assert "0 -> 2,3" in text and "buckets" in text and "wire" in text


def test_a_corrupted_bucket_fails_its_checksum():
    specs = DIMS.specs("float32")
    plan = make_plan(
        SourceLayout.replicated(specs, 1), hf_destination(DIMS, "float32", 1), 4096, checksum=True
    )
    bucket = plan.buckets[0]
    buf = torch.zeros(plan.bucket_nbytes(bucket), dtype=torch.uint8)
    pack_bucket(plan, bucket, layout_sources(plan.source, random_weights(specs, 6), 0), buf)
    assert checksum_matches(buf, bucket.payload_bytes)
    buf[3] ^= 1
    assert not checksum_matches(buf, bucket.payload_bytes)


# ---- sources from a module ---------------------------------------------------------------------------
def test_flat_sources_read_full_parameters_or_zero3_partitions():
    module = torch.nn.Linear(5, 3)
    specs = tensor_specs(module, "float32")
    assert [(s.name, s.shape) for s in specs] == [("weight", (3, 5)), ("bias", (3,))]
    full = flat_sources(module, rank=0, num_ranks=1)
    assert torch.equal(full["weight"].tensor, module.weight.detach().reshape(-1))
    # Emulate DeepSpeed ZeRO-3 on rank 1 of 2: ds_tensor holds flat elements [8, 16) of the weight.
    module.weight.ds_tensor, module.weight.ds_numel, module.weight.ds_shape = torch.zeros(8), 15, (3, 5)
    module.bias.ds_tensor, module.bias.ds_numel, module.bias.ds_shape = torch.zeros(2), 3, (3,)
    sharded = flat_sources(module, rank=1, num_ranks=2)
    assert sharded["weight"].start == 8 and sharded["bias"].start == 2
    module.bias.ds_tensor = torch.zeros(3)
    with pytest.raises(ValueError, match="hpz|Hierarchical"):
        flat_sources(module, rank=1, num_ranks=2)


def test_a_source_that_does_not_hold_what_the_plan_reads_is_named():
    specs = [TensorSpec("w", (4, 4), "float32")]
    plan = make_plan(SourceLayout.replicated(specs, 1), replicated_destination(specs, 1), 1024)
    wrong = {0: {"w": FlatSource(torch.zeros(8), 0)}}
    with pytest.raises(ValueError, match="'w' holds flat elements"):
        execute_locally(plan, wrong, {0: allocate_staging(plan, 0)})


# ---- validation --------------------------------------------------------------------------------------
def test_a_destination_that_misses_elements_is_rejected():
    specs = [TensorSpec("w", (4, 4), "float32")]
    half = EngineTensor("w", (4, 4), "float32", (Placement("w", Rect(0, 2, 0, 4), 0),))
    with pytest.raises(ValueError, match="cover 8 of 16"):
        make_plan(SourceLayout.replicated(specs, 1), DestinationLayout(((half,),), (0,), (0,)), 1024)


def test_a_dtype_mismatch_between_engine_and_spec_is_rejected():
    specs = [TensorSpec("w", (4, 4), "float32")]
    t = EngineTensor("w", (4, 4), "bfloat16", (Placement("w", Rect(0, 4, 0, 4), 0),))
    with pytest.raises(ValueError, match="wire dtype"):
        make_plan(SourceLayout.replicated(specs, 1), DestinationLayout(((t,),), (0,), (0,)), 1024)


def test_vllm_layout_rejects_a_tp_size_that_does_not_divide_the_heads():
    with pytest.raises(ValueError, match="tp_size=3"):
        vllm_destination(DIMS, "float32", 1, 3)


def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="realloc.backend='mpi'"):
        ReallocConfig(backend="mpi")
    with pytest.raises(ValueError, match="colocated.*nccl"):
        ReallocConfig(placement="colocated")
    with pytest.raises(ValueError, match="bucket_mb"):
        ReallocConfig(bucket_mb=0)


def test_copy_lists_copy_big_pieces_one_by_one_and_small_ones_together():
    from areal_like.core.realloc.pack import CopyList

    srcs = [torch.randn(1024, 1024), torch.randn(3, 5), torch.randn(700, 1024), torch.randn(7)]
    arena = torch.zeros(sum(t.numel() for t in srcs), dtype=torch.bfloat16)
    dsts, offset = [], 0
    for t in srcs:
        dsts.append(arena[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    copies = CopyList(dsts, srcs)
    copies.run()
    big, small_dsts, _ = copies._split
    assert len(big) == 2 and len(small_dsts) == 2  # 2 MiB and 1.4 MiB of bf16 vs two tiny ones
    for dst, src in zip(dsts, srcs, strict=True):
        assert torch.equal(dst, src.to(torch.bfloat16))
    srcs[0].fill_(3.0)  # cached views: a second run copies the sources' new values
    copies.run()
    assert bool((dsts[0] == 3.0).all())


def test_a_receive_whose_sender_never_started_the_version_is_refused():
    """The receiver's last check: every member it received from marked the version in the store
    (a gloo broadcast can complete with stale bytes when its sender closes its sockets)."""
    from areal_like.core.net import free_port
    from areal_like.core.realloc.executor import ReallocExecutor
    from areal_like.core.realloc.group import ReallocError, ReallocGroup

    plan = make_plan(
        SourceLayout.replicated(DIMS.specs("float32"), 1), hf_destination(DIMS, "float32", 1), 4096
    )
    port = free_port("127.0.0.1")
    names = [plan.member_name(m) for m in range(plan.num_members)]
    trainer = ReallocGroup(0, names, "127.0.0.1", port, "gloo", 5.0, 5.0)  # hosts the store
    trainer.mark(1, 0)  # the trainer started version 1 only
    engine = ReallocExecutor(plan, 1, ReallocConfig(timeout_s=5.0), "127.0.0.1", port)
    engine._check_senders_arrived(1)
    with pytest.raises(ReallocError, match="trainer rank 0: not arrived for version 2") as err:
        engine._check_senders_arrived(2)
    assert err.value.unresponsive == [names[0]]
    engine.close(wait_s=0.1)
    trainer.close(wait_s=0.1)


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_the_plans_tensors_are_the_models_parameters_in_order(architecture):
    from areal_like.core.models import ModelBuildConfig, make_model

    # Qwen3 with a head dim that is not hidden_size / num_heads, as in every released Qwen3
    extra = {"head_dim": 32} if architecture == "qwen3" else {}
    model, _ = make_model(ModelBuildConfig(architecture=architecture, hidden_size=64, num_heads=4, **extra))
    dims = Qwen2Dims.from_config(model.config)
    qwen3 = architecture == "qwen3"
    assert (dims.attention_bias, dims.qk_norm) == (not qwen3, qwen3)
    assert dims.specs("float32") == tensor_specs(model, "float32")


def test_a_model_family_the_plan_does_not_know_is_refused_naming_the_way_around():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match=r"model_type 'llama'.*realloc.enabled=false"):
        Qwen2Dims.from_config(LlamaConfig())
