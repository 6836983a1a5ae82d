"""Overload isolation (issue 11): one client's cost stays with that client.

* Full offline queues: a publish to a topic with many offline persistent
  sessions whose queues are full costs O(1) per session, not O(queue length).
* Outbound topic aliases: many distinct topics through a small Topic Alias
  Maximum, aliases re-mapped once all are in use (MQTT 5 3.3.2.3.4).
* Memory: inbound alias topics and queued messages do not pin the read
  buffers they arrived in (broker RSS from /proc).
"""

from __future__ import annotations

import time

import pytest

from helpers import (
    CONNACK, PUBACK, PUBLISH, SUBACK, V5, V311, P_TOPIC_ALIAS, P_TOPIC_ALIAS_MAXIMUM, P_SESSION_EXPIRY,
    RawClient, ack_packet, connect_packet, disconnect_packet, publish_packet, sub_opts, subscribe_packet,
    unique,
)


def raw_session(b, cid: str, version=V311, clean=False, properties=None) -> tuple[RawClient, bool]:
    r = RawClient(b, version)
    r.send(connect_packet(version, client_id=cid, clean=clean, properties=properties))
    ack = r.expect(CONNACK).connack()
    assert ack.rc == 0, ack
    return r, ack.session_present


def publish_acked(r: RawClient, topic: str, payloads, version=V311, window: int = 64) -> None:
    """QoS 1 publishes with up to ``window`` unacknowledged; returns once all are acknowledged."""
    pending = 0
    for i, p in enumerate(payloads):
        r.send(publish_packet(topic, p, qos=1, pid=i % 65535 + 1, version=version))
        pending += 1
        if pending >= window:
            r.expect(PUBACK, timeout=60)
            pending -= 1
    for _ in range(pending):
        r.expect(PUBACK, timeout=60)


def one_at_a_time_rate(r: RawClient, topic: str, n: int) -> float:
    """Acknowledged QoS 1 messages per second, one in flight at a time (a device)."""
    t0 = time.monotonic()
    for i in range(n):
        r.send(publish_packet(topic, b"m%d" % i, qos=1, pid=i % 65535 + 1))
        pid, _, _ = r.expect(PUBACK, timeout=60).ack()
        assert pid == i % 65535 + 1
    return n / (time.monotonic() - t0)


@pytest.mark.timeout(300)
def test_full_offline_queues_do_not_slow_the_publisher(broker_factory):
    """Issue 11 item 2: 300 offline persistent sessions on one topic, each with a full queue of
    2,000 QoS 1 messages. Every further publish must cost O(1) per session: the publisher keeps
    at least 12% of its rate to a topic nobody subscribes to (measured here 0.30–0.56 with a
    fresh build competing for the cores; before: a scan of each queue for a QoS 0 message to
    displace, some 600,000 entries per publish, 0.02). The queue
    length has to be large for the old cost to show: it was sessions x queue length."""
    sessions, max_queued = 300, 2000
    b = broker_factory(max_queued=max_queued, durability="none")
    topic = "ovl/" + unique("t")
    ids = [unique("off") for _ in range(sessions)]
    for cid in ids:
        r, _ = raw_session(b, cid)
        r.send(subscribe_packet(1, [(topic, sub_opts(qos=1))]))
        r.expect(SUBACK)
        r.send(disconnect_packet())
        r.sock.close()
    pub, _ = raw_session(b, unique("pub"), clean=True)
    # Fill every queue (QoS 1 only: nothing to displace, the old worst case).
    publish_acked(pub, topic, (b"fill-%05d" % i for i in range(max_queued)))
    # Best of two runs each, interleaved: robust to a busy machine.
    n = 400
    nobody = "ovl/nobody/" + unique("x")
    base = one_at_a_time_rate(pub, nobody, n)
    loaded = one_at_a_time_rate(pub, topic, n)
    base = max(base, one_at_a_time_rate(pub, nobody, n))
    loaded = max(loaded, one_at_a_time_rate(pub, topic, n))
    print(f"publisher: {base:.0f} msg/s to no subscriber, {loaded:.0f} msg/s into "
          f"{sessions} full offline queues (ratio {loaded / base:.2f})")
    assert loaded >= 0.12 * base, (
        f"{loaded:.0f} acked msg/s into {sessions} full offline queues vs {base:.0f} msg/s baseline")
    if not b.is_mosquitto:
        # Throttled: at most one line a minute per session, at most 10 such lines a minute
        # broker-wide (before: one line per session, 300 here).
        with open(b.log_path, errors="replace") as f:
            lines = [ln for ln in f if "session queue full" in ln]
        assert 1 <= len(lines) <= 10, f"{len(lines)} queue-full lines"
    # The sessions kept what they queued: the first max_queued messages, in order.
    for cid in ids[:3]:
        r, present = raw_session(b, cid)
        assert present
        got = []
        while len(got) < max_queued:
            p = r.expect(PUBLISH, timeout=30).publish()
            got.append(p.payload)
            r.send(ack_packet(PUBACK, p.pid))
        assert got == [b"fill-%05d" % i for i in range(max_queued)]
        r.assert_silent()
        r.send(disconnect_packet())
        r.sock.close()


@pytest.mark.millet_only("Mosquitto 2.0 sends no topic aliases to clients")
def test_outbound_topic_aliases_are_reused_past_the_maximum(broker_factory):
    """Issue 11 item 4: a v5 subscriber with Topic Alias Maximum 10 receives 1,200 distinct
    topics (and repeats of a few hot ones). Aliases stay within 1..10 and are re-mapped by a
    PUBLISH carrying both topic and alias; resolving them as a client must gives back every
    topic name exactly. (paho-mqtt 2.1 does not resolve incoming aliases, so the subscriber is
    a raw client doing what the spec asks of a receiver.)"""
    b = broker_factory()
    prefix = "alias/" + unique("t")
    sub, _ = raw_session(b, unique("sub"), V5, clean=True, properties={P_TOPIC_ALIAS_MAXIMUM: 10})
    sub.send(subscribe_packet(1, [(prefix + "/#", sub_opts(qos=0))], version=V5))
    sub.expect(SUBACK)
    pub, _ = raw_session(b, unique("pub"), V5, clean=True)
    sent = []
    for i in range(1200):
        sent.append(f"{prefix}/d{i}")
        if i % 3 == 0:
            sent.append(f"{prefix}/hot{i % 2}")
    # QoS 1 with a window keeps the publisher within the broker's receive maximum.
    pending = 0
    for i, t in enumerate(sent):
        pub.send(publish_packet(t, b"%d" % i, qos=1, pid=i % 65535 + 1, version=V5))
        pending += 1
        if pending >= 32:
            pub.expect(PUBACK)
            pending -= 1
    for _ in range(pending):
        pub.expect(PUBACK)
    mapping: dict[int, str] = {}
    received, aliased, remapped = [], 0, 0
    while len(received) < len(sent):
        p = sub.expect(PUBLISH, timeout=10).publish()
        alias = p.props.get(P_TOPIC_ALIAS)
        topic = p.topic
        if alias is not None:
            assert 1 <= alias <= 10, f"alias {alias} beyond the client's maximum"
            if topic:
                remapped += alias in mapping
                mapping[alias] = topic
            else:
                assert alias in mapping, f"alias {alias} used before being mapped"
                topic = mapping[alias]
                aliased += 1
        received.append((topic, p.payload))
    assert received == [(t, b"%d" % i) for i, t in enumerate(sent)]
    assert remapped > 1000, f"only {remapped} aliases re-mapped"
    assert aliased > 0, "no PUBLISH used an existing alias"
    sub.assert_silent()


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.millet_only("measures the Millet process's memory")
def test_inbound_aliases_and_queued_messages_do_not_pin_read_buffers(broker_factory):
    """Issue 11 item 5: 20 v5 connections each define 10 topic aliases, each in a PUBLISH of
    about 256 KiB (so each alias topic is decoded from its own large read buffer), and an offline
    session queues 200 small messages each read along with 256 KiB of padding. Slices would pin
    20 x 10 x 256 KiB + 200 x 256 KiB, about 100 MiB; copies cost a few KiB."""
    b = broker_factory(durability="none")
    pid = b.proc.pid
    prefix = "pin/" + unique("t")
    off_id = unique("off")
    r, _ = raw_session(b, off_id, V5, properties={P_SESSION_EXPIRY: 600})
    r.send(subscribe_packet(1, [(prefix + "/q/#", sub_opts(qos=1))], version=V5))
    r.expect(SUBACK)
    r.send(disconnect_packet(V5))
    r.sock.close()
    conns = [raw_session(b, unique("al"), V5, clean=True)[0] for _ in range(20)]
    before = vm_rss_kib(pid)
    pad = bytes(256 * 1024)
    for c in conns:
        for alias in range(1, 11):
            c.send(publish_packet(f"{prefix}/nobody/{alias}", pad, qos=1, pid=alias, version=V5,
                                  properties={P_TOPIC_ALIAS: alias}))
            c.expect(PUBACK)
    q = conns[0]
    for i in range(200):
        q.send(publish_packet(f"{prefix}/pad", pad, qos=0, version=V5)
               + publish_packet(f"{prefix}/q/{i}", b"small", qos=1, pid=i + 1, version=V5))
        q.expect(PUBACK)
    # Each connection still resolves its aliases.
    for c in conns:
        c.send(publish_packet("", b"x", qos=1, pid=99, version=V5, properties={P_TOPIC_ALIAS: 3}))
        _, rc, _ = c.expect(PUBACK).ack()
        assert rc in (0, 0x10), rc
    grown = vm_rss_kib(pid) - before
    print(f"broker RSS grew by {grown} KiB")
    assert grown < 40 * 1024, f"RSS grew by {grown} KiB: read buffers pinned"
    # The offline session gets its messages.
    r, present = raw_session(b, off_id, V5, properties={P_SESSION_EXPIRY: 600})
    assert present
    for i in range(200):
        p = r.expect(PUBLISH).publish()
        assert (p.topic, p.payload) == (f"{prefix}/q/{i}", b"small")
        r.send(ack_packet(PUBACK, p.pid, version=V5))
