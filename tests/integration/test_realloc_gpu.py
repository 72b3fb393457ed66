"""The NCCL (split placement) and CUDA IPC (colocated) executors on real GPUs, through the realloc
benchmark, which checks every engine's tensors bit for bit and times the same bytes on the floor
path. Needs 2 GPUs for NCCL, 1 for IPC; never runs in CI."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


def _bench(capsys, *argv: str) -> dict:
    from benchmarks.realloc import main

    rc = main(list(argv))
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    assert rc == 0, out
    return record


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("zero", ["2", "3"])
def test_nccl_transfer_to_an_engine_gpu_is_exact_and_within_2x_of_the_broadcast_floor(capsys, zero):
    record = _bench(
        capsys, "--backend", "nccl", "--trainers", "1", "--engines", "1", "--zero", zero, "--size-mb", "8000"
    )
    assert record["verified"] and record["ratio"] < 2.0, record


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_buckets_with_checksums_arrive_exact(capsys):
    record = _bench(
        capsys, "--backend", "nccl", "--trainers", "1", "--engines", "1", "--size-mb", "1000", "--checksum"
    )
    assert record["verified"], record


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
def test_colocated_ipc_transfer_is_exact_and_within_2x_of_a_device_copy(capsys):
    record = _bench(
        capsys, "--backend", "ipc", "--trainers", "1", "--engines", "1", "--zero", "2", "--size-mb", "8000"
    )
    assert record["verified"] and record["ratio"] < 2.0, record


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_colocated_zero3_ranks_exchange_shards_over_nccl_into_ipc_arenas(capsys):
    record = _bench(
        capsys, "--backend", "ipc", "--trainers", "2", "--engines", "2", "--zero", "3", "--size-mb", "1000"
    )
    assert record["verified"] and record["wire_bytes"] > 0 and record["local_bytes"] > 0, record
