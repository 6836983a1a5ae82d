"""The engine seam (docs/DESIGN.md, "The engine seam").

The protocol waits for the engine's answers (attach, subscribe, unsubscribe)
in explicit pending states and handles what the client sent meanwhile in
order. These tests pipeline packets behind each of those calls; they run in
the plain suite (the embedded engine answers at once) and again, in
scripts/test.sh, with every engine call answered after a random 0-20 ms delay
(MILLET_ENGINE__TEST_DELAY_MS=20), where the pipelined packets really wait.
"""

import os

import pytest

from helpers import (
    CONNACK, NEGATIVE_WINDOW, PINGRESP, PUBLISH, V5, V311, RawClient, connect_packet, packet,
    publish_packet, subscribe_packet, unique, unsubscribe_packet,
)

PING = packet(12, 0, b"")


@pytest.mark.parametrize("version", [V311, V5])
def test_packets_pipelined_behind_connect_and_subscribe_are_handled_in_order(broker, version):
    # One write: CONNECT, SUBSCRIBE, a QoS 1 PUBLISH to the subscribed topic,
    # UNSUBSCRIBE, a second PUBLISH, PINGREQ. Each waits for the engine's
    # answer to the one before: the first publish must reach the new
    # subscription [MQTT-3.8.4-1..3] and the second must not (it comes after
    # UNSUBACK [MQTT-3.10.4-2]); the answers come in order [MQTT-4.6.0].
    topic = unique("seam/pipe")
    c = RawClient(broker, version)
    try:
        c.send(connect_packet(version, client_id=unique("pipe"))
               + subscribe_packet(1, [(topic, 1)], version)
               + publish_packet(topic, b"one", qos=1, pid=2, version=version)
               + unsubscribe_packet(3, [topic], version)
               + publish_packet(topic, b"two", qos=1, pid=4, version=version)
               + PING)
        # Control packets come in order; the message to ourselves may come
        # before or after any of them (Millet writes control packets first).
        control, payloads = [], []
        while not control or control[-1].type != PINGRESP:
            p = c.recv()
            assert p is not None, f"closed after {[x.name for x in control]}"
            if p.type == PUBLISH:
                payloads.append(p.publish().payload)
            else:
                control.append(p)
        names = [p.name for p in control]
        assert names == ["CONNACK", "SUBACK", "PUBACK", "UNSUBACK", "PUBACK", "PINGRESP"], names
        assert control[0].connack().rc == 0
        assert control[1].suback()[:2] == (1, [1])
        assert control[2].ack()[0] == 2 and control[4].ack()[0] == 4
        assert control[3].unsuback()[0] == 3
        # "one" reached the subscription; "two" came after UNSUBACK: not delivered.
        while len(payloads) < 1:
            p = c.recv()
            assert p is not None and p.type == PUBLISH, p
            payloads.append(p.publish().payload)
        try:
            extra = c.recv(timeout=NEGATIVE_WINDOW)
        except TimeoutError:
            extra = None
        if extra is not None and extra.type == PUBLISH:
            payloads.append(extra.publish().payload)
        assert payloads == [b"one"], payloads
    finally:
        c.sock.close()


def test_takeover_while_attaching_leaves_one_connection(broker):
    # Two connections with one client id, CONNECT sent back to back: the
    # engine attaches them in some order; the first attached is taken over
    # (0x8E for v5) and exactly one stays [MQTT-3.1.4-3].
    cid = unique("race")
    a = RawClient(broker, V5)
    b = RawClient(broker, V5)
    try:
        a.send(connect_packet(V5, client_id=cid))
        b.send(connect_packet(V5, client_id=cid))
        # Each CONNECT is answered: a CONNACK, or, for the one attached
        # first, possibly only its takeover (DISCONNECT 0x8E or a close) when
        # the second attach came before its CONNACK was written. Once both
        # are answered, both have been attached.
        first = [a.recv(), b.recv()]
        acked = [p is not None and p.type == CONNACK for p in first]
        assert any(acked), f"neither CONNECT was accepted: {first}"
        for c, ok in zip((a, b), acked):
            if ok:
                c.send(PING)
        alive = []
        for c, ok in zip((a, b), acked):
            if not ok:
                continue
            p = c.recv()
            while p is not None and p.type not in (PINGRESP, 14):
                p = c.recv()
            if p is not None and p.type == PINGRESP:
                alive.append(c)
        assert len(alive) == 1, "exactly one connection per client id survives"
    finally:
        a.sock.close()
        b.sock.close()


def test_delaying_engine_is_on_when_asked(broker):
    # The delayed run must really run on the delaying engine (a run that
    # silently used the embedded engine would prove nothing).
    if not os.environ.get("MILLET_ENGINE__TEST_DELAY_MS"):
        pytest.skip("plain run: the embedded engine")
    c = RawClient(broker, V311)
    try:
        c.send(connect_packet(V311, client_id=unique("d")))
        assert c.recv().type == CONNACK
    finally:
        c.sock.close()
    with open(broker.log_path, errors="replace") as f:
        assert "answered after a random delay" in f.read()
