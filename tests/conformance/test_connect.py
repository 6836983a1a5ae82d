"""CONNECT / CONNACK: protocol levels, client identifiers, credentials, keep alive,
MQTT 5 CONNACK properties."""

import time

import pytest

from helpers import (
    CONNACK, PINGREQ_PACKET, PINGRESP, V31, V311, V5, RawClient, connect_packet, sub_opts,
    P_ASSIGNED_CLIENT_ID, P_MAXIMUM_PACKET_SIZE, P_MAXIMUM_QOS, P_RECEIVE_MAXIMUM, P_RETAIN_AVAILABLE,
    P_SERVER_KEEP_ALIVE, P_SHARED_SUB_AVAILABLE, P_SUB_ID_AVAILABLE, P_TOPIC_ALIAS_MAXIMUM,
    P_WILDCARD_SUB_AVAILABLE, P_SUBSCRIPTION_ID, DISCONNECT, unique,
)


@pytest.mark.parametrize("version", [V31, V311, V5])
def test_connect_each_protocol_level_accepted(clients, uid, version):
    """[MQTT-3.1.2-2] protocol levels 3 ("MQIsdp"), 4 and 5 are supported: CONNACK 0 and the
    connection is usable [MQTT-3.2.0-1]."""
    c = clients(version)
    ack = c.connect()
    assert ack.rc == 0
    assert c.subscribe(f"{uid}/x", 1) == [1]
    c.publish(f"{uid}/x", b"hi", qos=1)
    assert c.messages.wait_for(1)[0].payload == b"hi"


def test_connack_wire_format_v311(raw):
    """[MQTT-3.2.0-1] CONNACK is the first packet; [MQTT-3.2.2-1] clean session -> session present 0;
    reserved bits of the acknowledge flags are 0; remaining length is 2."""
    r = raw(V311)
    r.send(connect_packet(V311, unique(), clean=True))
    p = r.recv()
    assert p is not None and p.type == CONNACK and p.flags == 0
    assert p.body == b"\x00\x00", f"CONNACK body {p.body!r}"


def test_connack_wire_format_v31(raw):
    """MQTT 3.1 ("MQIsdp", level 3): CONNACK with return code 0 and a 2-byte variable header."""
    r = raw(V31)
    r.send(connect_packet(V31, unique(), clean=True))
    p = r.recv()
    assert p is not None and p.type == CONNACK
    assert len(p.body) == 2 and p.body[1] == 0


def test_connack_wire_format_v5(raw):
    """[MQTT-3.2.2-1] session present 0 with clean start; CONNACK properties well-formed
    (no duplicates, no unknown identifiers: checked by the decoder)."""
    r = raw(V5)
    ack = r.connect(clean=True)
    assert ack.rc == 0 and not ack.session_present


def test_v5_empty_client_id_gets_assigned_identifier(raw):
    """[MQTT-3.1.3-6] [MQTT-3.1.3-7] zero-length ClientID: the server assigns a unique ClientID and
    returns it in CONNACK (Assigned Client Identifier)."""
    ids = []
    for _ in range(2):
        r = raw(V5)
        ack = r.connect(client_id="", clean=True)
        assert ack.rc == 0
        assigned = ack.props.get(P_ASSIGNED_CLIENT_ID)
        assert assigned, f"no Assigned Client Identifier in CONNACK: {ack.props}"
        ids.append(assigned)
    assert ids[0] != ids[1], "assigned client identifiers must be unique"


def test_v311_empty_client_id_with_clean_session_accepted(raw, uid):
    """[MQTT-3.1.3-6] a zero-byte ClientId with CleanSession=1 is accepted and usable."""
    r = raw(V311)
    ack = r.connect(client_id="", clean=True)
    assert ack.rc == 0 and not ack.session_present
    assert r.subscribe([(f"{uid}/a", 1)]) == [1]


def test_v311_empty_client_id_without_clean_session_rejected(raw):
    """[MQTT-3.1.3-8] zero-byte ClientId with CleanSession=0: CONNACK return code 0x02 (identifier
    rejected) and the connection is closed; [MQTT-3.2.2-4] session present is 0 on a refusal."""
    r = raw(V311)
    r.send(connect_packet(V311, "", clean=False))
    pkts = r.wait_closed()
    assert len(pkts) == 1 and pkts[0].type == CONNACK, f"expected one CONNACK then close, got {pkts}"
    ack = pkts[0].connack()
    assert ack.rc == 0x02
    assert not ack.session_present


@pytest.mark.parametrize("version", [V311, V5])
def test_client_id_23_alphanumeric_characters_allowed(raw, version):
    """[MQTT-3.1.3-5] the server MUST allow ClientIds of 1..23 UTF-8 bytes containing 0-9a-zA-Z."""
    cid = ("Az09" * 6)[:23]
    cid = cid[:-6] + unique("")[:6].replace("-", "x")
    r = raw(version)
    assert r.connect(client_id=cid).rc == 0


@pytest.mark.parametrize("version", [V31, V311, V5])
def test_username_and_password_accepted(clients, uid, version):
    """[MQTT-3.1.2-18]..[MQTT-3.1.2-21] username / password flags and fields are parsed (the
    broker allows anonymous access, so credentials are accepted) and the session works."""
    c = clients(version)
    c.connect(username="user-ü", password="secret")
    assert c.subscribe(f"{uid}/x", 0) == [0]
    c.publish(f"{uid}/x", b"ok")
    assert c.messages.wait_for(1)[0].payload == b"ok"


@pytest.mark.parametrize("version", [V311, V5])
def test_binary_password_accepted(raw, uid, version):
    """3.1.3.5: Password is Binary Data (any bytes, including 0x00 and 0xFF), not a UTF-8
    string (3.1.3.5): the server must accept it and parse the rest of the packet correctly."""
    r = raw(version)
    ack = r.connect(username="u", password=b"\x00\xff\xfe\x01")
    assert ack.rc == 0
    assert r.subscribe([(f"{uid}/y", 0)]) == [0]


def test_v5_password_without_username_accepted(raw):
    """MQTT 5 3.1.2.9: unlike 3.1.1, a Password without a User Name is allowed."""
    r = raw(V5)
    assert r.connect(password=b"pw").rc == 0


@pytest.mark.parametrize("version", [V311, V5])
def test_keepalive_timeout_closes_connection(raw, version):
    """[MQTT-3.1.2-24] no packet within 1.5x Keep Alive -> the server disconnects.
    (Portable bound: mosquitto's keep-alive timer is coarse; see the strict Millet variant.)"""
    ka = 2
    r = raw(version)
    r.connect(keepalive=ka)
    start = time.monotonic()
    pkts = r.wait_closed(timeout=1.5 * ka + 5)
    elapsed = time.monotonic() - start
    assert elapsed >= ka * 0.9, f"closed after {elapsed:.2f}s, before the keep alive period"
    if version == V5 and pkts:
        assert len(pkts) == 1 and pkts[0].type == DISCONNECT, pkts
        assert pkts[0].disconnect()[0] == 0x8D, "DISCONNECT reason should be 0x8D keep alive timeout"
    else:
        assert pkts == [], f"v3.1.1: connection closed without a packet, got {pkts}"


@pytest.mark.millet_only(reason="mosquitto 2.0 checks keep alive on a coarse (~5 s) timer, so it "
                                "closes at ~3x Keep Alive for short keep-alives")
@pytest.mark.parametrize("version", [V311, V5])
def test_keepalive_timeout_is_timely(raw, version):
    """[MQTT-3.1.2-24] the server MUST disconnect within one and a half times the Keep Alive
    (plus 0.75 s scheduling slack), and not before Keep Alive has elapsed."""
    ka = 2
    r = raw(version)
    r.connect(keepalive=ka)
    start = time.monotonic()
    r.wait_closed(timeout=1.5 * ka + 3)
    elapsed = time.monotonic() - start
    assert ka * 0.95 <= elapsed <= 1.5 * ka + 0.75, f"closed after {elapsed:.2f}s (keep alive {ka}s)"


@pytest.mark.parametrize("version", [V311, V5])
def test_pingreq_keeps_connection_alive(raw, version):
    """[MQTT-3.12.4-1] the server MUST answer PINGREQ with PINGRESP; [MQTT-3.1.2-23]/[MQTT-3.1.2-24]
    traffic within the keep alive keeps the connection open (pings for > 1.5x Keep Alive)."""
    r = raw(version)
    r.connect(keepalive=1)
    deadline = time.monotonic() + 2.2
    n = 0
    while time.monotonic() < deadline:
        assert r.send(PINGREQ_PACKET)
        p = r.expect(PINGRESP, timeout=2, skip_pingresp=False)
        assert p.body == b"" and p.flags == 0
        n += 1
        time.sleep(0.4)  # pacing of the pings, not a wait for a result
    assert n >= 4
    r.send(PINGREQ_PACKET)
    r.expect(PINGRESP, skip_pingresp=False)


def test_v5_server_keep_alive_sent(broker_factory):
    """[MQTT-3.2.2-21] with a server maximum keep alive of 10 s, a client asking for 60 s is told
    the Server Keep Alive (10) in CONNACK."""
    b = broker_factory(max_keepalive=10)
    r = RawClient(b, V5)
    try:
        ack = r.connect(keepalive=60)
        assert ack.props.get(P_SERVER_KEEP_ALIVE) == 10, ack.props
    finally:
        r.close()


@pytest.mark.millet_only(reason="mosquitto refuses max_keepalive below 10 s, too slow to test")
def test_v5_server_keep_alive_enforced(broker_factory):
    """[MQTT-3.2.2-21] [MQTT-3.1.2-24] the Server Keep Alive (2 s) replaces the client's 60 s:
    the idle client is disconnected within 1.5x the server value."""
    b = broker_factory(max_keepalive=2)
    r = RawClient(b, V5)
    try:
        ack = r.connect(keepalive=60)
        assert ack.props.get(P_SERVER_KEEP_ALIVE) == 2, ack.props
        start = time.monotonic()
        r.wait_closed(timeout=6)
        assert time.monotonic() - start <= 3.75
    finally:
        r.close()


def test_v5_connack_property_values_valid(raw):
    """3.2.2.3: CONNACK property values are in range: Receive Maximum > 0, Maximum QoS 0/1 only
    (it is a protocol error to send 2), Retain/Wildcard/SubId/Shared Available 0/1, Maximum Packet
    Size > 0 [MQTT-3.2.2-9]..[MQTT-3.2.2-13]."""
    r = raw(V5)
    p = r.connect().props
    if P_RECEIVE_MAXIMUM in p:
        assert p[P_RECEIVE_MAXIMUM] > 0
    if P_MAXIMUM_QOS in p:
        assert p[P_MAXIMUM_QOS] in (0, 1)
    for pid in (P_RETAIN_AVAILABLE, P_WILDCARD_SUB_AVAILABLE, P_SUB_ID_AVAILABLE, P_SHARED_SUB_AVAILABLE):
        if pid in p:
            assert p[pid] in (0, 1), f"property {pid:#x} = {p[pid]}"
    if P_MAXIMUM_PACKET_SIZE in p:
        assert p[P_MAXIMUM_PACKET_SIZE] > 0


@pytest.mark.parametrize("feature", ["max_qos", "retain", "wildcard", "subscription_id", "shared"])
def test_v5_connack_advertised_features_work(raw, uid, feature):
    """3.2.2.3: features advertised as available (or not mentioned, which means available) in
    CONNACK actually work: Maximum QoS (absent = 2) [MQTT-3.2.2-9], Retain Available [MQTT-3.2.2-10],
    Wildcard / Subscription Identifier / Shared Subscription Available (absent = supported)."""
    r = raw(V5)
    p = r.connect().props
    if feature == "max_qos":
        max_qos = p.get(P_MAXIMUM_QOS, 2)
        assert r.subscribe([(f"{uid}/q", sub_opts(2))]) == [max_qos]
        r.publish(f"{uid}/q", b"m", qos=max_qos)
        got = r.recv_publish()
        assert got.qos == max_qos and got.payload == b"m"
    elif feature == "retain":
        if p.get(P_RETAIN_AVAILABLE, 1) == 0:
            pytest.skip("broker advertises Retain Available = 0")
        r.publish(f"{uid}/r", b"kept", qos=1, retain=True)
        r2 = raw(V5)
        r2.connect()
        r2.subscribe([(f"{uid}/r", 0)])
        got = r2.recv_publish()
        assert got.retain and got.payload == b"kept"
        r.publish(f"{uid}/r", b"", qos=1, retain=True)
    elif feature == "wildcard":
        expected = [0] if p.get(P_WILDCARD_SUB_AVAILABLE, 1) else [0xA2]
        assert r.subscribe([(f"{uid}/#", 0)]) == expected
    elif feature == "subscription_id":
        if p.get(P_SUB_ID_AVAILABLE, 1) == 0:
            pytest.skip("broker advertises Subscription Identifiers Available = 0")
        assert r.subscribe([(f"{uid}/s", 0)], properties={P_SUBSCRIPTION_ID: 7}) == [0]
        r.publish(f"{uid}/s", b"x")
        assert r.recv_publish().props.get(P_SUBSCRIPTION_ID) == [7]
    elif feature == "shared":
        expected = [0] if p.get(P_SHARED_SUB_AVAILABLE, 1) else [0x9E]
        assert r.subscribe([(f"$share/g/{uid}/s", 0)]) == expected


def test_v5_connack_advertises_configured_limits(broker_factory):
    """3.2.2.3.3 / 3.2.2.3.6 / 3.2.2.3.8: a server with limits tells the client in CONNACK:
    Receive Maximum (in-flight limit), Maximum Packet Size and Topic Alias Maximum."""
    b = broker_factory(receive_maximum=7, max_packet_size=1000, topic_alias_max=5)
    r = RawClient(b, V5)
    try:
        p = r.connect().props
        assert p.get(P_RECEIVE_MAXIMUM) == 7, p
        assert p.get(P_MAXIMUM_PACKET_SIZE) == 1000, p
        assert p.get(P_TOPIC_ALIAS_MAXIMUM) == 5, p
    finally:
        r.close()


def test_connack_is_first_packet_and_only_one(raw):
    """[MQTT-3.2.0-1] the first packet from server to client MUST be CONNACK, and only one is sent."""
    r = raw(V311)
    r.send(connect_packet(V311, unique()))
    first = r.recv()
    assert first is not None and first.type == CONNACK
    r.assert_silent()
