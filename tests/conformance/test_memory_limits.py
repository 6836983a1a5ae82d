"""Issue 11 items 6 and 7: memory is bounded in bytes, per session and broker-wide, and repeated
SUBSCRIBEs with many retained messages cost bounded work.

* ``max_queued_bytes``: a session queue holds at most that many bytes (topic + payload).
* QoS 0 is not queued for a session with no connection attached (``queue_qos0_offline``).
* ``memory_budget``: above 90% new sessions get CONNACK 0x97 (3.x: 3) and QoS 0 deliveries are
  dropped; at 100% QoS 1/2 PUBLISH gets PUBACK 0x97 (v5) or the 3.x publisher is disconnected.
* ``max_sessions``, ``max_retained_messages`` / ``max_retained_bytes``.
* ``max_session_expiry`` defaults to 7 days (announced in the v5 CONNACK).
* A client re-sending SUBSCRIBE to a filter matching 100,000 retained messages: repeats are
  coalesced while a replay is under way, the broker's CPU stays bounded and a probe's PINGREQ
  round trip stays fast; the retained messages are still re-sent after the last SUBSCRIBE.
"""

from __future__ import annotations

import threading
import time

import pytest

from helpers import (
    CONNACK, PINGREQ_PACKET, PINGRESP, PUBACK, PUBLISH, SUBACK, V5, V311, P_SESSION_EXPIRY,
    RawClient, ack_packet, connect_packet, disconnect_packet, publish_packet, sub_opts,
    subscribe_packet, unique, wait_until,
)

pytestmark = pytest.mark.millet_only("Millet's memory limits")


def connect(b, cid: str, version=V311, clean=True, expiry: int | None = None):
    r = RawClient(b, version)
    props = {P_SESSION_EXPIRY: expiry} if (version == V5 and expiry is not None) else None
    r.send(connect_packet(version, client_id=cid, clean=clean, properties=props))
    return r, r.expect(CONNACK).connack()


def offline_subscriber(b, cid: str, topic: str, version=V311, qos=1) -> None:
    r, ack = connect(b, cid, version, clean=False, expiry=600)
    assert ack.rc == 0, ack
    r.send(subscribe_packet(1, [(topic, sub_opts(qos=qos))], version=version))
    r.expect(SUBACK)
    r.send(disconnect_packet(version))
    # Offline once the server closed the connection: a message published
    # (on another node, in the cluster subset) before it handled the
    # DISCONNECT would still find the session connected.
    r.wait_closed()
    r.sock.close()


def acked(r: RawClient, topic: str, payload: bytes, pid: int, version=V311, retain=False) -> int:
    """One QoS 1 publish; the PUBACK reason code."""
    r.send(publish_packet(topic, payload, qos=1, pid=pid, version=version, retain=retain))
    got, rc, _ = r.expect(PUBACK, timeout=30).ack()
    assert got == pid
    return rc


def read_until(r: RawClient, topic: str, version=V311, timeout=30.0) -> list:
    """PUBLISH packets up to and including the one on ``topic`` (QoS 1 ones acknowledged)."""
    out = []
    while True:
        p = r.expect(PUBLISH, timeout=timeout).publish()
        if p.qos:
            r.send(ack_packet(PUBACK, p.pid, version=version))
        out.append(p)
        if p.topic == topic:
            return out


def test_session_queue_is_bounded_in_bytes(millet_config):
    """50 QoS 1 messages of 100 kB for an offline session with ``max_queued_bytes`` 1 MiB: the
    first 10 are kept (10 x 100 kB fits, 11 does not), then a small marker still fits. Before:
    only the message count (10,000) limited the queue, and all 50 (5 MB) were kept."""
    b = millet_config("[limits]\nmax_queued_bytes = 1048576\n", args=["--durability", "none"])
    root = unique("qb")
    cid = unique("off")
    offline_subscriber(b, cid, f"{root}/#")
    pub, _ = connect(b, unique("pub"))
    big = bytes(100_000)
    for i in range(50):
        assert acked(pub, f"{root}/big", big, i + 1) == 0
    acked(pub, f"{root}/marker", b"m", 99)
    sub, ack = connect(b, cid, clean=False)
    assert ack.session_present
    got = read_until(sub, f"{root}/marker")
    assert len(got) == 11, f"{len(got) - 1} messages of 100 kB kept under a 1 MiB byte limit"
    assert b.alive()


@pytest.mark.parametrize("queue_qos0", [False, True])
def test_qos0_is_not_queued_for_offline_sessions_by_default(millet_config, queue_qos0):
    """Like Mosquitto (``queue_qos0_messages false``): QoS 0 messages published while a
    persistent session has no connection are not kept for it; QoS 1 are. With
    ``queue_qos0_offline = true`` they are queued. Before: always queued."""
    b = millet_config(f"[limits]\nqueue_qos0_offline = {str(queue_qos0).lower()}\n",
                      args=["--durability", "none"])
    root = unique("q0")
    cid = unique("off")
    offline_subscriber(b, cid, f"{root}/#")
    pub, _ = connect(b, unique("pub"))
    pub.send(b"".join(publish_packet(f"{root}/zero", b"z%d" % i) for i in range(5)))
    acked(pub, f"{root}/marker", b"m", 1)
    sub, ack = connect(b, cid, clean=False)
    assert ack.session_present
    got = read_until(sub, f"{root}/marker")
    zeros = [p.payload for p in got if p.topic == f"{root}/zero"]
    assert zeros == ([b"z%d" % i for i in range(5)] if queue_qos0 else [])


def test_memory_budget_refuses_new_sessions_then_qos0_then_qos1(millet_config):
    """``memory_budget`` 4 MiB. An offline session accumulates 256 KiB QoS 1 messages. Above 90%:
    a new session gets CONNACK 0x97 (v5) / 3 (3.1.1), and QoS 0 to an online subscriber is
    dropped while QoS 1 still goes through. At 100%: QoS 1 PUBLISH gets PUBACK 0x97 (v5); a
    3.1.1 publisher is disconnected rather than acknowledged. Once the session drains, new
    sessions are accepted again. Before: no budget at all."""
    b = millet_config("[limits]\nmemory_budget = 4194304\n", args=["--durability", "none"])
    root = unique("mb")
    cid = unique("off")
    offline_subscriber(b, cid, f"{root}/fill", V5)
    online, _ = connect(b, unique("on"), V5)
    online.send(subscribe_packet(1, [(f"{root}/live", sub_opts(qos=1))], version=V5))
    online.expect(SUBACK)
    pub, _ = connect(b, unique("pub"), V5)
    p3, ack = connect(b, unique("p3"), V311)
    assert ack.rc == 0
    chunk = bytes(256 * 1024)
    # 14 x 256 KiB = 3.5 MiB < 90% of 4 MiB (3.6 MiB); the 15th crosses the high watermark.
    for i in range(15):
        assert acked(pub, f"{root}/fill", chunk, i + 1, V5) == 0
    _, ack = connect(b, unique("new"), V5)
    assert ack.rc == 0x97, f"new v5 session above the high watermark: CONNACK {ack.rc:#x}"
    _, ack = connect(b, unique("new"), V311)
    assert ack.rc == 3, f"new 3.1.1 session above the high watermark: CONNACK {ack.rc}"
    # QoS 0 dropped first; QoS 1 still accepted and delivered.
    pub.send(publish_packet(f"{root}/live", b"zero", version=V5))
    assert acked(pub, f"{root}/live", b"one", 100, V5) == 0
    p = online.expect(PUBLISH).publish()
    assert p.payload == b"one", f"QoS 0 delivered above the high watermark: {p}"
    online.send(ack_packet(PUBACK, p.pid, version=V5))
    # The 16th reaches the budget: from then on QoS 1 is refused with 0x97.
    rcs = [acked(pub, f"{root}/fill", chunk, 200 + i, V5) for i in range(3)]
    assert rcs == [0, 0x97, 0x97], f"QoS 1 at the memory budget: PUBACK reason codes {rcs}"
    # 3.1.1 has no negative PUBACK: the publisher is disconnected, never acknowledged.
    p3.send(publish_packet(f"{root}/x", b"v3", qos=1, pid=7))
    seen = p3.wait_closed(timeout=10)
    assert not any(x.type == PUBACK for x in seen), f"3.1.1 publish acknowledged at the budget: {seen}"
    # The offline session drains: memory is released, new sessions and QoS 1 are accepted again.
    r, ack = connect(b, cid, V5, clean=False, expiry=600)
    assert ack.rc == 0 and ack.session_present
    for _ in range(16):
        p = r.expect(PUBLISH, timeout=30).publish()
        assert p.topic == f"{root}/fill"
        r.send(ack_packet(PUBACK, p.pid, version=V5))
    wait_until(lambda: connect(b, unique("again"), V5)[1].rc == 0, timeout=10,
               what="a new session accepted after the queue drained")
    assert acked(pub, f"{root}/fill", b"x", 300, V5) == 0
    assert b.alive()


def test_max_sessions(millet_config):
    """``max_sessions`` 3: a fourth new session is refused (v5 0x97, 3.1.1 3); an existing
    session may still reconnect. Before: no limit."""
    b = millet_config("[limits]\nmax_sessions = 3\n", args=["--durability", "none"])
    ids = [unique("s") for _ in range(3)]
    conns = []
    for cid in ids:
        r, ack = connect(b, cid, V5, clean=False, expiry=600)
        assert ack.rc == 0
        conns.append(r)
    _, ack = connect(b, unique("s"), V5)
    assert ack.rc == 0x97
    _, ack = connect(b, unique("s"), V311)
    assert ack.rc == 3
    # takeover of an existing session is not a new session
    _, ack = connect(b, ids[0], V5, clean=False, expiry=600)
    assert ack.rc == 0 and ack.session_present


def test_retained_caps(millet_config):
    """``max_retained_messages`` 5 and ``max_retained_bytes`` 20,000: a sixth retained topic is not
    stored (v5 QoS 1: PUBACK 0x97); replacing and deleting an existing one always works, and a
    deletion makes room. A new topic that would pass the byte cap is refused too. Before: no cap."""
    b = millet_config("[limits]\nmax_retained_messages = 5\nmax_retained_bytes = 20000\n",
                      args=["--durability", "none"])
    root = unique("rc")
    pub, _ = connect(b, unique("pub"), V5)
    for i in range(5):
        assert acked(pub, f"{root}/{i}", b"v", i + 1, V5, retain=True) in (0, 0x10)
    assert acked(pub, f"{root}/5", b"v", 6, V5, retain=True) == 0x97
    assert acked(pub, f"{root}/0", b"replaced", 7, V5, retain=True) in (0, 0x10)
    assert acked(pub, f"{root}/1", b"", 8, V5, retain=True) in (0, 0x10)  # delete
    assert acked(pub, f"{root}/5", b"v", 9, V5, retain=True) in (0, 0x10)
    assert acked(pub, f"{root}/1", bytes(30_000), 10, V5, retain=True) == 0x97  # bytes cap
    sub, _ = connect(b, unique("sub"), V5)
    sub.send(subscribe_packet(1, [(f"{root}/+", sub_opts(qos=0))], version=V5))
    sub.expect(SUBACK)
    got = {}
    for _ in range(5):
        p = sub.expect(PUBLISH).publish()
        got[p.topic] = p.payload
    assert got == {f"{root}/0": b"replaced", f"{root}/2": b"v", f"{root}/3": b"v",
                   f"{root}/4": b"v", f"{root}/5": b"v"}
    sub.assert_silent()


def test_session_expiry_is_capped_by_default(broker_factory):
    """A v5 client asking for a session that never expires (0xFFFFFFFF) is granted 7 days, and
    told so in the CONNACK [MQTT-3.2.2-?: Session Expiry Interval property]. Before: granted."""
    b = broker_factory(durability="none")
    _, ack = connect(b, unique("exp"), V5, clean=True, expiry=0xFFFFFFFF)
    assert ack.rc == 0
    assert ack.props.get(P_SESSION_EXPIRY) == 7 * 24 * 3600, ack.props


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    import os
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


RETAINED = 100_000
REPEATS = 300


@pytest.mark.timeout(120)
def test_repeated_subscribe_with_many_retained_costs_bounded_work(millet_config):
    """100,000 retained messages; a client sends one SUBSCRIBE to a filter matching them all,
    then 300 more. Repeats while the replay is under way are coalesced into one replay after
    it: the client receives the retained messages exactly twice (so again after its last
    SUBSCRIBE [MQTT-3.3.1-9], [MQTT-3.8.4-?]), the broker spends well under 3 s of CPU, and a
    probe client's PINGREQ round trip stays under 50 ms p99 throughout. Before: each SUBSCRIBE
    scanned and queued all 100,000 again (30 million deliveries)."""
    b = millet_config("", args=["--durability", "none"])
    pid = b.proc.pid
    root = unique("rr")
    payload = bytes(200)  # a replay far bigger than the socket buffers
    topic = lambda i: f"{root}/d{i:06d}"  # noqa: E731 (fixed length: fixed packet size)
    pub, _ = connect(b, unique("pub"))
    for start in range(0, RETAINED, 10_000):
        pub.send(b"".join(publish_packet(topic(i), payload, retain=True)
                          for i in range(start, start + 10_000)))
    acked(pub, f"{root}/zz-marker", b"m", 1, retain=True)  # every retained message above is stored by now
    publish_size = len(publish_packet(topic(0), payload, retain=True))
    sub, _ = connect(b, unique("sub"))
    probe, _ = connect(b, unique("probe"))
    received = [0]
    stop = threading.Event()

    def reader():
        s = sub.sock
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                n = len(s.recv(1 << 20))
            except OSError:
                continue
            if n == 0:
                return
            received[0] += n

    rtts: list[float] = []

    def prober():
        # 300 round trips, 3 ms apart: they span the SUBSCRIBEs and both replays.
        for _ in range(300):
            t = time.monotonic()
            probe.send(PINGREQ_PACKET)
            probe.expect(PINGRESP, skip_pingresp=False, timeout=10)
            rtts.append(time.monotonic() - t)
            time.sleep(0.003)

    flt = f"{root}/+"
    idle = []
    for _ in range(30):  # the machine's own latency, for the record
        t = time.monotonic()
        probe.send(PINGREQ_PACKET)
        probe.expect(PINGRESP, skip_pingresp=False)
        idle.append(time.monotonic() - t)
    first = subscribe_packet(1, [(flt, 0)])
    repeats = b"".join(subscribe_packet(2 + i, [(flt, 0)]) for i in range(REPEATS))
    cpu0 = cpu_seconds(pid)
    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=prober, daemon=True)]
    for t in threads:
        t.start()
    sub.send(first)
    sub.send(repeats)
    # Retained markers: the "zz-marker" matches the filter too (QoS 1 stored, sent at QoS 0).
    marker = len(publish_packet(f"{root}/zz-marker", b"m", retain=True))
    suback = 5
    want = (REPEATS + 1) * suback + 2 * (RETAINED * publish_size + marker)
    try:
        ok = wait_until(lambda: received[0] >= want, timeout=20, what="two full replays")
    except AssertionError:
        ok = False
    finally:
        cpu = cpu_seconds(pid) - cpu0
        threads[1].join(timeout=15)
        stop.set()
        threads[0].join(timeout=15)
    worst = sorted(range(len(rtts)), key=lambda i: -rtts[i])[:3]
    rtts.sort()
    p99 = rtts[int(len(rtts) * 0.99) - 1] if rtts else float("inf")
    print(f"broker CPU {cpu:.2f} s, {len(rtts)} probe round trips, p99 {p99 * 1000:.1f} ms, "
          f"max {rtts[-1] * 1000:.1f} ms; idle max {max(idle) * 1000:.1f} ms; worst at {worst}")
    assert ok, f"two full replays not received: {received[0]} of {want} bytes"
    assert len(rtts) == 300, f"the probe completed {len(rtts)} of 300 round trips (starved)"
    assert cpu < 3.0, f"the broker spent {cpu:.1f} s of CPU on {REPEATS + 1} SUBSCRIBEs"
    assert p99 < 0.050, f"probe PINGREQ p99 {p99 * 1000:.1f} ms"
    assert b.alive()
