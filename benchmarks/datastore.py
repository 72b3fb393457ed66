"""``areal-like bench datastore``: put+get throughput and metadata latency of the datastore on local Ray.

Dataflow of one configuration (all actors ``num_cpus=0``; one store per configuration):

    Writer actor x W --put(groups_per_put groups)--> store   (writes until its quota is put)
    Reader actor x R --get_batch_meta -> get_data -> release  (reads until its quota is consumed)
    driver: starts both sides at once; meanwhile a thread times a non-blocking get_batch_meta every
            5 ms (the metadata latency under load); waits for all (every wait has a timeout), then
            times the same call and stats on the idle store. CPU time per role is read from each
            actor process (``__ray_call__``) and from the session's raylet and GCS (psutil).

Samples are GRPO-like: groups of ``group_size`` samples, each ``input_ids`` int32 [L] and ``logprobs``
float32 [L] with L uniform in [min_tokens, max_tokens]. A sample counts once it has been put and
read back; ``put_get_samples_per_s`` = samples / wall time of the whole configuration. It prints a
table and, as its last line, one JSON object. Run it on a quiet machine: every other process
competes for the same cores (the header prints the load average).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

COLUMNS = ["input_ids", "logprobs"]
# Deadline of every wait in the benchmark (a stuck store fails the run, naming the side that hung).
_WAIT_S = 600.0
# How long the idle actors' own CPU use is sampled before each configuration's load starts.
_IDLE_PROBE_S = 1.0


@dataclass
class BenchSettings:
    """One benchmark run: the store layouts and batch sizes to compare and the load put on each."""

    units: tuple[int, ...] = (1, 2, 4)
    """Storage-unit counts to run, one store each."""
    batches: tuple[tuple[int, int], ...] = ((4, 8), (8, 16))
    """(groups per put, groups per get_batch_meta) pairs to run with every unit count."""
    writers: int = 4
    """Concurrent writer actors (rollout workers)."""
    readers: int = 2
    """Concurrent reader actors (trainer-side consumers of one task)."""
    groups_per_writer: int = 384
    """Groups each writer puts per configuration (all are read back and released)."""
    group_size: int = 8
    """Samples per group (GRPO's n)."""
    min_tokens: int = 1024
    """Shortest sample, in tokens; lengths are uniform in [min_tokens, max_tokens]."""
    max_tokens: int = 4096
    """Longest sample, in tokens."""
    meta_probes: int = 300
    """Metadata round trips timed on the idle store after each configuration."""

    def __post_init__(self) -> None:
        total = self.writers * self.groups_per_writer
        for per_put, per_get in self.batches:
            if self.groups_per_writer % per_put:
                raise ValueError(
                    f"--groups-per-writer={self.groups_per_writer} must be a multiple of every "
                    f"groups-per-put in --batches (got {per_put})"
                )
            if total % (self.readers * per_get):
                raise ValueError(
                    f"writers*groups_per_writer={total} must be a multiple of readers*groups_per_get="
                    f"{self.readers * per_get} (from --batches) so that every reader gets whole batches"
                )
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"--min-tokens={self.min_tokens} / --max-tokens={self.max_tokens}: need 1 <= min <= max"
            )


@dataclass
class ConfigResult:
    """Figures of one (unit count, batch sizes) configuration."""

    units: int
    groups_per_put: int
    groups_per_get: int
    samples: int
    megabytes: float
    wall_s: float
    samples_per_s: float
    put_p50_ms: float
    get_data_p50_ms: float
    release_p50_ms: float
    meta_p50_ms: float
    """Non-blocking get_batch_meta from the driver while the writers and readers run."""
    meta_idle_p50_ms: float
    """The same call on the idle store afterwards."""
    stats_idle_p50_ms: float
    cpu_us_per_sample: dict[str, float]
    """CPU time spent by each role during the put/get phase, per sample (what bounds the rate)."""
    idle_cpu_us_per_sample: float
    """Of the total, what the same processes burn when idle over as long (Ray's own upkeep)."""


def _p50_ms(seconds: list[float]) -> float:
    return float(np.median(seconds) * 1e3) if seconds else float("nan")


def _make_groups(writer: int, settings: BenchSettings) -> list[list]:
    from datastore import SampleWrite

    rng = np.random.default_rng(writer)
    groups = []
    for g in range(settings.groups_per_writer):
        group_id = writer * settings.groups_per_writer + g
        group = []
        for i in range(settings.group_size):
            length = int(rng.integers(settings.min_tokens, settings.max_tokens + 1))
            columns = {
                "input_ids": rng.integers(0, 150_000, length, dtype=np.int32),
                "logprobs": -rng.random(length, dtype=np.float32),
            }
            group.append(SampleWrite(f"{group_id}:{i}", group_id, settings.group_size, columns, 0, 0, length))
        groups.append(group)
    return groups


class BenchWriter:
    """Puts its pre-built groups, ``groups_per_put`` at a time; returns per-put latencies."""

    def __init__(self, store, writer: int, settings: BenchSettings) -> None:
        self._store = store
        self._groups = _make_groups(writer, settings)

    def num_bytes(self) -> int:
        return sum(arr.nbytes for group in self._groups for s in group for arr in s.columns.values())

    def run(self, start_at: float, groups_per_put: int) -> list[float]:
        time.sleep(max(0.0, start_at - time.time()))
        latencies = []
        for first in range(0, len(self._groups), groups_per_put):
            batch = [s for group in self._groups[first : first + groups_per_put] for s in group]
            t0 = time.perf_counter()
            self._store.put(batch)
            latencies.append(time.perf_counter() - t0)
        return latencies


class BenchReader:
    """Claims, reads and releases ``num_batches`` batches; returns latencies per call kind."""

    def __init__(self, store) -> None:
        self._store = store

    def run(self, start_at: float, num_batches: int, groups_per_get: int) -> dict[str, list[float]]:
        time.sleep(max(0.0, start_at - time.time()))
        latencies: dict[str, list[float]] = {"data": [], "release": []}
        num_bytes = 0
        for _ in range(num_batches):
            batch = self._store.get_batch_meta("train", COLUMNS, groups_per_get, timeout_s=_WAIT_S)
            t1 = time.perf_counter()
            rows = self._store.get_data(batch.samples, COLUMNS)
            t2 = time.perf_counter()
            self._store.release(batch.sample_ids)
            t3 = time.perf_counter()
            num_bytes += sum(arr.nbytes for row in rows for arr in row.values())
            latencies["data"].append(t2 - t1)
            latencies["release"].append(t3 - t2)
        latencies["bytes"] = [float(num_bytes)]
        return latencies


def _probe_meta_until(store, done: threading.Event, out: list[float]) -> None:
    """Time non-blocking get_batch_meta calls (task 'probe', one group) every 5 ms until ``done``."""
    while not done.wait(0.005):
        t0 = time.perf_counter()
        store.get_batch_meta("probe", COLUMNS, 1, timeout_s=0.0)
        out.append(time.perf_counter() - t0)


def _probe_idle(store, num_probes: int) -> tuple[float, float]:
    """p50 of get_batch_meta on the empty store (a full metadata round trip) and of stats."""
    meta, stats = [], []
    for _ in range(num_probes):
        t0 = time.perf_counter()
        store.get_batch_meta("probe", COLUMNS, 1, timeout_s=0.0)
        t1 = time.perf_counter()
        store.stats()
        stats.append(time.perf_counter() - t1)
        meta.append(t1 - t0)
    return _p50_ms(meta), _p50_ms(stats)


def _process_cpu_s(actor) -> float:
    return actor.__ray_call__.remote(lambda _self: time.process_time())


def _ray_system_cpu_s() -> float:
    """CPU seconds of this Ray session's raylet and GCS (best effort; 0 when not found)."""
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return 0.0
    session = node.get_session_dir_path()
    total = 0.0
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if session in cmdline and ("raylet" in cmdline or "gcs_server" in cmdline):
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def _cpu_by_role(roles: dict[str, list]) -> dict[str, float]:
    import ray

    refs = {role: [_process_cpu_s(a) for a in actors] for role, actors in roles.items()}
    cpu = {role: sum(ray.get(r, timeout=_WAIT_S)) for role, r in refs.items()}
    cpu["driver"] = time.process_time()
    cpu["raylet+gcs"] = _ray_system_cpu_s()
    return cpu


def run_config(
    num_units: int, groups_per_put: int, groups_per_get: int, settings: BenchSettings
) -> ConfigResult:
    """One store with ``num_units`` units under the full load; everything it started is stopped."""
    import ray

    from datastore import DataStoreConfig, make_datastore

    total_groups = settings.writers * settings.groups_per_writer
    num_samples = total_groups * settings.group_size
    store = make_datastore(
        DataStoreConfig(num_storage_units=num_units, capacity_samples=max(num_samples // 2, 1024))
    )
    writer_actor = ray.remote(num_cpus=0)(BenchWriter)
    reader_actor = ray.remote(num_cpus=0)(BenchReader)
    num_batches = total_groups // (settings.readers * groups_per_get)
    writers, readers = [], []
    try:
        writers = [writer_actor.remote(store, w, settings) for w in range(settings.writers)]
        readers = [reader_actor.remote(store) for _ in range(settings.readers)]
        megabytes = sum(ray.get([w.num_bytes.remote() for w in writers], timeout=_WAIT_S)) / 1e6
        roles = {
            "writers": writers,
            "readers": readers,
            "controller": [store._handles.controller],
            "units": list(store._handles.units),
        }
        idle_start = _cpu_by_role(roles)
        time.sleep(_IDLE_PROBE_S)
        cpu_before = _cpu_by_role(roles)
        idle_rate = sum(cpu_before[r] - idle_start[r] for r in cpu_before if r != "driver") / _IDLE_PROBE_S
        start_at = time.time() + 0.5  # every actor starts together, after its call has arrived
        write_refs = [w.run.remote(start_at, groups_per_put) for w in writers]
        read_refs = [r.run.remote(start_at, num_batches, groups_per_get) for r in readers]
        done, loaded_meta = threading.Event(), []
        time.sleep(max(0.0, start_at - time.time()))
        prober = threading.Thread(target=_probe_meta_until, args=(store, done, loaded_meta), daemon=True)
        prober.start()
        try:
            read_latencies = ray.get(read_refs, timeout=_WAIT_S)
            wall_s = time.time() - start_at
            put_latencies = [x for lat in ray.get(write_refs, timeout=_WAIT_S) for x in lat]
        finally:
            done.set()
            prober.join(timeout=_WAIT_S)
        cpu_after = _cpu_by_role(roles)
        read_bytes = sum(lat["bytes"][0] for lat in read_latencies)
        assert abs(read_bytes / 1e6 - megabytes) < 1e-3, (read_bytes, megabytes)
        idle_meta, idle_stats = _probe_idle(store, settings.meta_probes)
    finally:
        for actor in (*writers, *readers):
            ray.kill(actor)
        store.shutdown()
    merged = {key: [x for lat in read_latencies for x in lat[key]] for key in ("data", "release")}
    return ConfigResult(
        units=num_units,
        groups_per_put=groups_per_put,
        groups_per_get=groups_per_get,
        samples=num_samples,
        megabytes=round(megabytes, 1),
        wall_s=round(wall_s, 3),
        samples_per_s=round(num_samples / wall_s, 1),
        put_p50_ms=round(_p50_ms(put_latencies), 3),
        get_data_p50_ms=round(_p50_ms(merged["data"]), 3),
        release_p50_ms=round(_p50_ms(merged["release"]), 3),
        meta_p50_ms=round(_p50_ms(loaded_meta), 3),
        meta_idle_p50_ms=round(idle_meta, 3),
        stats_idle_p50_ms=round(idle_stats, 3),
        cpu_us_per_sample={
            role: round((cpu_after[role] - cpu_before[role]) / num_samples * 1e6, 1) for role in cpu_after
        },
        idle_cpu_us_per_sample=round(idle_rate * wall_s / num_samples * 1e6, 1),
    )


def format_table(results: list[ConfigResult]) -> str:
    header = (
        f"{'units':>5} {'put/get':>7} {'samples':>8} {'MB':>6} {'wall_s':>6} {'samples/s':>9} {'MB/s':>6} "
        f"{'put_ms':>7} {'data_ms':>7} {'rel_ms':>6} {'meta_ms':>7} {'meta_idle':>9} {'stats_idle':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.units:>5} {f'{r.groups_per_put}:{r.groups_per_get}':>7} {r.samples:>8} {r.megabytes:>6.0f} "
            f"{r.wall_s:>6.2f} {r.samples_per_s:>9.0f} {r.megabytes / r.wall_s:>6.0f} {r.put_p50_ms:>7.2f} "
            f"{r.get_data_p50_ms:>7.2f} {r.release_p50_ms:>6.2f} {r.meta_p50_ms:>7.3f} "
            f"{r.meta_idle_p50_ms:>9.3f} {r.stats_idle_p50_ms:>10.3f}"
        )
    roles = list(results[0].cpu_us_per_sample)
    lines += ["", "CPU microseconds per sample during put+get, by role (ray_idle: what the same processes"]
    lines += ["burn idle over as long, included in the roles; the rest is the store's own work)"]
    header = " ".join(f"{role:>11}" for role in [*roles, "total", "ray_idle"])
    lines.append(f"{'units':>5} {'put/get':>7} {header}")
    for r in results:
        cpu = r.cpu_us_per_sample
        cells = [f"{cpu[role]:>11.1f}" for role in roles] + [f"{sum(cpu.values()):>11.1f}"]
        cells.append(f"{r.idle_cpu_us_per_sample:>11.1f}")
        lines.append(f"{r.units:>5} {f'{r.groups_per_put}:{r.groups_per_get}':>7} {' '.join(cells)}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> BenchSettings:
    parser = argparse.ArgumentParser(prog="areal-like bench datastore", description=__doc__.split("\n")[0])
    defaults = BenchSettings()
    parser.add_argument("--units", default=",".join(map(str, defaults.units)), help="unit counts, e.g. 1,2,4")
    parser.add_argument(
        "--batches",
        default=",".join(f"{p}:{g}" for p, g in defaults.batches),
        help="groups per put : groups per get, comma-separated pairs, e.g. 4:8,8:16",
    )
    for name in (
        "writers",
        "readers",
        "groups_per_writer",
        "group_size",
        "min_tokens",
        "max_tokens",
        "meta_probes",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("units", "batches")}
    units = tuple(int(u) for u in args.units.split(","))
    batches = tuple(tuple(int(x) for x in pair.split(":")) for pair in args.batches.split(","))
    return BenchSettings(units=units, batches=batches, **fields)


def main(argv: list[str]) -> int:
    import ray

    settings = parse_args(argv)
    load_before = os.getloadavg()[0]
    owns_ray = not ray.is_initialized()
    if owns_ray:
        # "local": a fresh instance even when another one on this machine advertises its address.
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        results = []
        for per_put, per_get in settings.batches:
            for num_units in settings.units:
                results.append(run_config(num_units, per_put, per_get, settings))
                logger.info("datastore bench: %s", results[-1])
    finally:
        if owns_ray:
            ray.shutdown()
    best = max(results, key=lambda r: r.samples_per_s)
    print(
        f"datastore bench: {settings.writers} writers, {settings.readers} readers, groups of "
        f"{settings.group_size}, {settings.min_tokens}-{settings.max_tokens} tokens (int32 ids + float32 "
        f"logprobs), {os.cpu_count()} CPUs, load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after; put/get = groups per put : groups per get; latencies are p50"
    )
    print(format_table(results))
    summary = {
        "put_get_samples_per_s": best.samples_per_s,
        "best_config": {
            "units": best.units,
            "groups_per_put": best.groups_per_put,
            "groups_per_get": best.groups_per_get,
        },
        # What a metadata call costs (a non-blocking get_batch_meta round trip, median over the
        # configurations), and what it took while the best configuration's load ran on these cores.
        "meta_p50_ms": round(float(np.median([r.meta_idle_p50_ms for r in results])), 3),
        "meta_p50_ms_under_load": best.meta_p50_ms,
        "load_average": round(load_before, 2),
        "configs": [asdict(r) for r in results],
    }
    print(json.dumps(summary))
    return 0
