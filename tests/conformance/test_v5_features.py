"""MQTT 5 features: topic aliases, message expiry, forwarded PUBLISH properties, request/response."""

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from helpers import (
    DISCONNECT, PUBLISH, V311, V5, RawClient, props, publish_packet, session_client, sub_opts, unique,
    P_TOPIC_ALIAS, P_TOPIC_ALIAS_MAXIMUM,
)


@pytest.fixture
def alias_broker(broker_factory):
    """A broker with an explicit Topic Alias Maximum of 10."""
    return broker_factory(topic_alias_max=10)


def test_v5_inbound_topic_alias(alias_broker):
    """5.0 3.3.2.3.4 [MQTT-3.3.2-12]: the server accepts Topic Alias values 1..Topic Alias Maximum;
    a PUBLISH with a topic and an alias sets the mapping, a later PUBLISH with an empty topic and that
    alias is delivered on the mapped topic; a mapping can be changed."""
    b = alias_broker
    sub = RawClient(b, V5)
    pub = RawClient(b, V5)
    try:
        sub.connect()
        sub.subscribe([("alias/#", sub_opts(1))])
        ack = pub.connect()
        assert ack.props.get(P_TOPIC_ALIAS_MAXIMUM) == 10
        pub.publish("alias/one", b"a", qos=1, properties={P_TOPIC_ALIAS: 10})
        pub.publish("", b"b", qos=1, properties={P_TOPIC_ALIAS: 10})
        pub.publish("alias/two", b"c", qos=1, properties={P_TOPIC_ALIAS: 10})  # re-map
        pub.publish("", b"d", qos=1, properties={P_TOPIC_ALIAS: 10})
        pub.publish("", b"e", qos=0, properties={P_TOPIC_ALIAS: 10})
        got = []
        for _ in range(5):
            m = sub.recv_publish()
            if m.qos:
                sub.puback(m.pid)
            got.append((m.topic, m.payload))
            assert P_TOPIC_ALIAS not in m.props, "subscriber sent no Topic Alias Maximum: no aliases allowed"
        assert got == [("alias/one", b"a"), ("alias/one", b"b"), ("alias/two", b"c"), ("alias/two", b"d"),
                       ("alias/two", b"e")]
    finally:
        sub.close()
        pub.close()


def test_v5_topic_alias_not_carried_across_connections(alias_broker):
    """5.0 [MQTT-3.3.2-7]: Topic Alias mappings exist only within a network connection; using an
    alias defined on a previous connection is a Protocol Error (empty topic, unmapped alias)."""
    b = alias_broker
    cid = unique("alias")
    r1 = RawClient(b, V5)
    r1.connect(client_id=cid)
    r1.publish("alias/x", b"a", qos=1, properties={P_TOPIC_ALIAS: 1})
    r1.disconnect()
    r1.close()
    r2 = RawClient(b, V5)
    try:
        r2.connect(client_id=cid)
        r2.send(publish_packet("", b"b", qos=1, pid=2, version=V5, properties={P_TOPIC_ALIAS: 1}))
        pkts = r2.wait_closed()
        if pkts:
            assert len(pkts) == 1 and pkts[0].type == DISCONNECT, pkts
            assert pkts[0].disconnect()[0] in (0x82, 0x94)
    finally:
        r2.close()


def test_v5_outbound_topic_alias_valid(alias_broker):
    """5.0 [MQTT-3.1.2-26] / [MQTT-3.3.2-11]: if the server uses Topic Aliases towards a client they
    are within 1..the client's Topic Alias Maximum, and every PUBLISH resolves to the real topic
    (an empty topic only with an alias the server defined earlier on this connection)."""
    b = alias_broker
    sub = RawClient(b, V5)
    pub = RawClient(b, V5)
    try:
        sub.connect(properties={P_TOPIC_ALIAS_MAXIMUM: 2})
        sub.subscribe([("out/#", sub_opts(0))])
        pub.connect()
        sent = [f"out/{t}" for t in ("a", "a", "b", "a", "c", "c", "b", "a")]
        for i, t in enumerate(sent):
            pub.publish(t, str(i).encode(), qos=1)
        mapping = {}
        resolved = []
        for _ in sent:
            m = sub.recv_publish()
            alias = m.props.get(P_TOPIC_ALIAS)
            topic = m.topic
            if alias is not None:
                assert 1 <= alias <= 2, f"alias {alias} outside 1..2"
                if topic:
                    mapping[alias] = topic
                else:
                    assert alias in mapping, f"empty topic with undefined alias {alias}"
                    topic = mapping[alias]
            else:
                assert topic, "empty topic without alias"
            resolved.append(topic)
        assert resolved == sent
    finally:
        sub.close()
        pub.close()


def test_v5_message_expiry_for_offline_session(clients, uid):
    """5.0 [MQTT-3.3.2-5]: a message whose Message Expiry Interval passed while queued for an offline
    session is not delivered; [MQTT-3.3.2-6]: a delivered message's expiry is the received value minus
    the time it waited. (Deliberately waits 1.5 s with the session offline.)"""
    cid = unique("exp")
    c, _ = session_client(clients, V5, cid, clean=False)
    c.subscribe(f"{uid}/e", 1)
    c.disconnect()
    pub = clients(V5)
    pub.connect()
    pub.publish(f"{uid}/e", b"expires", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish(f"{uid}/e", b"decrements", qos=1,
                properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    pub.publish(f"{uid}/e", b"forever", qos=1)
    time.sleep(1.5)
    c2, ack = session_client(clients, V5, cid, clean=False)
    assert ack.session_present
    c2.messages.wait_for(1, pred=lambda m: m.payload == b"forever")
    msgs = c2.messages.items
    payloads = [m.payload for m in msgs]
    # same topic, QoS and publisher: ordered, so "expires" would have arrived before "forever"
    assert b"expires" not in payloads, payloads
    assert payloads == [b"decrements", b"forever"], payloads
    remaining = msgs[0].prop("MessageExpiryInterval")
    assert remaining is not None and 1 <= remaining <= 59, f"expiry forwarded as {remaining}"
    assert msgs[1].prop("MessageExpiryInterval") is None


def test_v5_message_expiry_forwarded_live(clients, uid):
    """5.0 [MQTT-3.3.2-6]: a message delivered immediately carries a Message Expiry Interval no larger
    than the published one (and non-zero)."""
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/e", 1)
    pub = clients(V5)
    pub.connect()
    pub.publish(f"{uid}/e", b"x", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=120))
    m = sub.messages.wait_for(1)[0]
    assert 100 <= m.prop("MessageExpiryInterval", 0) <= 120


def test_v5_publish_properties_forwarded_unchanged(clients, uid):
    """5.0: Payload Format Indicator [MQTT-3.3.2-4], Response Topic [MQTT-3.3.2-15], Correlation Data
    [MQTT-3.3.2-16], User Properties unaltered and in order [MQTT-3.3.2-17] [MQTT-3.3.2-18], Content
    Type [MQTT-3.3.2-20] are forwarded unchanged to subscribers."""
    sub = clients(V5)
    sub.connect()
    sub.subscribe(f"{uid}/p", 2)
    pub = clients(V5)
    pub.connect()
    user = [("z", "1"), ("a", "2"), ("z", "3"), ("ключ", "значение"), ("empty", "")]
    pub.publish(f"{uid}/p", "héllo".encode(), qos=2, properties=props(
        PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="text/plain; charset=utf-8",
        ResponseTopic=f"{uid}/reply", CorrelationData=b"\x00\xffcorr", UserProperty=user))
    m = sub.messages.wait_for(1)[0]
    assert m.payload == "héllo".encode()
    assert m.prop("PayloadFormatIndicator") == 1
    assert m.prop("ContentType") == "text/plain; charset=utf-8"
    assert m.prop("ResponseTopic") == f"{uid}/reply"
    assert m.prop("CorrelationData") == b"\x00\xffcorr"
    assert m.prop("UserProperty") == user


def test_v5_properties_not_leaked_to_v311_subscriber(clients, uid):
    """A 3.1.1 subscriber receives the plain message (topic, payload, QoS) of a v5 publication that
    carried properties (3.1.1 has no properties on the wire)."""
    sub = clients(V311)
    sub.connect()
    sub.subscribe(f"{uid}/p", 1)
    pub = clients(V5)
    pub.connect()
    pub.publish(f"{uid}/p", b"v5-msg", qos=1, properties=props(
        PacketTypes.PUBLISH, ContentType="x/y", UserProperty=[("k", "v")]))
    m = sub.messages.wait_for(1)[0]
    assert (m.topic, m.payload, m.qos) == (f"{uid}/p", b"v5-msg", 1)


def test_v5_request_response(clients, uid):
    """5.0 4.10 request/response: the responder gets the Response Topic and Correlation Data of the
    request and its response reaches the requester with the same Correlation Data."""
    responder = clients(V5)
    responder.connect()
    responder.subscribe(f"{uid}/service", 1)
    requester = clients(V5)
    requester.connect()
    requester.subscribe(f"{uid}/replies/me", 1)
    requester.publish(f"{uid}/service", b"ping", qos=1, properties=props(
        PacketTypes.PUBLISH, ResponseTopic=f"{uid}/replies/me", CorrelationData=b"req-42"))
    req = responder.messages.wait_for(1)[0]
    assert req.prop("ResponseTopic") == f"{uid}/replies/me"
    responder.publish(req.prop("ResponseTopic"), b"pong", qos=1, properties=props(
        PacketTypes.PUBLISH, CorrelationData=req.prop("CorrelationData")))
    resp = requester.messages.wait_for(1)[0]
    assert resp.payload == b"pong" and resp.prop("CorrelationData") == b"req-42"


def test_v5_publish_to_topic_with_spaces_and_levels_keeps_topic(raw, uid):
    """5.0 [MQTT-3.3.2-3]: the Topic Name in a PUBLISH sent to a subscriber matches the subscription's
    filter (is the published topic, including empty levels)."""
    r = raw(V5)
    r.connect()
    topic = f"{uid}//a b//"
    r.subscribe([(f"{uid}/#", 0)])
    r.publish(topic, b"x", qos=0)
    assert r.recv_publish().topic == topic
