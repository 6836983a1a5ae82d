"""Issue 11, item 1 (part): a subscriber that stops reading is disconnected after a bounded
time, even though the broker's write to it is blocked. Before, the connection task blocked in
`write_all` with no deadline and the dead client stayed attached (with its queue and its
publishers held back) indefinitely."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from helpers import (TIMEOUT, PINGREQ_PACKET, PINGRESP, PUBACK, V311, RawClient, connect_packet, publish_packet,
                     subscribe_packet, unique, wait_until)
from test_security import Target

pytestmark = pytest.mark.millet_only("Millet's write deadline")


def _stalled_subscriber_and_flooder(b, keepalive: int):
    """A subscriber with a 4 KiB receive buffer that never reads again, on ``topic/#``, and a
    connected flooder: (dead socket, flood socket, topic, client id, a 64 KiB burst of PUBLISHes)."""
    topic = unique("stall/")
    cid = unique("stalled")
    dead = socket.socket()
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    dead.connect((b.host, b.port))
    dead.sendall(connect_packet(V311, cid, keepalive=keepalive) + subscribe_packet(1, [(topic + "/#", 0)]))
    # CONNACK (4 bytes) and SUBACK (5) are read: the subscription is in force
    # from then on (with an engine that answers later, not as soon as the
    # connection is logged). Then it never reads again.
    dead.settimeout(TIMEOUT)
    got = b""
    while len(got) < 9:
        chunk = dead.recv(9 - len(got))
        assert chunk, f"closed after {got!r}"
        got += chunk
    assert got[0] == 0x20 and got[4] == 0x90, got
    wait_until(lambda: f"as {cid} " in b.log_text(), what="stalled subscriber connected")
    flood = socket.create_connection((b.host, b.port))
    flood.sendall(connect_packet(V311, unique("flooder")))
    burst = b"".join(publish_packet(f"{topic}/{i}", b"x" * 1024) for i in range(64))
    return dead, flood, topic, cid, burst


def test_a_subscriber_that_never_reads_is_disconnected_after_1_5_keep_alive(millet_config):
    b = millet_config("")
    # The stalled subscriber: keep alive 2 s, and it never reads again.
    dead, flood, topic, cid, burst = _stalled_subscriber_and_flooder(b, keepalive=2)
    stop = threading.Event()

    def run_flood():
        flood.settimeout(0.5)
        while not stop.is_set():
            try:
                flood.sendall(burst)
            except socket.timeout:
                continue
            except OSError:
                return

    t = threading.Thread(target=run_flood, daemon=True)
    started = time.monotonic()
    t.start()
    try:
        # keep alive 2 s → no write progress for 3 s ends it (plus time to fill the buffers)
        # Whichever comes first: its keep alive (it sends nothing either; the timer runs while
        # the write waits) or the write stall limit.
        wait_until(lambda: f"Client {cid} disconnected: stopped reading" in b.log_text()
                   or f"Client {cid} disconnected: keep alive timeout" in b.log_text(), timeout=20.0,
                   what="stalled subscriber disconnected")
        elapsed = time.monotonic() - started
        assert elapsed < 15.0, elapsed
        # the others are served: a probe's PINGREQ is answered at once
        probe = RawClient(Target(b.host, b.port), V311)
        probe.connect(unique("probe"))
        t0 = time.monotonic()
        probe.send(PINGREQ_PACKET)
        probe.expect(PINGRESP, timeout=5.0)
        assert time.monotonic() - t0 < 1.0
        probe.close()
    finally:
        stop.set()
        t.join(timeout=5)
        flood.close()
        dead.close()
    assert b.alive()


def _device_rate(target, topic: str, seconds: float, devices: int = 5) -> float:
    """Total acked msg/s of `devices` QoS 1 publishers, each with one message in flight."""
    counts = [0] * devices
    stop = time.monotonic() + seconds

    def run(i):
        c = RawClient(target, V311)
        c.connect(unique(f"dev{i}"))
        pid = 0
        try:
            while time.monotonic() < stop:
                pid = pid % 65535 + 1
                c.send(publish_packet(f"{topic}/d{i}", b"reading", qos=1, pid=pid))
                c.expect(PUBACK, timeout=10.0)
                counts[i] += 1
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def test_a_subscriber_that_stopped_reading_does_not_hold_publishers_back(millet_config):
    """[issue 11, item 1] Back-pressure holds publishers only for a reader that is draining: one
    whose writes find no room is not waited for (its queue fills and drops by policy until the
    write deadline ends it). Before, five QoS 1 devices fell to ~1 msg/s each."""
    b = millet_config("")
    target = Target(b.host, b.port)
    topic = unique("fleet/")
    baseline = _device_rate(target, topic, 2.0)
    dead = socket.socket()
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    dead.connect((b.host, b.port))
    cid = unique("dead-sub")
    # keep alive 60 s: the write deadline (60 s) does not end it during the test
    dead.sendall(connect_packet(V311, cid, keepalive=60) + subscribe_packet(1, [("#", 1)]))
    wait_until(lambda: f"as {cid} " in b.log_text(), what="stalled subscriber connected")
    try:
        _device_rate(target, topic, 2.0)  # fills its socket buffers and queue
        with_dead = _device_rate(target, topic, 3.0)
    finally:
        dead.close()
    print(f"devices: {baseline:.0f} msg/s alone, {with_dead:.0f} msg/s beside a dead subscriber")
    assert with_dead >= 0.5 * baseline, f"{with_dead:.0f} msg/s with a dead subscriber vs {baseline:.0f} baseline"


def test_a_blocked_write_does_not_delay_a_takeover(millet_config):
    """While a write to a client that stopped reading waits (here for up to 60 s: keep alive 60),
    the connection still takes wake-ups: a takeover closes it at once, and the client's PINGREQs
    are still read (its keep alive does not expire)."""
    b = millet_config("")
    dead, flood, _topic, cid, burst = _stalled_subscriber_and_flooder(b, keepalive=60)
    # Fill the socket buffers both ways (a few MB is plenty with a 4 KiB receive buffer).
    for _ in range(64):
        flood.sendall(burst)
    # The broker's socket to `dead` has bytes the kernel cannot send: its writes now wait.
    wait_until(lambda: _unsent_bytes(b.port, dead.getsockname()[1]) > 0, timeout=10.0,
               what="the broker's write to the stalled client blocked")
    dead.sendall(PINGREQ_PACKET)  # read while the write waits: not an error, not a reason to close
    t0 = time.monotonic()
    thief = RawClient(Target(b.host, b.port), V311)
    thief.connect(cid)  # takeover [MQTT-3.1.4-3]
    wait_until(lambda: f"Client {cid} disconnected:" in b.log_text(), timeout=10.0,
               what="the blocked connection closed by the takeover")
    assert time.monotonic() - t0 < 5.0
    assert "stopped reading" not in b.log_text()
    thief.close()
    flood.close()
    dead.close()
    assert b.alive()


def _unsent_bytes(local_port: int, remote_port: int) -> int:
    """Send-queue bytes of the TCP socket local_port → remote_port (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, remote, queues = parts[1], parts[2], parts[4]
            if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
                return int(queues.split(":")[0], 16)
    return 0
