"""Small network helpers shared by both meshes."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port that is free on ``host`` now ('' = every interface). Another process may take it
    before the caller binds it; callers that rendezvous on it retry or fail with a timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
