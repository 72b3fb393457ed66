"""Datastore logic without Ray: the metadata index, sampling policies, the DP split, packing, wire."""

from __future__ import annotations

import numpy as np
import pytest

from datastore import DataStoreConfig, SampleMeta
from datastore.index import MetadataIndex
from datastore.packing import pack_rows, unpack_rows
from datastore.policies import FreshestFirst, OldestFirst, make_sampling_policy
from datastore.types import SampleMetaColumns
from datastore.wire import WireClient, WireError
from tests.unit.test_datastore_wire import serving
from trainer.packing import imbalance, split_for_ranks

COLUMNS = ("response_ids", "reward")


def meta(sample_id: str, group_size: int, unit: int = 0, columns=COLUMNS, version: int = 0, length: int = 10):
    group_id = int(sample_id.split(":")[0])
    return SampleMeta(sample_id, group_id, group_size, unit, columns, version, version, length, -1, 100)


def metas(
    group_id: int, group_size: int = 2, version: int = 0, unit: int = 0, lengths=None
) -> list[SampleMeta]:
    lengths = lengths or [10] * group_size
    return [
        meta(f"{group_id}:{i}", group_size, unit, version=version, length=lengths[i])
        for i in range(group_size)
    ]


def add(index: MetadataIndex, *groups: list[SampleMeta]) -> list[SampleMeta]:
    new = SampleMetaColumns.of([m for group in groups for m in group])
    index.check_new(new)
    return index.add(new)


# ---- sampling policies and staleness -----------------------------------------------------------


def test_oldest_first_takes_groups_in_completion_order():
    index = MetadataIndex(num_units=1)
    add(index, metas(7), metas(3), metas(5))

    batch = index.claim("train", list(COLUMNS), 2, None, OldestFirst())

    assert batch.group_ids == [7, 3]
    assert index.claim("train", list(COLUMNS), 2, None, OldestFirst()) is None  # only group 5 left
    assert index.claim("train", list(COLUMNS), 1, None, OldestFirst()).group_ids == [5]


def test_freshest_first_prefers_the_newest_policy_version_and_breaks_ties_by_age():
    index = MetadataIndex(num_units=1)
    add(index, metas(0, version=1), metas(1, version=3), metas(2, version=2), metas(3, version=3))

    batch = index.claim("train", list(COLUMNS), 3, None, FreshestFirst())

    assert batch.group_ids == [1, 3, 2]


def test_a_group_older_than_min_version_is_evicted_counted_and_never_claimed():
    index = MetadataIndex(num_units=1)
    add(index, metas(0, version=0), metas(1, version=2))

    removed = index.evict_stale(min_version=1)

    assert [s.meta.group_id for s in removed] == [0, 0]
    assert index.evicted_unreported == [0]
    assert index.totals["evicted_groups"] == 1
    assert index.claim("train", list(COLUMNS), 1, 1, OldestFirst()).group_ids == [1]


def test_unknown_policy_and_placement_names_fail_with_the_choices():
    with pytest.raises(ValueError, match=r"'newest'.*\['freshest_first', 'oldest_first'\]"):
        make_sampling_policy("newest")
    with pytest.raises(ValueError, match=r"datastore\.sampling_policy='newest': choose one of"):
        DataStoreConfig(sampling_policy="newest")
    with pytest.raises(
        ValueError, match=r"datastore\.placement='pack': choose one of \['spread', 'ray_default'\]"
    ):
        DataStoreConfig(placement="pack")


# ---- unit loss ---------------------------------------------------------------------------------


def test_a_dead_unit_removes_its_groups_whole_and_drops_their_late_samples():
    index = MetadataIndex(num_units=2)
    split_group = metas(1, group_size=3)
    split_group[2] = meta("1:2", 3, unit=1)  # one sample of group 1 on unit 1
    add(index, metas(0, unit=0), split_group[:2], metas(2, unit=1))
    add(index, split_group[2:])
    add(index, metas(3, group_size=2, unit=0)[:1])  # partial, on the live unit

    loss = index.remove_unit(1)

    assert sorted(loss.lost_sample_ids) == ["1:2", "2:0", "2:1"]
    assert sorted(loss.group_ids) == [1, 2]
    assert sorted(s.meta.sample_id for s in loss.removed) == ["1:0", "1:1", "1:2", "2:0", "2:1"]
    assert sorted(index.samples) == ["0:0", "0:1", "3:0"]
    assert sorted(index.lost_unreported) == [1, 2]
    assert index.unit_num_samples == [3, 0]
    # A late sample of a lost group is dropped (it cannot complete its group), not an error.
    dropped = add(index, [meta("2:9", 2)])
    assert [m.sample_id for m in dropped] == ["2:9"]
    assert index.totals["lost_samples"] == 6 and index.totals["lost_groups"] == 2
    assert index.lost_among([0, 1, 2, 3]) == [1, 2]


def test_the_wait_description_counts_ready_missing_and_partial_groups():
    index = MetadataIndex(num_units=1)
    add(index, metas(0))
    add(index, [meta(f"1:{i}", 2, columns=("response_ids",)) for i in range(2)])
    add(index, metas(2, group_size=4)[:1])

    text = index.describe_wait("train", ["reward"])

    assert (
        text
        == "1 ready, 1 complete but missing a column, 1 groups partially written (1 of their 4 samples in)"
    )


# ---- DP split ----------------------------------------------------------------------------------


def test_split_for_ranks_gives_whole_groups_equal_counts_and_balanced_tokens():
    rng = np.random.default_rng(0)
    batch = [
        m for gid in range(32) for m in metas(gid, group_size=4, lengths=rng.integers(100, 4000, 4).tolist())
    ]

    shards = split_for_ranks(batch, num_ranks=4)

    assert [len(shard) for shard in shards] == [32, 32, 32, 32]
    for shard in shards:
        group_ids = [m.group_id for m in shard]
        assert all(group_ids.count(g) == 4 for g in group_ids)  # whole groups
        assert group_ids == sorted(group_ids)  # batch order kept within a rank
    assert sorted(m.sample_id for shard in shards for m in shard) == sorted(m.sample_id for m in batch)
    naive = [batch[i * 32 : (i + 1) * 32] for i in range(4)]  # contiguous chunks of 8 groups
    tokens = [[sum(m.length for m in shard) for shard in split] for split in (shards, naive)]
    assert imbalance(tokens[0]) < 1.01 < imbalance(tokens[1])


def test_split_for_ranks_refuses_a_group_count_that_does_not_divide():
    with pytest.raises(ValueError, match=r"3 groups cannot go to 2 ranks.*multiple of the rank count"):
        split_for_ranks([m for gid in range(3) for m in metas(gid)], num_ranks=2)
    assert split_for_ranks([], num_ranks=2) == [[], []]


# ---- packing -----------------------------------------------------------------------------------


def test_packing_round_trips_every_column_kind_and_counts_bytes_per_row():
    rows = [
        {"ids": np.arange(3, dtype=np.int32), "score": np.float32(1.5), "topk": np.ones((3, 2), np.float16)},
        {"ids": np.arange(5, dtype=np.int32), "topk": np.zeros((5, 2), np.float16)},  # no score
    ]

    packed = pack_rows(["a", "b"], rows)

    assert sorted(packed.packed) == ["ids", "topk"] and sorted(packed.loose) == ["score"]
    assert packed.row_nbytes() == [3 * 4 + 4 + 3 * 2 * 2, 5 * 4 + 5 * 2 * 2]
    back = unpack_rows(packed)
    assert sorted(back[1]) == ["ids", "topk"]
    for original, restored in zip(rows, back, strict=True):
        for name, array in original.items():
            np.testing.assert_array_equal(restored[name], array)
            assert restored[name].dtype == np.asarray(array).dtype


# ---- wire --------------------------------------------------------------------------------------


class _Echo:
    def echo(self, x):
        return x

    async def fail(self):
        raise KeyError("no such sample")


@pytest.fixture
def echo_server():
    with serving(_Echo(), {"echo", "fail"}) as (_, endpoint):
        yield endpoint


def test_wire_calls_carry_arrays_and_errors_and_refuse_a_wrong_secret(echo_server):
    for local_node in ("node-a", "node-b"):  # same node: Unix socket; another node: TCP
        client = WireClient(b"s" * 32, local_node)
        array = np.arange(100_000, dtype=np.float32)
        back = client.call(echo_server, "echo", ({"x": array, "n": 3},), timeout_s=10)
        np.testing.assert_array_equal(back["x"], array)
        assert back["n"] == 3
        with pytest.raises(KeyError, match="no such sample"):
            client.call(echo_server, "fail", (), timeout_s=10)
        with pytest.raises(AttributeError, match="no method 'shutdown'"):
            client.call(echo_server, "shutdown", (), timeout_s=10)
    with pytest.raises(WireError):
        WireClient(b"x" * 32, "node-b").call(echo_server, "echo", (1,), timeout_s=10)


def test_the_lost_samples_error_keeps_its_fields_across_pickling():
    import pickle

    from datastore import DataStoreSamplesLost

    err = pickle.loads(pickle.dumps(DataStoreSamplesLost("3 samples lost", ["1:0"], [1], [2])))

    assert (str(err), err.sample_ids, err.group_ids, err.units) == ("3 samples lost", ["1:0"], [1], [2])


def test_the_benchmark_parses_its_grid_and_refuses_batches_that_do_not_divide_the_load():
    from benchmarks.datastore import parse_args

    settings = parse_args(["--units", "1,4", "--batches", "2:4,8:16", "--writers", "2"])

    assert (settings.units, settings.batches, settings.writers) == ((1, 4), ((2, 4), (8, 16)), 2)
    with pytest.raises(ValueError, match=r"--groups-per-writer=10 must be a multiple of every"):
        parse_args(["--groups-per-writer", "10", "--batches", "4:8"])
