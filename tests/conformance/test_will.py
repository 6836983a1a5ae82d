"""Will messages: published on abnormal disconnection, never after a normal DISCONNECT, MQTT 5 Will
Delay Interval and will properties."""

import time

import pytest

from helpers import (
    DISCONNECT, V31, V311, V5, disconnect_packet, publish_packet, unique,
    P_CONTENT_TYPE, P_CORRELATION_DATA, P_PAYLOAD_FORMAT, P_RESPONSE_TOPIC, P_SESSION_EXPIRY,
    P_USER_PROPERTY, P_WILL_DELAY,
)

ALL = [V31, V311, V5]
BOTH = [V311, V5]


def watcher(clients, topic, version=V311, qos=2):
    w = clients(version)
    w.connect()
    w.subscribe(topic, qos)
    return w


def will_client(raw, version, topic, payload=b"gone", qos=0, retain=False, will_props=None,
                keepalive=60, conn_props=None, client_id=None, clean=True):
    r = raw(version)
    will = {"topic": topic, "payload": payload, "qos": qos, "retain": retain}
    if will_props is not None:
        will["properties"] = will_props
    kw = {"properties": conn_props} if conn_props is not None else {}
    r.connect(client_id=client_id, will=will, keepalive=keepalive, clean=clean, **kw)
    return r


@pytest.mark.parametrize("version", ALL)
def test_will_published_on_abnormal_close(raw, clients, uid, version):
    """[MQTT-3.1.2-8] the Will Message is published when the network connection is closed without a
    DISCONNECT; [MQTT-3.1.2-14]/3.1.2.6: with the Will QoS."""
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, version, f"{uid}/will", b"abnormal", qos=1)
    r.abort()
    m = w.messages.wait_for(1)[0]
    assert (m.topic, m.payload, m.qos, m.retain) == (f"{uid}/will", b"abnormal", 1, False)


@pytest.mark.parametrize("version", BOTH)
def test_will_retain_flag(raw, clients, uid, version):
    """[MQTT-3.1.2-17] Will Retain = 1: the will is published as a retained message;
    [MQTT-3.1.2-16] Will Retain = 0: it is not retained."""
    retained = will_client(raw, version, f"{uid}/will/kept", b"kept", qos=1, retain=True)
    plain = will_client(raw, version, f"{uid}/will/plain", b"plain", qos=1, retain=False)
    w = watcher(clients, f"{uid}/will/#")
    retained.abort()
    plain.abort()
    assert len(w.messages.wait_for(2)) == 2
    late = clients(version)
    late.connect()
    late.subscribe(f"{uid}/will/#", 1)
    msgs = late.messages.wait_for(1)
    assert (msgs[0].payload, msgs[0].retain) == (b"kept", True)
    late.messages.assert_no_more(1)  # fixed negative window: the non-retained will is not stored


@pytest.mark.parametrize("version", BOTH)
def test_will_published_on_keepalive_timeout(raw, clients, uid, version):
    """[MQTT-3.1.2-8] a keep alive failure (no packet within 1.5x Keep Alive) closes the connection
    and publishes the will. (Generous deadline: mosquitto's keep-alive timer is coarse.)"""
    w = watcher(clients, f"{uid}/will")
    will_client(raw, version, f"{uid}/will", b"timeout", keepalive=1)
    m = w.messages.wait_for(1, timeout=8)[0]
    assert m.payload == b"timeout"


@pytest.mark.parametrize("version", BOTH)
def test_will_published_on_protocol_error(raw, clients, uid, version):
    """[MQTT-3.1.2-8] (3.1.1 3.1.2.5: "the Server closes the Network Connection because of a protocol
    error") the will is published when the server drops the client for a malformed packet (here a
    QoS 3 PUBLISH, [MQTT-3.3.1-4])."""
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, version, f"{uid}/will", b"proto-error")
    r.send(publish_packet(f"{uid}/x", b"bad", flags=0x06, pid=1, version=version))
    r.wait_closed()
    assert w.messages.wait_for(1)[0].payload == b"proto-error"


@pytest.mark.parametrize("version", ALL)
def test_no_will_after_normal_disconnect(raw, clients, uid, version):
    """3.1.1 [MQTT-3.1.2-10] / [MQTT-3.14.4-3], 5.0 [MQTT-3.14.4-3]: on DISCONNECT (reason 0x00) the
    server discards the will without publishing it."""
    w = watcher(clients, f"{uid}/#")
    r = will_client(raw, version, f"{uid}/will", b"must-not-appear")
    r.disconnect(0x00 if version == V5 else None)
    r.wait_closed()  # the server closes after DISCONNECT, so it has processed it
    marker = clients(version)
    marker.connect()
    marker.publish(f"{uid}/marker", b"m", qos=1)
    w.messages.wait_for(1, pred=lambda m: m.payload == b"m")
    w.messages.assert_no_more(0, pred=lambda m: m.topic == f"{uid}/will")  # fixed negative window


def test_v5_disconnect_with_will_message(raw, clients, uid):
    """5.0 3.14.2.1 Reason Code 0x04 (Disconnect with Will Message): the server publishes the will."""
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, V5, f"{uid}/will", b"please-publish")
    r.disconnect(0x04)
    assert w.messages.wait_for(1)[0].payload == b"please-publish"


@pytest.mark.millet_only(reason="mosquitto 2.0 discards the will for every DISCONNECT reason code "
                                "except 0x04, contrary to [MQTT-3.1.2-8]")
@pytest.mark.parametrize("rc", [0x80, 0x83])
def test_v5_disconnect_with_error_reason_publishes_will(raw, clients, uid, rc):
    """5.0 [MQTT-3.1.2-8]: the will is deleted only on DISCONNECT with Reason Code 0x00; a DISCONNECT
    with an error reason code (0x80 unspecified / 0x83 implementation specific) still publishes it."""
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, V5, f"{uid}/will", b"error-disconnect")
    r.disconnect(rc)
    assert w.messages.wait_for(1)[0].payload == b"error-disconnect"


def test_v5_will_delay_interval_honoured(raw, clients, uid):
    """5.0 [MQTT-3.1.3-9] 3.1.3.2.2: the will is published only after the Will Delay Interval (1 s)
    has passed since the connection closed (session expiry 30 s outlives it)."""
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, V5, f"{uid}/will", b"delayed", will_props={P_WILL_DELAY: 1},
                    conn_props={P_SESSION_EXPIRY: 30}, clean=False)
    r.abort()
    t0 = time.monotonic()
    m = w.messages.wait_for(1, timeout=7)[0]
    elapsed = m.received_at - t0
    assert elapsed >= 0.9, f"will published after {elapsed:.2f}s, before the 1 s Will Delay Interval"


def test_v5_will_delay_cancelled_by_reconnect(raw, clients, uid):
    """5.0 [MQTT-3.1.3-9]: if the client reconnects to the session before the Will Delay Interval
    passes, the will MUST NOT be sent. (Fixed 1.5 s negative window, past the 1 s delay.)"""
    cid = unique("willdelay")
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, V5, f"{uid}/will", b"cancelled", will_props={P_WILL_DELAY: 1},
                    conn_props={P_SESSION_EXPIRY: 30}, client_id=cid, clean=False)
    r.abort()
    r2 = raw(V5)
    ack = r2.connect(client_id=cid, clean=False, properties={P_SESSION_EXPIRY: 30})
    assert ack.session_present
    w.messages.assert_no_more(0, window=1.5)


def test_v5_will_published_when_session_ends_before_delay(raw, clients, uid):
    """5.0 3.1.3.2.2 / [MQTT-3.1.2-8]: the will is published when the Will Delay Interval passes *or
    the session ends*, whichever is first: Will Delay 30 s, Session Expiry 1 s -> published ~1 s
    after the close."""
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, V5, f"{uid}/will", b"session-ended", will_props={P_WILL_DELAY: 30},
                    conn_props={P_SESSION_EXPIRY: 1}, clean=False)
    r.abort()
    assert w.messages.wait_for(1, timeout=6)[0].payload == b"session-ended"


@pytest.mark.millet_only(reason="mosquitto 2.0.11 drops a pending delayed will when the client id "
                                "reconnects, even with Clean Start 1 (which ends the session)")
def test_v5_delayed_will_published_when_a_clean_connection_ends_the_session(raw, clients, uid):
    """5.0 3.1.3.2.2 / [MQTT-3.1.2-8]: a will waiting for its delay (30 s) is published as soon as
    the session ends, here because the client id comes back with Clean Start 1; coming back with
    Clean Start 0 instead cancels it ([MQTT-3.1.3-9], test_v5_will_delay_cancelled_by_reconnect)."""
    cid = unique("wdclean")
    w = watcher(clients, f"{uid}/will")
    r = will_client(raw, V5, f"{uid}/will", b"ended-by-clean-start", will_props={P_WILL_DELAY: 30},
                    conn_props={P_SESSION_EXPIRY: 60}, client_id=cid, clean=False)
    r.abort()
    w.messages.assert_no_more(0)  # fixed negative window: the delay is running
    r2 = raw(V5)
    assert not r2.connect(client_id=cid, clean=True).session_present
    assert w.messages.wait_for(1)[0].payload == b"ended-by-clean-start"


def test_v5_will_properties_forwarded(raw, clients, uid):
    """5.0 3.1.3.2: will properties are sent with the will message: Payload Format Indicator,
    Content Type, Response Topic, Correlation Data and User Properties in order [MQTT-3.1.3-10]."""
    w = clients(V5)
    w.connect()
    w.subscribe(f"{uid}/will", 1)
    r = will_client(raw, V5, f"{uid}/will", b"{\"gone\":true}", qos=1, will_props=[
        (P_PAYLOAD_FORMAT, 1),
        (P_CONTENT_TYPE, "application/json"),
        (P_RESPONSE_TOPIC, f"{uid}/resp"),
        (P_CORRELATION_DATA, b"\x01\x02corr"),
        (P_USER_PROPERTY, ("a", "1")),
        (P_USER_PROPERTY, ("b", "2")),
        (P_USER_PROPERTY, ("a", "3")),
    ])
    r.abort()
    m = w.messages.wait_for(1)[0]
    assert m.prop("PayloadFormatIndicator") == 1
    assert m.prop("ContentType") == "application/json"
    assert m.prop("ResponseTopic") == f"{uid}/resp"
    assert m.prop("CorrelationData") == b"\x01\x02corr"
    assert m.prop("UserProperty") == [("a", "1"), ("b", "2"), ("a", "3")]


def test_v311_server_sends_nothing_on_disconnect(raw):
    """3.1.1 3.14: the server never sends DISCONNECT to a 3.1.1 client; after the client's
    DISCONNECT the server closes the connection."""
    r = raw(V311)
    r.connect()
    r.disconnect()
    pkts = r.wait_closed()
    assert all(p.type != DISCONNECT for p in pkts) and pkts == []


# ---------------------------------------------------------------------------
# Takeover and the will (issue 10, items 4 and 5)
# ---------------------------------------------------------------------------

TAKEOVER_CASES = [(v, old, new) for v in BOTH for old in ("clean", "persistent")
                  for new in ("clean", "persistent")]


def _session_kw(version, kind):
    if kind == "clean":
        return {"clean": True}
    if version == V5:
        return {"clean": False, "properties": {P_SESSION_EXPIRY: 60}}
    return {"clean": False}


@pytest.mark.parametrize("version,old,new", TAKEOVER_CASES)
def test_takeover_publishes_the_will_only_when_the_session_ends(raw, clients, uid, version, old, new):
    """[MQTT-3.1.2-8] / [MQTT-3.1.3-9] 3.1.3.2.2: the will waits until the connection closes and is
    cancelled by a new connection to the session before it is due. On takeover the new connection
    exists before the old one closes, so: the will of the taken-over connection is published when
    its session ends there (the old session was clean / had expiry 0, or the new connection starts
    clean), and not when the new connection resumes the session (as Mosquitto since its issue
    1273: a device reconnecting before its old TCP connection died is not "offline")."""
    cid = unique("tkw")
    w = watcher(clients, f"{uid}/will")
    r1 = raw(version)
    r1.connect(client_id=cid, will={"topic": f"{uid}/will", "payload": b"gone", "qos": 1},
               **_session_kw(version, old))
    r2 = raw(version)
    ack = r2.connect(client_id=cid, **_session_kw(version, new))
    r1.wait_closed()
    ends = old == "clean" or new == "clean"
    assert ack.session_present == (not ends)
    if ends:
        assert w.messages.wait_topic(f"{uid}/will")[0].payload == b"gone"
    else:
        w.messages.assert_no_more(0)  # fixed negative window
    # The resumed session's will is the new connection's (none here): a later abnormal close of
    # the new connection publishes nothing more.
    r2.abort()
    w.messages.assert_no_more(1 if ends else 0)  # fixed negative window


RACE_TRIES = 40


@pytest.mark.parametrize("version", BOTH)
@pytest.mark.parametrize("clean", [True, False])
def test_no_will_after_normal_disconnect_and_immediate_reconnect(raw, clients, uid, version, clean):
    """[MQTT-3.1.2-10] / [MQTT-3.14.4-3]: a normal DISCONNECT deletes the will, whatever order the
    server handles the old connection's last packets and the new CONNECT in. A client with a will
    (v5: session expiry 60) publishes, sends DISCONNECT 0x00, closes and at once reconnects with the
    same CONNECT: the will must never be published (it was, in 3 of 5 tries)."""
    cid = unique("race")
    w = watcher(clients, f"{uid}/will")
    will = {"topic": f"{uid}/will", "payload": b"must-not-appear", "qos": 1}
    props = {P_SESSION_EXPIRY: 60} if version == V5 else None
    kw = {"properties": props} if props else {}
    r = raw(version)
    r.connect(client_id=cid, clean=clean, will=will, **kw)
    for i in range(RACE_TRIES):
        r.send(publish_packet(f"{uid}/data", b"%d" % i, qos=0, version=version)
               + disconnect_packet(version, 0 if version == V5 else None))
        r.close()
        r = raw(version)
        r.connect(client_id=cid, clean=clean, will=will, **kw)
    r.send(disconnect_packet(version, 0 if version == V5 else None))
    r.close()
    w.messages.assert_no_more(0, pred=lambda m: m.topic == f"{uid}/will")  # fixed negative window
