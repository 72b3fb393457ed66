"""The datastore's wire servers hold against strangers: loopback only when every actor is on one
node, unauthenticated connections closed after a short handshake deadline, a cap on connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest

from datastore import wire
from datastore.wire import WireClient, WireError, WireServer

SECRET = b"s" * 32


class _Echo:
    def echo(self, x):
        return x


@contextlib.contextmanager
def serving(handler=None, methods=frozenset({"echo"}), **options):
    """A WireServer for ``handler`` (an echo by default) on 127.0.0.1 in a thread of its own;
    yields (server, endpoint)."""
    loop = asyncio.new_event_loop()
    started: dict = {}

    def serve():
        asyncio.set_event_loop(loop)
        server = started["server"] = WireServer(handler or _Echo(), set(methods), SECRET, **options)
        started["endpoint"] = loop.run_until_complete(server.start("127.0.0.1", "node-a"))
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while "endpoint" not in started:
        thread.join(0.01)
    try:
        yield started["server"], started["endpoint"]
    finally:
        asyncio.run_coroutine_threadsafe(started["server"].close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_connection_that_does_not_authenticate_is_closed_after_the_handshake_deadline():
    assert wire.HANDSHAKE_TIMEOUT_S <= 5.0
    with serving(handshake_timeout_s=0.5) as (_, endpoint):
        stranger = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
        assert len(stranger.recv(64)) == 32  # the nonce
        started = time.monotonic()
        assert stranger.recv(64) == b""  # closed by the server, nothing unpickled
        assert time.monotonic() - started < 2.0
        stranger.close()


def test_connections_past_the_cap_are_closed_and_room_comes_back():
    with serving(max_connections=2) as (server, endpoint):
        clients = [WireClient(SECRET, "node-b") for _ in range(3)]  # node-b: over TCP
        assert [c.call(endpoint, "echo", (i,), timeout_s=10) for i, c in enumerate(clients[:2])] == [0, 1]
        with pytest.raises(WireError):
            clients[2].call(endpoint, "echo", (2,), timeout_s=10)
        assert server.num_refused >= 1
        clients[0]._drop(endpoint)  # a client leaves: its slot frees up
        deadline = time.monotonic() + 5
        while server.num_connections >= 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clients[2].call(endpoint, "echo", (2,), timeout_s=10) == 2


@pytest.mark.parametrize("bind", ["auto", "node"])
def test_on_one_node_the_store_listens_on_loopback_only(ray_local, bind):
    import ray

    from datastore import DataStoreConfig, make_datastore

    store = make_datastore(DataStoreConfig(num_storage_units=1, bind=bind))
    try:
        endpoints = [store._handles.controller_endpoint, *store._handles.unit_endpoints]
        node_ip = ray.util.get_node_ip_address()
        if bind == "node":
            assert {e.host for e in endpoints} == {node_ip}
            return
        assert {e.host for e in endpoints} == {"127.0.0.1"}
        for endpoint in endpoints:
            with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as ok:
                assert len(ok.recv(64)) == 32
            if node_ip != "127.0.0.1":
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((node_ip, endpoint.port), timeout=10)
        assert store.stats().num_samples == 0  # the store works
    finally:
        store.shutdown()
