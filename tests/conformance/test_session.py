"""Sessions: clean session / clean start, session present, session expiry, takeover, resending
unacknowledged messages on session resumption."""

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from helpers import (
    DISCONNECT, PUBLISH, PUBREL, PUBREC, PUBCOMP, V311, V5, ack_packet, props, session_client, sub_opts,
    unique, P_SESSION_EXPIRY,
)

BOTH = [V311, V5]


def raw_session(raw, version, cid, clean=False, expiry=300, **kw):
    r = raw(version)
    extra = {}
    if version == V5 and expiry:
        extra["properties"] = {P_SESSION_EXPIRY: expiry}
    ack = r.connect(client_id=cid, clean=clean, **extra, **kw)
    return r, ack


@pytest.mark.parametrize("version", BOTH)
def test_session_present_and_queued_messages(clients, uid, version):
    """[MQTT-3.2.2-3] new session -> session present 0; [MQTT-3.2.2-2] resumed session -> session
    present 1; [MQTT-3.1.2-4]/[MQTT-3.1.2-5] subscriptions and QoS 1/2 messages published while the
    client was offline are kept in the session and delivered, in order, on reconnection."""
    cid = unique("sess")
    c, ack = session_client(clients, version, cid, clean=False)
    assert not ack.session_present
    assert c.subscribe(f"{uid}/q", 2) == [2]
    c.disconnect()

    pub = clients(version)
    pub.connect()
    for i in range(3):
        pub.publish(f"{uid}/q", f"m{i}".encode(), qos=1 + (i % 2))

    c2, ack2 = session_client(clients, version, cid, clean=False)
    assert ack2.session_present, "session present must be 1 when resuming a stored session"
    msgs = c2.messages.wait_for(3)
    assert sorted((m.payload, m.qos) for m in msgs) == [(b"m0", 1), (b"m1", 2), (b"m2", 1)]
    # ordering is only guaranteed per topic *and QoS* [MQTT-4.6.0-5]
    assert [m.payload for m in msgs if m.qos == 1] == [b"m0", b"m2"]


@pytest.mark.parametrize("version", BOTH)
def test_clean_session_discards_previous_session(clients, uid, version):
    """[MQTT-3.1.2-6] CleanSession/Clean Start = 1 discards any previous session: session present
    is 0 [MQTT-3.2.2-1] and the old subscription no longer delivers."""
    cid = unique("sess")
    c, _ = session_client(clients, version, cid, clean=False)
    c.subscribe(f"{uid}/q", 1)
    c.disconnect()

    c2, ack = session_client(clients, version, cid, clean=True, expiry=0)
    assert not ack.session_present
    control = clients(version)
    control.connect()
    control.subscribe(f"{uid}/q", 1)
    control.publish(f"{uid}/q", b"after-clean", qos=1)
    control.messages.wait_for(1)
    c2.messages.assert_no_more(0)  # fixed negative window


@pytest.mark.parametrize("version", BOTH)
def test_clean_session_state_not_kept_after_disconnect(clients, uid, version):
    """[MQTT-3.1.2-6] (3.1.1) the state of a CleanSession=1 session is discarded when it ends /
    (5.0, 3.1.2.11.2) Session Expiry Interval 0: the session ends when the connection closes. A later
    non-clean connection gets session present 0."""
    cid = unique("sess")
    c, _ = session_client(clients, version, cid, clean=True, expiry=0)
    c.subscribe(f"{uid}/q", 1)
    c.disconnect()
    _, ack = session_client(clients, version, cid, clean=False)
    assert not ack.session_present


def test_v5_session_expiry_zero_ends_session(clients, uid):
    """MQTT 5 3.1.2.11.2: Clean Start 0 but Session Expiry Interval absent (=0): the session ends
    when the network connection is closed, so reconnection reports session present 0."""
    cid = unique("sess")
    c, ack = session_client(clients, V5, cid, clean=False, expiry=0)
    c.subscribe(f"{uid}/q", 1)
    c.disconnect()
    _, ack = session_client(clients, V5, cid, clean=False, expiry=60)
    assert not ack.session_present


def test_v5_session_expiry_interval_elapses(clients, uid):
    """MQTT 5 3.1.2.11.2 / 4.1: a session with Session Expiry Interval 1 s is discarded once the
    interval has passed after disconnection: session present 0 on reconnect. (Deliberately waits
    1.5 s for the 1 s expiry to elapse; the fake-clock test in state_machine.rs covers the edges.)"""
    cid = unique("sess")
    c, _ = session_client(clients, V5, cid, clean=False, expiry=1)
    c.subscribe(f"{uid}/q", 1)
    c.disconnect()
    time.sleep(1.5)
    _, ack = session_client(clients, V5, cid, clean=False, expiry=60)
    assert not ack.session_present, "session should have expired after 1 s"


def test_v5_session_survives_within_expiry(clients, uid):
    """MQTT 5 3.1.2.11.2: within the Session Expiry Interval the session is resumed (control for
    the expiry test)."""
    cid = unique("sess")
    c, _ = session_client(clients, V5, cid, clean=False, expiry=30)
    c.subscribe(f"{uid}/q", 1)
    c.disconnect()
    _, ack = session_client(clients, V5, cid, clean=False, expiry=30)
    assert ack.session_present


def test_v5_disconnect_sets_session_expiry_zero(clients, uid):
    """MQTT 5 3.14.2.2.2: a Session Expiry Interval in DISCONNECT replaces the one from CONNECT;
    setting it to 0 ends the session when the connection closes."""
    cid = unique("sess")
    c, _ = session_client(clients, V5, cid, clean=False, expiry=300)
    c.subscribe(f"{uid}/q", 1)
    c.disconnect(reasoncode=0, properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    _, ack = session_client(clients, V5, cid, clean=False, expiry=60)
    assert not ack.session_present


@pytest.mark.parametrize("version", BOTH)
def test_takeover_closes_existing_connection(raw, version):
    """[MQTT-3.1.4-2] (3.1.1) / [MQTT-3.1.4-3] (5.0): a second connection with the same ClientId
    makes the server close the first one (MUST). In MQTT 5 the server "sends" DISCONNECT 0x8E
    first (not a MUST: mosquitto 2.0 just closes), so a bare close is accepted here and the
    DISCONNECT is required by test_v5_takeover_sends_disconnect_0x8e (Millet only).
    MQTT 3.1.1 has no server DISCONNECT, so the first connection is just closed."""
    cid = unique("take")
    r1, _ = raw_session(raw, version, cid, clean=True, expiry=0)
    r2, ack = raw_session(raw, version, cid, clean=True, expiry=0)
    assert ack.rc == 0
    pkts = r1.wait_closed()
    if version == V5:
        if pkts:
            assert len(pkts) == 1 and pkts[0].type == DISCONNECT, f"expected DISCONNECT 0x8E, got {pkts}"
            assert pkts[0].disconnect()[0] == 0x8E
    else:
        assert pkts == [], f"3.1.1 server must not send anything on takeover, got {pkts}"
    # the new connection is fully usable
    assert r2.subscribe([(f"conf/{cid}/x", 1)]) == [1]


@pytest.mark.millet_only(reason="mosquitto 2.0.11 closes the taken-over connection without "
                                "sending DISCONNECT 0x8E")
@pytest.mark.parametrize("clean", [True, False])
def test_v5_takeover_sends_disconnect_0x8e(raw, clean):
    """[MQTT-3.1.4-3] + 4.13: on takeover the server sends DISCONNECT with Reason Code 0x8E
    (Session taken over) to the existing MQTT 5 client, then closes its connection."""
    cid = unique("take")
    r1, _ = raw_session(raw, V5, cid, clean=clean, expiry=0 if clean else 300)
    raw_session(raw, V5, cid, clean=clean, expiry=0 if clean else 300)
    pkts = r1.wait_closed()
    assert len(pkts) == 1 and pkts[0].type == DISCONNECT, f"expected DISCONNECT 0x8E, got {pkts}"
    assert pkts[0].disconnect()[0] == 0x8E


@pytest.mark.parametrize("version", BOTH)
def test_takeover_keeps_persistent_session(raw, clients, version):
    """[MQTT-3.1.4-2]/[MQTT-3.1.4-3] + [MQTT-3.2.2-2]: taking over a live persistent session
    resumes it (session present 1) with its subscriptions."""
    cid = unique("take")
    topic = f"conf/{cid}/x"
    r1, _ = raw_session(raw, version, cid, clean=False)
    r1.subscribe([(topic, 1)])
    r2, ack = raw_session(raw, version, cid, clean=False)
    assert ack.session_present
    r1.wait_closed()
    pub = clients(version)
    pub.connect()
    pub.publish(topic, b"to-new-owner", qos=1)
    got = r2.recv_publish()
    assert got.payload == b"to-new-owner" and got.qos == 1
    r2.puback(got.pid)


@pytest.mark.parametrize("version", BOTH)
def test_unacked_qos1_resent_with_dup_on_resume(raw, clients, version):
    """[MQTT-4.4.0-1] on reconnection with a resumed session the server MUST resend unacknowledged
    PUBLISH packets using their original Packet Identifiers; [MQTT-3.3.1-1] with DUP = 1."""
    cid = unique("dup")
    topic = f"conf/{cid}/x"
    r1, _ = raw_session(raw, version, cid, clean=False)
    r1.subscribe([(topic, sub_opts(1))])
    pub = clients(version)
    pub.connect()
    pub.publish(topic, b"unacked", qos=1)
    first = r1.recv_publish()
    assert first.qos == 1 and not first.dup and first.payload == b"unacked"
    r1.close()  # no PUBACK, no DISCONNECT

    r2, ack = raw_session(raw, version, cid, clean=False)
    assert ack.session_present
    again = r2.recv_publish()
    assert again.payload == b"unacked"
    assert again.pid == first.pid, "must reuse the original packet identifier"
    assert again.dup, "re-delivery must have DUP = 1"
    assert again.qos == 1
    r2.puback(again.pid)
    r2.assert_silent()


@pytest.mark.parametrize("version", BOTH)
def test_unacked_qos2_publish_resent_with_dup(raw, clients, version):
    """[MQTT-4.4.0-1] [MQTT-3.3.1-1] a QoS 2 PUBLISH without PUBREC is resent with DUP=1 and the
    same Packet Identifier; the handshake then completes [MQTT-4.3.3-1]."""
    cid = unique("dup")
    topic = f"conf/{cid}/x"
    r1, _ = raw_session(raw, version, cid, clean=False)
    r1.subscribe([(topic, sub_opts(2))])
    pub = clients(version)
    pub.connect()
    pub.publish(topic, b"q2", qos=2)
    first = r1.recv_publish()
    assert first.qos == 2 and not first.dup
    r1.close()

    r2, ack = raw_session(raw, version, cid, clean=False)
    assert ack.session_present
    again = r2.recv_publish()
    assert again.dup and again.pid == first.pid and again.payload == b"q2" and again.qos == 2
    r2.send(ack_packet(PUBREC, again.pid, version=version))
    rel = r2.expect(PUBREL)
    assert rel.flags == 0x02 and rel.ack()[0] == again.pid
    r2.send(ack_packet(PUBCOMP, again.pid, version=version))
    r2.assert_silent()


@pytest.mark.parametrize("version", BOTH)
def test_unacked_pubrel_resent_on_resume(raw, clients, version):
    """[MQTT-4.4.0-1] after PUBREC, the server's PUBREL is resent on session resumption (same
    Packet Identifier, fixed header flags 0x02 [MQTT-3.6.1-1]) and the PUBLISH is NOT resent
    [MQTT-4.3.3-1]: the sender MUST NOT re-send the PUBLISH once it has received PUBREC."""
    cid = unique("rel")
    topic = f"conf/{cid}/x"
    r1, _ = raw_session(raw, version, cid, clean=False)
    r1.subscribe([(topic, sub_opts(2))])
    pub = clients(version)
    pub.connect()
    pub.publish(topic, b"q2", qos=2)
    first = r1.recv_publish()
    r1.send(ack_packet(PUBREC, first.pid, version=version))
    rel = r1.expect(PUBREL)
    assert rel.ack()[0] == first.pid
    r1.close()  # no PUBCOMP

    r2, ack = raw_session(raw, version, cid, clean=False)
    assert ack.session_present
    p = r2.recv()
    assert p is not None and p.type == PUBREL, f"expected PUBREL to be resent, got {p!r}"
    assert p.flags == 0x02 and p.ack()[0] == first.pid
    r2.send(ack_packet(PUBCOMP, first.pid, version=version))
    r2.assert_silent()


@pytest.mark.parametrize("version", BOTH)
def test_no_messages_queued_for_clean_session(clients, uid, version):
    """[MQTT-3.1.2-6] a clean session ends with its connection: messages published while the
    client is offline are not delivered to its next (clean) connection."""
    cid = unique("clean")
    c, _ = session_client(clients, version, cid, clean=True, expiry=0)
    c.subscribe(f"{uid}/q", 1)
    c.disconnect()
    pub = clients(version)
    pub.connect()
    pub.publish(f"{uid}/q", b"lost", qos=1)
    c2, ack = session_client(clients, version, cid, clean=True, expiry=0)
    assert not ack.session_present
    c2.messages.assert_no_more(0)  # fixed negative window
