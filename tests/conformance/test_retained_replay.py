"""Issue 11, item 7: a new subscriber receives every matching retained message, paced by its
flow control, not cut at `max_queued` (before: exactly 10,000 of 30,000 arrived; Mosquitto
delivered them all)."""

from __future__ import annotations

import time

import pytest

from helpers import PUBLISH, V311, RawClient, publish_packet, subscribe_packet, unique
from test_security import Target

pytestmark = pytest.mark.millet_only("Millet's queue limits and retained replay")

RETAINED = 30_000


def test_a_new_subscriber_gets_every_retained_message(millet_config):
    b = millet_config("", args=["--durability", "none", "--max-queued", "10000"])
    target = Target(b.host, b.port)
    root = unique("fleet")
    pub = RawClient(target, V311)
    pub.connect(unique("pub"))
    pub.send(b"".join(publish_packet(f"{root}/d{i}/state", b"on", retain=True) for i in range(RETAINED)))
    # a QoS 1 round trip after the burst: every retained message above is stored by then
    pub.send(publish_packet(f"{root}/marker", b"m", qos=1, pid=1, retain=True))
    pub.expect(4, timeout=30.0)  # PUBACK
    pub.close()
    sub = RawClient(target, V311)
    sub.connect(unique("sub"))
    sub.send(subscribe_packet(1, [(f"{root}/+/state", 0)]))
    topics = set()
    deadline = time.monotonic() + 60
    while len(topics) < RETAINED and time.monotonic() < deadline:
        try:
            p = sub.recv(timeout=5.0)
        except TimeoutError:
            break  # nothing more is coming
        if p is None:
            break
        if p.type == PUBLISH:
            topics.add(p.publish().topic)
    sub.close()
    assert len(topics) == RETAINED, f"{len(topics)} of {RETAINED} retained messages delivered"
    assert b.alive()
