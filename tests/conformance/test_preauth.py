"""Issue 11, item 8: memory that unauthenticated connections can hold is bounded, each
(`limits.max_connect_packet_size`, checked from the fixed header) and in total
(`limits.preauth_memory`), while well-behaved clients keep connecting."""

from __future__ import annotations

import socket

import pytest

from helpers import V311, enc_varint
from test_security import raw_connack

pytestmark = pytest.mark.millet_only("Millet's pre-authentication limits")


def _partial_connect(host: str, port: int, remaining: int, send: int) -> socket.socket:
    """A CONNECT whose fixed header announces `remaining` bytes, of which `send` are sent."""
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"\x10" + enc_varint(remaining) + b"\x00" * send)
    return s


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(16) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_an_oversized_connect_is_refused_from_its_fixed_header(millet_config):
    b = millet_config("[limits]\nmax_connect_packet_size = 65536\n")
    s = _partial_connect(b.host, b.port, 1_000_000, 100)
    try:
        assert _closed_within(s, 5.0), "a 1 MB CONNECT was buffered instead of refused"
    finally:
        s.close()
    assert raw_connack(b, V311) == 0


def test_connections_hogging_the_preauth_budget_are_closed_not_the_others(millet_config):
    b = millet_config("[limits]\nmax_connect_packet_size = 65536\npreauth_memory = 1048576\n")
    hogs = [_partial_connect(b.host, b.port, 60_000, 50_000) for _ in range(40)]
    try:
        closed = sum(_closed_within(s, 1.0) for s in hogs)
        # 40 × ≥ 50 KB of read buffer would be ≥ 2 MB: only those fitting in 1 MiB stay
        assert 20 <= closed < 40, f"{closed} of 40 budget hogs closed"
        # a well-behaved client's small CONNECT does not draw on the budget
        assert raw_connack(b, V311) == 0
        assert "preauth_memory" in b.log_text()
    finally:
        for s in hogs:
            s.close()
    assert b.alive()
