"""Compatibility with what real clients and brokers send (issue 10): MQTT 3.1 DUP flags, reserved
topics ($SYS, $share) in PUBLISH, and topic sizes up to what the specs allow."""

import struct
import time

import pytest

from helpers import (
    PUBACK, PUBCOMP, PUBREC, PUBREL, SUBACK, UNSUBACK, V31, V311, V5, ack_packet, enc_str, packet,
    publish_packet, sub_opts, unique, TIMEOUT,
)

BOTH = [V311, V5]


# ---------------------------------------------------------------------------
# MQTT 3.1: DUP on PUBREL / SUBSCRIBE / UNSUBSCRIBE (item 3)
# ---------------------------------------------------------------------------


def test_v31_pubrel_with_dup_after_reconnects(raw, uid):
    """MQTT 3.1 section 3.6 lets a client set DUP on a resent PUBREL (3.1.1 forbids it,
    [MQTT-3.6.1-1]). The repro from old device fleets, with a persistent session: (1) QoS 2 PUBLISH,
    PUBREC, drop; (2) reconnect, resend the PUBLISH with DUP, PUBREC, PUBREL, PUBCOMP, drop;
    (3) reconnect and resend the PUBREL with DUP set: the server answers PUBCOMP
    ([MQTT-4.3.3-11]: PUBCOMP for a PUBREL whatever it holds) and keeps the connection."""
    cid = unique("v31dup")
    topic = f"{uid}/q2"
    r = raw(V31)
    r.connect(client_id=cid, clean=False)
    r.send(publish_packet(topic, b"m", qos=2, pid=7, version=V31))
    assert r.expect(PUBREC).ack()[0] == 7
    r.close()
    r = raw(V31)
    r.connect(client_id=cid, clean=False)
    r.send(publish_packet(topic, b"m", qos=2, dup=True, pid=7, version=V31))
    assert r.expect(PUBREC).ack()[0] == 7
    r.send(packet(PUBREL, 0x02, struct.pack("!H", 7)))
    assert r.expect(PUBCOMP).ack()[0] == 7
    r.close()
    r = raw(V31)
    r.connect(client_id=cid, clean=False)
    r.send(packet(PUBREL, 0x0A, struct.pack("!H", 7)))  # DUP | QoS 1
    assert r.expect(PUBCOMP).ack()[0] == 7
    r.publish(f"{uid}/after", b"still-open", qos=1)


def test_v31_subscribe_and_unsubscribe_with_dup(raw, uid):
    """MQTT 3.1 sections 3.8 / 3.10: a resent SUBSCRIBE or UNSUBSCRIBE may carry DUP: SUBACK and
    UNSUBACK, connection kept."""
    r = raw(V31)
    r.connect()
    r.send(packet(8, 0x0A, struct.pack("!H", 3) + enc_str(f"{uid}/s") + bytes([1])))
    pid, codes, _ = r.expect(SUBACK).suback()
    assert (pid, codes) == (3, [1])
    r.send(packet(10, 0x0A, struct.pack("!H", 4) + enc_str(f"{uid}/s")))
    assert r.expect(UNSUBACK).suback()[0] == 4
    r.publish(f"{uid}/after", b"still-open", qos=1)


def test_v311_pubrel_with_dup_is_still_malformed(raw):
    """[MQTT-3.6.1-1] / [MQTT-2.2.2-2]: in 3.1.1 PUBREL flags are exactly 0010; DUP closes the
    connection (3.1's leniency does not leak into 3.1.1)."""
    r = raw(V311)
    r.connect()
    r.send(packet(PUBREL, 0x0A, struct.pack("!H", 1)))
    assert r.wait_closed() == []


# ---------------------------------------------------------------------------
# $SYS and $share/ are not topics clients publish to (item 6)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [1, 2])
def test_v5_publish_to_sys_is_refused_with_0x87(raw, clients, qos):
    """4.7.2: "$SYS/" is the server's; a client must not be able to spoof its statistics. As
    Mosquitto does, a v5 PUBLISH there gets PUBACK / PUBREC 0x87 (Not authorized) and is not
    delivered to $SYS subscribers."""
    topic = f"$SYS/broker/forged/{unique('s')}"
    w = clients(V311)
    w.connect()
    w.subscribe(topic, 1)
    r = raw(V5)
    r.connect()
    r.send(publish_packet(topic, b"forged", qos=qos, pid=5, version=V5))
    pid, rc, _ = r.expect(PUBACK if qos == 1 else PUBREC).ack()
    assert (pid, rc) == (5, 0x87)
    w.messages.assert_no_more(0)  # fixed negative window
    r.publish(f"{topic}-ok".replace("$SYS/", "sys/"), b"still-open", qos=1)


@pytest.mark.parametrize("version", [V31, V311])
def test_v3_publish_to_sys_is_dropped_but_acknowledged(raw, clients, version):
    """3.x has no negative PUBACK: a PUBLISH to $SYS/ is dropped (QoS 1/2 still acknowledged so the
    client does not resend it forever) and the connection stays open."""
    topic = f"$SYS/broker/forged/{unique('s')}"
    w = clients(V311)
    w.connect()
    w.subscribe(topic, 1)
    r = raw(version)
    r.connect()
    r.publish(topic, b"q0", qos=0)
    r.publish(topic, b"q1", qos=1)
    r.publish(topic, b"q2", qos=2)
    w.messages.assert_no_more(0)  # fixed negative window
    r.publish(f"conf/{unique('x')}", b"still-open", qos=1)


def test_sys_retained_publish_does_not_replace_broker_state(raw, clients):
    """A retained PUBLISH to $SYS/ is refused too: nothing is stored for later subscribers."""
    topic = f"$SYS/broker/forged/{unique('r')}"
    r = raw(V5)
    r.connect()
    r.send(publish_packet(topic, b"forged", qos=1, retain=True, pid=9, version=V5))
    assert r.expect(PUBACK).ack()[:2] == (9, 0x87)
    late = clients(V311)
    late.connect()
    late.subscribe(topic, 1)
    late.messages.assert_no_more(0)  # fixed negative window: no retained message


def test_bridge_state_topic_may_be_published(raw, clients):
    """Exception kept from Mosquitto: "$SYS/broker/connection/{name}/state" is where a bridge
    publishes its own status (and sets its will), so a PUBLISH there is accepted and delivered."""
    name = unique("br")
    topic = f"$SYS/broker/connection/{name}/state"
    w = clients(V311)
    w.connect()
    w.subscribe(topic, 1)
    r = raw(V5)
    r.connect()
    r.send(publish_packet(topic, b"1", qos=1, pid=2, version=V5))
    pid, rc, _ = r.expect(PUBACK).ack()
    assert pid == 2 and rc < 0x80
    assert w.messages.wait_topic(topic)[0].payload == b"1"


@pytest.mark.millet_only(reason="Millet answers 0x90 (Topic Name invalid); Mosquitto 0x87")
@pytest.mark.parametrize("qos", [1, 2])
def test_v5_publish_to_share_prefix_is_refused_with_0x90(raw, qos):
    """4.8.2: "$share/{group}/{filter}" is subscription syntax, not a Topic Name. A v5 PUBLISH to it
    gets PUBACK / PUBREC 0x90 (Topic Name invalid; Millet's choice, Mosquitto sends 0x87) and the
    connection stays open."""
    r = raw(V5)
    r.connect()
    r.send(publish_packet("$share/g/t", b"x", qos=qos, pid=3, version=V5))
    pid, rc, _ = r.expect(PUBACK if qos == 1 else PUBREC).ack()
    assert (pid, rc) == (3, 0x90)
    r.publish(f"conf/{unique('x')}", b"still-open", qos=1)


def test_v311_publish_to_share_prefix_is_dropped(raw, clients, uid):
    """3.1.1: a PUBLISH to $share/... is dropped but acknowledged; subscribers of the shared filter
    "$share/g/{topic}" (which is topic "{topic}") get nothing."""
    w = clients(V5)
    w.connect()
    w.subscribe(f"$share/g/{uid}/t", 1)
    r = raw(V311)
    r.connect()
    r.publish(f"$share/g/{uid}/t", b"x", qos=1)
    w.messages.assert_no_more(0)  # fixed negative window
    r.publish(f"{uid}/t", b"real", qos=1)
    assert w.messages.wait_for(1)[0].payload == b"real"


@pytest.mark.millet_only(reason="Mosquitto 2.0.11 accepts the CONNECT (and drops the will later)")
def test_will_on_sys_is_refused_at_connect(raw):
    """A will is a PUBLISH made later on the client's behalf: a will topic under $SYS/ refuses the
    CONNECT (v5 0x87 Not authorized, 3.1.1 return code 5), like a will topic the ACL denies."""
    for version, rc in ((V5, 0x87), (V311, 5)):
        r = raw(version)
        r.connect(will={"topic": "$SYS/broker/uptime", "payload": b"forged"}, expect_rc=rc)
        r.close()


# ---------------------------------------------------------------------------
# Topic sizes (item 8): 65,535 bytes and 128 levels by default
# ---------------------------------------------------------------------------


def _topic(levels: int, total: int, prefix: str) -> str:
    """A topic of exactly ``levels`` levels and ``total`` bytes starting with ``prefix``/."""
    head = prefix + "/"
    n = levels - prefix.count("/") - 1
    room = total - len(head) - (n - 1)
    per, extra = divmod(room, n)
    parts = ["x" * (per + (1 if i < extra else 0)) for i in range(n)]
    t = head + "/".join(parts)
    assert len(t.encode()) == total and t.count("/") + 1 == levels
    return t


@pytest.mark.parametrize("version", BOTH)
def test_maximal_topic_and_filters_are_accepted(raw, version, uid):
    """1.5.4 / 4.7.3: a Topic Name is a UTF-8 string of up to 65,535 bytes with any number of
    levels. Millet accepts, by default, 65,535 bytes and 128 levels (EMQX's default level limit),
    and matching stays quick at that size: a maximal topic reaches an exact subscription and a
    128-level "+/.../#" filter well within the usual deadline."""
    topic = _topic(128, 65535, uid)
    wild = "/".join(["+"] * 127 + ["#"])
    sub = raw(version)
    sub.connect()
    assert sub.subscribe([(topic, sub_opts(1))]) == [1]
    sub2 = raw(version)
    sub2.connect()
    assert sub2.subscribe([(wild, sub_opts(1))]) == [1]
    pub = raw(version)
    pub.connect()
    start = time.monotonic()
    for i in range(20):
        pub.publish(topic, b"%d" % i, qos=1)
    for s in (sub, sub2):
        for i in range(20):
            m = s.recv_publish()
            assert (m.topic, m.payload) == (topic, b"%d" % i)
            s.send(ack_packet(PUBACK, m.pid, version=version))
    assert time.monotonic() - start < TIMEOUT


@pytest.mark.millet_only(reason="Millet's default max_topic_levels = 128 (Mosquitto has no level limit)")
@pytest.mark.parametrize("version", BOTH)
def test_more_than_128_levels_is_refused(raw, version, uid):
    """Beyond the configured max_topic_levels (default 128) a topic is refused: v5 PUBACK 0x90,
    3.1.1 closes the connection; a filter gets SUBACK 0x80 / 0x8F."""
    deep = "/".join([uid] + ["l"] * 128)
    r = raw(version)
    r.connect()
    codes = r.subscribe([(deep, 0), (f"{uid}/ok", 0)])
    assert codes[0] >= 0x80 and codes[1] == 0
    r.send(publish_packet(deep, b"x", qos=1, pid=4, version=version))
    if version == V5:
        assert r.expect(PUBACK).ack()[:2] == (4, 0x90)
    else:
        assert all(p.type != PUBACK for p in r.wait_closed())
