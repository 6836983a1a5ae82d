"""Retained messages: store, replace, delete, retain flag on delivery, MQTT 5 Retain Handling and
Retain As Published, retained message expiry."""

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from helpers import V31, V311, V5, props

ALL = [V31, V311, V5]
BOTH = [V311, V5]


def publisher(clients, version=V311):
    p = clients(version)
    p.connect()
    return p


@pytest.mark.parametrize("version", ALL)
def test_retained_delivered_on_subscribe(clients, uid, version):
    """3.1.1 [MQTT-3.3.1-5] the server stores a retained message; [MQTT-3.3.1-6] it is sent to a new
    matching subscription; [MQTT-3.3.1-8] with RETAIN=1. (5.0: [MQTT-3.3.1-5], [MQTT-3.3.1-9].)"""
    pub = publisher(clients, version)
    pub.publish(f"{uid}/r", b"retained-1", qos=1, retain=True)
    sub = clients(version)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1)
    m = sub.messages.wait_for(1)[0]
    assert (m.payload, m.retain, m.qos) == (b"retained-1", True, 1)
    sub.messages.assert_no_more(1)


@pytest.mark.parametrize("version", BOTH)
def test_retained_message_replaced(clients, uid, version):
    """[MQTT-3.3.1-5] a new retained message replaces any existing one on that topic."""
    pub = publisher(clients, version)
    pub.publish(f"{uid}/r", b"old", qos=1, retain=True)
    pub.publish(f"{uid}/r", b"new", qos=1, retain=True)
    sub = clients(version)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1)
    assert sub.messages.wait_for(1)[0].payload == b"new"
    sub.messages.assert_no_more(1)


@pytest.mark.parametrize("version", BOTH)
def test_empty_retained_payload_deletes(clients, uid, version):
    """3.1.1 [MQTT-3.3.1-10] / 5.0 [MQTT-3.3.1-6]: a retained PUBLISH with a zero-byte payload removes
    the retained message and is forwarded to current subscribers as a normal message;
    3.1.1 [MQTT-3.3.1-11] / 5.0 [MQTT-3.3.1-7]: it is not stored."""
    pub = publisher(clients, version)
    pub.publish(f"{uid}/r", b"to-delete", qos=1, retain=True)
    live = clients(version)
    live.connect()
    live.subscribe(f"{uid}/r", 1)
    live.messages.wait_for(1)  # the retained one
    pub.publish(f"{uid}/r", b"", qos=1, retain=True)
    msgs = live.messages.wait_for(2)
    assert msgs[1].payload == b""
    late = clients(version)
    late.connect()
    late.subscribe(f"{uid}/r", 1)
    late.messages.assert_no_more(0)  # fixed negative window


@pytest.mark.parametrize("version", ALL)
def test_live_forwarded_message_has_retain_cleared(clients, uid, version):
    """3.1.1 [MQTT-3.3.1-9] the server MUST set RETAIN=0 when forwarding to an established
    subscription, however it was set in the received message (5.0: [MQTT-3.3.1-12] with the default
    Retain As Published = 0)."""
    sub = clients(version)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1)
    pub = publisher(clients, version)
    pub.publish(f"{uid}/r", b"live", qos=1, retain=True)
    m = sub.messages.wait_for(1)[0]
    assert m.payload == b"live" and m.retain is False
    pub.publish(f"{uid}/r", b"", qos=1, retain=True)


@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_retained_delivered_at_min_qos(clients, uid, sub_qos):
    """[MQTT-3.8.4-6] (min of message QoS and granted QoS) also applies to retained messages."""
    pub = publisher(clients)
    pub.publish(f"{uid}/r", b"q2", qos=2, retain=True)
    sub = clients(V311)
    sub.connect()
    sub.subscribe(f"{uid}/r", sub_qos)
    m = sub.messages.wait_for(1)[0]
    assert m.retain and m.qos == sub_qos


def test_retained_qos0_replaces_existing(clients, uid):
    """3.1.1 [MQTT-3.3.1-7]: a QoS 0 retained message MUST discard any message previously retained
    for that topic (the server SHOULD store the QoS 0 one, but MAY discard it later)."""
    pub = publisher(clients)
    pub.publish(f"{uid}/r", b"q1", qos=1, retain=True)
    pub.publish(f"{uid}/r", b"q0", qos=0, retain=True)
    # make sure the QoS 0 publish was processed: a later QoS 1 on another topic completes
    pub.publish(f"{uid}/sync", b"s", qos=1)
    sub = clients(V311)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1)
    msgs = sub.messages.settle()  # fixed window: the QoS 0 message may or may not be kept
    assert all(m.payload == b"q0" for m in msgs), [m.payload for m in msgs]


@pytest.mark.parametrize("version", BOTH)
def test_retained_messages_matched_by_wildcards(clients, uid, version):
    """[MQTT-3.3.1-6] every retained message on every topic matching the new filter is sent."""
    pub = publisher(clients, version)
    for t in ("a", "a/b", "c/d/e"):
        pub.publish(f"{uid}/{t}", t.encode(), qos=1, retain=True)
    sub = clients(version)
    sub.connect()
    sub.subscribe(f"{uid}/#", 1)
    msgs = sub.messages.wait_for(3)
    assert sorted(m.payload for m in msgs) == [b"a", b"a/b", b"c/d/e"]
    assert all(m.retain for m in msgs)
    sub2 = clients(version)
    sub2.connect()
    sub2.subscribe(f"{uid}/+/b", 1)
    assert [m.payload for m in sub2.messages.wait_for(1)] == [b"a/b"]
    sub2.messages.assert_no_more(1)


@pytest.mark.parametrize("version", BOTH)
def test_resubscribe_resends_retained(clients, uid, version):
    """[MQTT-3.8.4-3] a SUBSCRIBE identical to an existing one replaces it and the retained messages
    are re-sent (5.0: with Retain Handling 0)."""
    pub = publisher(clients, version)
    pub.publish(f"{uid}/r", b"again", qos=1, retain=True)
    sub = clients(version)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1)
    sub.messages.wait_for(1)
    sub.subscribe(f"{uid}/r", 1)
    msgs = sub.messages.wait_for(2)
    assert all(m.payload == b"again" and m.retain for m in msgs)


def test_v5_retain_handling_0_always_sends(clients, uid):
    """5.0 [MQTT-3.3.1-9] Retain Handling 0: retained messages are sent on every subscribe."""
    pub = publisher(clients, V5)
    pub.publish(f"{uid}/r", b"rh0", qos=1, retain=True)
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1, retain_handling=0)
    sub.messages.wait_for(1)
    sub.subscribe(f"{uid}/r", 1, retain_handling=0)
    sub.messages.wait_for(2)


def test_v5_retain_handling_1_only_new_subscription(clients, uid):
    """5.0 [MQTT-3.3.1-10] Retain Handling 1: retained messages are sent only if the subscription did
    not already exist."""
    pub = publisher(clients, V5)
    pub.publish(f"{uid}/r", b"rh1", qos=1, retain=True)
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1, retain_handling=1)
    assert sub.messages.wait_for(1)[0].payload == b"rh1"
    sub.subscribe(f"{uid}/r", 1, retain_handling=1)
    sub.messages.assert_no_more(1)  # fixed negative window


def test_v5_retain_handling_2_never_sends(clients, uid):
    """5.0 [MQTT-3.3.1-11] Retain Handling 2: retained messages are not sent on subscribe; live
    messages still flow."""
    pub = publisher(clients, V5)
    pub.publish(f"{uid}/r", b"rh2", qos=1, retain=True)
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1, retain_handling=2)
    pub.publish(f"{uid}/r", b"live", qos=1)
    sub.messages.wait_for(1)
    msgs = sub.messages.assert_no_more(1)
    assert msgs[0].payload == b"live"


@pytest.mark.parametrize("rap", [False, True])
def test_v5_retain_as_published(clients, uid, rap):
    """5.0 [MQTT-3.3.1-12] Retain As Published 0 -> forwarded RETAIN is 0; [MQTT-3.3.1-13] Retain As
    Published 1 -> RETAIN equals the flag of the received PUBLISH."""
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1, retain_as_published=rap)
    pub = publisher(clients, V5)
    pub.publish(f"{uid}/r", b"retained", qos=1, retain=True)
    pub.publish(f"{uid}/r", b"plain", qos=1, retain=False)
    msgs = sub.messages.wait_for(2)
    assert [(m.payload, m.retain) for m in msgs] == [(b"retained", rap), (b"plain", False)]
    pub.publish(f"{uid}/r", b"", qos=1, retain=True)


def test_v5_retained_message_expires(clients, uid):
    """5.0 [MQTT-3.3.2-5]: once the Message Expiry Interval has passed, the retained message is no
    longer delivered. (Deliberately waits 1.5 s for a 1 s expiry to elapse.)"""
    pub = publisher(clients, V5)
    pub.publish(f"{uid}/r", b"short-lived", qos=1, retain=True,
                properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish(f"{uid}/keep", b"kept", qos=1, retain=True)
    time.sleep(1.5)
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1)
    sub.subscribe(f"{uid}/keep", 1)
    sub.messages.wait_for(1, pred=lambda m: m.payload == b"kept")
    sub.messages.assert_no_more(0, pred=lambda m: m.payload == b"short-lived")


def test_v5_retained_message_keeps_properties(clients, uid):
    """5.0 [MQTT-3.3.2-4] [MQTT-3.3.2-17] [MQTT-3.3.2-20]: a retained message delivered on subscribe
    carries its Payload Format Indicator, Content Type and User Properties unaltered, and
    [MQTT-3.3.2-6] a Message Expiry Interval no larger than the one published."""
    pub = publisher(clients, V5)
    pub.publish(f"{uid}/r", b"{}", qos=1, retain=True,
                properties=props(PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="application/json",
                                 UserProperty=[("k", "v1"), ("k", "v2")], MessageExpiryInterval=300))
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/r", 1)
    m = sub.messages.wait_for(1)[0]
    assert m.retain
    assert m.prop("PayloadFormatIndicator") == 1
    assert m.prop("ContentType") == "application/json"
    assert m.prop("UserProperty") == [("k", "v1"), ("k", "v2")]
    assert 0 < m.prop("MessageExpiryInterval", 0) <= 300
