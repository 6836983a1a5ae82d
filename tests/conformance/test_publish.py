"""PUBLISH at QoS 0/1/2 in both directions, QoS downgrade, wire-level flow checks, ordering."""

import pytest

from helpers import (
    PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, V31, V311, V5, ack_packet, enc_str, publish_packet,
    sub_opts, unique,
)

ALL = [V31, V311, V5]
BOTH = [V311, V5]


@pytest.mark.parametrize("sub_qos", [0, 1, 2])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("version", ALL)
def test_qos_delivery_and_downgrade(clients, uid, version, pub_qos, sub_qos):
    """[MQTT-3.8.4-6] (3.1.1) / [MQTT-3.8.4-8] (5.0): the QoS of a delivered message is the minimum
    of the published QoS and the granted QoS; the granted QoS is never above the requested one
    (3.8.4: the server might grant a lower maximum QoS)."""
    sub = clients(version)
    sub.connect()
    granted = sub.subscribe(f"{uid}/q", sub_qos)
    assert len(granted) == 1 and granted[0] <= sub_qos
    pub = clients(version)
    pub.connect()
    pub.publish(f"{uid}/q", b"payload-%d" % pub_qos, qos=pub_qos)
    m = sub.messages.wait_for(1)[0]
    assert m.payload == b"payload-%d" % pub_qos
    assert m.qos == min(pub_qos, granted[0])
    assert not m.retain
    sub.messages.assert_no_more(1)


@pytest.mark.parametrize("pub_version,sub_version", [(V5, V31), (V31, V5), (V311, V5), (V5, V311)])
def test_cross_version_delivery(clients, uid, pub_version, sub_version):
    """Messages flow between clients of different protocol levels (3.3.5: the server forwards the
    Application Message to every matching subscription, whatever the client's protocol level)."""
    sub = clients(sub_version)
    sub.connect()
    sub.subscribe(f"{uid}/x", 2)
    pub = clients(pub_version)
    pub.connect()
    pub.publish(f"{uid}/x", b"interop", qos=2)
    m = sub.messages.wait_for(1)[0]
    assert (m.topic, m.payload, m.qos) == (f"{uid}/x", b"interop", 2)


@pytest.mark.parametrize("version", BOTH)
def test_qos1_puback_wire(raw, uid, version):
    """[MQTT-4.3.2-2] the receiver of a QoS 1 PUBLISH responds with PUBACK carrying the same Packet
    Identifier; [MQTT-2.2.2-1] reserved flags 0; v5 reason code is a success code (< 0x80)."""
    r = raw(version)
    r.connect()
    r.send(publish_packet(f"{uid}/a", b"x", qos=1, pid=0x1234, version=version))
    p = r.expect(PUBACK)
    assert p.flags == 0
    pid, rc, _ = p.ack()
    assert pid == 0x1234
    if version == V311:
        assert len(p.body) == 2
    else:
        assert rc in (0x00, 0x10), f"PUBACK reason {rc:#x}"


@pytest.mark.parametrize("version", BOTH)
def test_qos2_handshake_wire(raw, uid, version):
    """[MQTT-4.3.3-2] QoS 2 receiver: PUBREC with the PUBLISH's Packet Identifier, then PUBCOMP with
    the PUBREL's; PUBREC/PUBCOMP have flags 0 [MQTT-2.2.2-1]."""
    r = raw(version)
    r.connect()
    r.send(publish_packet(f"{uid}/a", b"x", qos=2, pid=0x0102, version=version))
    rec = r.expect(PUBREC)
    assert rec.flags == 0 and rec.ack()[0] == 0x0102
    assert rec.ack()[1] in (0x00, 0x10)
    r.send(ack_packet(PUBREL, 0x0102, version=version))
    comp = r.expect(PUBCOMP)
    assert comp.flags == 0 and comp.ack()[0] == 0x0102 and comp.ack()[1] == 0


@pytest.mark.parametrize("back_to_back", [False, True], ids=["after-pubrec", "back-to-back"])
@pytest.mark.parametrize("version", BOTH)
def test_qos2_duplicate_publish_delivered_exactly_once(raw, clients, uid, version, back_to_back):
    """[MQTT-4.3.3-2] until PUBREL is received, a PUBLISH with the same Packet Identifier is
    acknowledged with PUBREC again and MUST NOT cause duplicate delivery to onward recipients."""
    topic = f"{uid}/once"
    sub = clients(version)
    sub.connect()
    sub.subscribe(topic, 2)
    r = raw(version)
    r.connect()
    first = publish_packet(topic, b"exactly-once", qos=2, pid=77, version=version)
    resend = publish_packet(topic, b"exactly-once", qos=2, pid=77, dup=True, version=version)
    if back_to_back:
        r.send(first + resend)
        assert r.expect(PUBREC).ack()[0] == 77
        assert r.expect(PUBREC).ack()[0] == 77
    else:
        r.send(first)
        assert r.expect(PUBREC).ack()[0] == 77
        r.send(resend)
        assert r.expect(PUBREC).ack()[0] == 77
    r.send(ack_packet(PUBREL, 77, version=version))
    assert r.expect(PUBCOMP).ack()[0] == 77
    sub.messages.wait_for(1)
    sub.messages.assert_no_more(1)  # fixed negative window


@pytest.mark.parametrize("version", BOTH)
def test_qos2_packet_id_reused_after_pubcomp_is_new_message(raw, clients, uid, version):
    """[MQTT-4.3.3-2] after sending PUBCOMP the receiver MUST treat a subsequent PUBLISH with the same
    Packet Identifier as a new publication."""
    topic = f"{uid}/reuse"
    sub = clients(version)
    sub.connect()
    sub.subscribe(topic, 2)
    r = raw(version)
    r.connect()
    r.publish(topic, b"first", qos=2, pid=9)
    r.publish(topic, b"second", qos=2, pid=9)
    msgs = sub.messages.wait_for(2)
    assert [m.payload for m in msgs] == [b"first", b"second"]


@pytest.mark.parametrize("version", BOTH)
def test_outgoing_dup_not_propagated_and_packet_id_nonzero(raw, uid, version):
    """[MQTT-3.3.1-3] the DUP flag of an incoming PUBLISH is not propagated: the first delivery to a
    subscriber has DUP=0; [MQTT-2.3.1-1] QoS>0 PUBLISH carries a non-zero Packet Identifier."""
    topic = f"{uid}/dup"
    sub = raw(version)
    sub.connect()
    sub.subscribe([(topic, sub_opts(1))])
    pub = raw(version)
    pub.connect()
    pub.publish(topic, b"d", qos=1, dup=True)
    got = sub.recv_publish()
    assert got.qos == 1 and not got.dup and got.pid and got.pid != 0
    sub.puback(got.pid)


@pytest.mark.parametrize("version", BOTH)
def test_qos0_delivery_wire(raw, uid, version):
    """[MQTT-3.3.1-2] DUP is 0 for QoS 0; [MQTT-2.3.1-5] a QoS 0 PUBLISH has no Packet Identifier;
    the topic and payload are forwarded byte for byte."""
    topic = f"{uid}/zero"
    sub = raw(version)
    sub.connect()
    sub.subscribe([(topic, 0)])
    pub = raw(version)
    pub.connect()
    pub.publish(topic, b"\x00\x01zero", qos=0)
    p = sub.expect(PUBLISH)
    assert p.flags == 0
    got = p.publish()
    assert got.pid is None and got.topic == topic and got.payload == b"\x00\x01zero"
    if version == V311:
        assert p.body == enc_str(topic) + b"\x00\x01zero"


@pytest.mark.parametrize("payload", [b"", bytes(range(256)) * 4, b"\xa5" * 200_000],
                         ids=["empty", "binary", "200KB"])
@pytest.mark.parametrize("version", BOTH)
def test_payload_forwarded_unchanged(clients, uid, version, payload):
    """3.3.3: the payload is opaque binary data (zero length allowed) and is forwarded unchanged."""
    sub = clients(version)
    sub.connect()
    sub.subscribe(f"{uid}/p", 1)
    pub = clients(version)
    pub.connect()
    pub.publish(f"{uid}/p", payload, qos=1, timeout=10)
    m = sub.messages.wait_for(1, timeout=10)[0]
    assert m.payload == payload


@pytest.mark.parametrize("version", BOTH)
def test_utf8_topic_names_roundtrip(clients, uid, version):
    """1.5.3 / 4.7.3: topic names are UTF-8 (multi-byte characters and spaces allowed) and
    are forwarded exactly."""
    topic = f"{uid}/ünï cødé/日本語/ space /€"
    sub = clients(version)
    sub.connect()
    sub.subscribe(topic, 1)
    pub = clients(version)
    pub.connect()
    pub.publish(topic, b"u", qos=1)
    assert sub.messages.wait_for(1)[0].topic == topic


def test_topics_are_case_sensitive(clients, uid):
    """4.7.3: Topic Names and Topic Filters are case sensitive."""
    sub = clients(V311)
    sub.connect()
    sub.subscribe(f"{uid}/ABC", 1)
    sub.subscribe(f"{uid}/marker", 1)
    pub = clients(V311)
    pub.connect()
    pub.publish(f"{uid}/abc", b"lower", qos=1)
    pub.publish(f"{uid}/ABC", b"upper", qos=1)
    sub.messages.wait_for(1, pred=lambda m: m.payload == b"upper")
    sub.messages.assert_no_more(0, pred=lambda m: m.payload == b"lower")


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("version", BOTH)
def test_message_order_preserved(clients, uid, version, qos):
    """[MQTT-4.6.0-5] [MQTT-4.6.0-6] topics are Ordered Topics: messages from one publisher on one
    topic at one QoS are delivered to a subscriber in the order they were published."""
    n = 40
    sub = clients(version)
    sub.connect()
    sub.subscribe(f"{uid}/o", qos)
    pub = clients(version)
    pub.connect()
    for i in range(n):
        pub.publish(f"{uid}/o", str(i).encode(), qos=qos, wait=False)
    msgs = sub.messages.wait_for(n, timeout=10)
    assert [int(m.payload) for m in msgs] == list(range(n))


@pytest.mark.parametrize("version", BOTH)
def test_fanout_to_all_subscribers(clients, uid, version):
    """3.3.4: the server delivers a published message to every client with a matching subscription."""
    subs = []
    for _ in range(3):
        s = clients(version)
        s.connect()
        s.subscribe(f"{uid}/f", 1)
        subs.append(s)
    pub = clients(version)
    pub.connect()
    pub.publish(f"{uid}/f", b"all", qos=1)
    for s in subs:
        assert s.messages.wait_for(1)[0].payload == b"all"


@pytest.mark.parametrize("qos", [1, 2])
def test_publish_without_subscribers_completes(raw, uid, qos):
    """[MQTT-4.3.2-2]/[MQTT-4.3.3-2]: the QoS handshake completes even if nobody is subscribed
    (MQTT 5 may answer 0x10 No matching subscribers, a success code)."""
    r = raw(V5)
    r.connect()
    r.send(publish_packet(f"{uid}/{unique('none')}", b"x", qos=qos, pid=3, version=V5))
    p = r.expect(PUBACK if qos == 1 else PUBREC)
    pid, rc, _ = p.ack()
    assert pid == 3 and rc in (0x00, 0x10)
    if qos == 2:
        r.send(ack_packet(PUBREL, 3, version=V5))
        assert r.expect(PUBCOMP).ack()[0] == 3
