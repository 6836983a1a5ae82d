"""Graceful drain: on SIGTERM / SIGINT Millet stops accepting, sends DISCONNECT 0x8B (server
shutting down) to MQTT 5 clients, closes 3.1.1 connections, flushes and exits 0."""

import signal
import socket

import pytest

from helpers import DISCONNECT, V311, V5, RawClient, unique

pytestmark = pytest.mark.millet_only(reason="Millet's drain behaviour (Mosquitto closes without DISCONNECT)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_drain_sends_0x8b_to_v5_and_exits_cleanly(broker_factory, sig):
    """[MQTT-4.13.2-1] the server may send DISCONNECT before closing; Millet's drain sends
    reason 0x8B (Server shutting down) to v5 clients and closes 3.1.1 clients plainly."""
    b = broker_factory()
    v5 = RawClient(b, V5)
    v5.connect(client_id=unique("drain5"))
    v3 = RawClient(b, V311)
    v3.connect(client_id=unique("drain3"))
    b.proc.send_signal(sig)
    seen = v5.wait_closed()
    disconnects = [p for p in seen if p.type == DISCONNECT]
    assert disconnects, f"expected DISCONNECT 0x8B before close, got {seen!r}"
    rc, _ = disconnects[0].disconnect()
    assert rc == 0x8B
    assert [p for p in v3.wait_closed() if p.type == DISCONNECT] == [], "no DISCONNECT in 3.1.1"
    assert b.proc.wait(timeout=10) == 0
    with pytest.raises(OSError):
        socket.create_connection((b.host, b.port), timeout=2).close()
