"""DISCONNECT sent by the client, with MQTT 5 reason codes and properties."""

import pytest

from helpers import (
    V31, V311, V5, disconnect_packet, publish_packet, unique, P_REASON_STRING, P_SESSION_EXPIRY,
    P_USER_PROPERTY,
)


@pytest.mark.parametrize("version", [V31, V311])
def test_v3_disconnect_closes_connection(raw, version):
    """3.1.1 3.14.4: on DISCONNECT the server discards the will and SHOULD close the connection; it
    sends nothing (3.1.1 has no server-to-client DISCONNECT)."""
    r = raw(version)
    r.connect()
    r.disconnect()
    assert r.wait_closed() == []


@pytest.mark.parametrize("rc", [0x00, 0x04, 0x80, 0x81, 0x83, 0x99])
def test_v5_disconnect_reason_codes_accepted(raw, clients, uid, rc):
    """5.0 3.14.2.1: a DISCONNECT with any client reason code is accepted and the server closes the
    network connection (3.14.4) without answering; the will is published for every code except
    0x00 (checked in test_will.py)."""
    r = raw(V5)
    r.connect()
    r.disconnect(rc)
    assert r.wait_closed() == []


def test_v5_disconnect_with_properties(raw, clients, uid):
    """5.0 3.14.2.2: DISCONNECT may carry a Reason String and User Properties; the server accepts it
    as a normal disconnection (0x00: will not published [MQTT-3.14.4-3])."""
    w = clients(V5)
    w.connect()
    w.subscribe(f"{uid}/will", 1)
    r = raw(V5)
    r.connect(will={"topic": f"{uid}/will", "payload": b"no"})
    r.disconnect(0x00, properties=[(P_REASON_STRING, "bye"), (P_USER_PROPERTY, ("k", "v"))])
    assert r.wait_closed() == []
    w.messages.assert_no_more(0)  # fixed negative window


def test_v5_disconnect_empty_body_means_success(raw, clients, uid):
    """5.0 3.14.2.1: a DISCONNECT with Remaining Length 0 means reason 0x00 (Normal disconnection):
    the will is not published."""
    w = clients(V5)
    w.connect()
    w.subscribe(f"{uid}/will", 1)
    r = raw(V5)
    r.connect(will={"topic": f"{uid}/will", "payload": b"no"})
    r.send(b"\xe0\x00")
    assert r.wait_closed() == []
    w.messages.assert_no_more(0)  # fixed negative window


def test_v5_disconnect_session_expiry_from_zero_not_honoured(raw):
    """5.0 3.14.2.2.2: if the CONNECT Session Expiry Interval was 0, setting a non-zero one in
    DISCONNECT is a Protocol Error: the session must still end with the connection."""
    cid = unique("dse")
    r = raw(V5)
    r.connect(client_id=cid, clean=False)
    r.subscribe([("conf/dse/x", 1)])
    r.disconnect(0x00, properties={P_SESSION_EXPIRY: 300})
    pkts = r.wait_closed()
    if pkts:
        assert len(pkts) == 1 and pkts[0].disconnect()[0] == 0x82, pkts
    r2 = raw(V5)
    ack = r2.connect(client_id=cid, clean=False, properties={P_SESSION_EXPIRY: 10})
    assert not ack.session_present


@pytest.mark.parametrize("version", [V311, V5])
def test_packets_after_disconnect_not_processed(raw, clients, uid, version):
    """[MQTT-3.14.4-1] nothing may follow DISCONNECT on the connection; the server ends the
    connection on DISCONNECT, so a PUBLISH sent right after it (same TCP segment) is not forwarded."""
    w = clients(version)
    w.connect()
    w.subscribe(f"{uid}/after", 1)
    r = raw(version)
    r.connect()
    r.send(disconnect_packet(version) + publish_packet(f"{uid}/after", b"late", version=version))
    r.wait_closed()
    w.messages.assert_no_more(0)  # fixed negative window
