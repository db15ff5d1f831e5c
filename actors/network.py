"""Network helpers the actors share: a free TCP port for a rendezvous (the learner's process group, vLLM's NCCL
weight group) or a local server. No Ray here, so tests and benchmarks import it too."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port free on `host` now ("" = every interface, for a rendezvous other nodes reach; "127.0.0.1" for
    a local server). Another process may take it before the caller binds it (rare; that bind then fails)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
