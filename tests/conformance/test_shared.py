"""MQTT 5 shared subscriptions ($share/{ShareName}/{filter}), section 4.8.2."""

import collections

import pytest

from helpers import V5, wait_until


def members(clients, group_filter, n, qos=1):
    out = []
    for _ in range(n):
        c = clients(V5)
        c.connect()
        assert c.subscribe(group_filter, qos) == [qos]
        out.append(c)
    return out


def publish_n(clients, topic, n, qos=1):
    pub = clients(V5)
    pub.connect()
    for i in range(n):
        pub.publish(topic, b"%d" % i, qos=qos)
    return pub


def total(cs):
    return sum(len(c.messages) for c in cs)


def test_shared_each_message_to_exactly_one_member(clients, uid):
    """5.0 4.8.2: each message matching a shared subscription is sent to exactly one of the sessions
    attached to it: the union over members is every message, with no duplicates."""
    n = 20
    group = members(clients, f"$share/g1/{uid}/s", 2)
    publish_n(clients, f"{uid}/s", n)
    # wait until all n arrived across the group (bounded), then check for extra copies
    wait_until(lambda: total(group) >= n, what=f"{n} messages across the share group")
    for c in group:
        c.messages.settle(0.3)
    payloads = [m.payload for c in group for m in c.messages.items]
    assert sorted(payloads, key=int) == [b"%d" % i for i in range(n)], payloads
    for c in group:
        assert all(m.topic == f"{uid}/s" for m in c.messages.items)


def test_shared_messages_distributed_round_robin(clients, uid):
    """5.0 4.8.2 leaves the choice of member to the server; Millet (like mosquitto) distributes
    round-robin, so with two idle members and 20 messages each member receives 10."""
    n = 20
    group = members(clients, f"$share/rr/{uid}/s", 2)
    publish_n(clients, f"{uid}/s", n)
    wait_until(lambda: total(group) >= n, what=f"{n} messages across the share group")
    counts = [len(c.messages) for c in group]
    assert abs(counts[0] - counts[1]) <= 1, f"distribution {counts}"


def test_shared_member_qos_respected(clients, uid):
    """5.0 [MQTT-4.8.2-3]: the server MUST respect the granted QoS of the member's subscription."""
    group = members(clients, f"$share/q/{uid}/s", 1, qos=0)
    publish_n(clients, f"{uid}/s", 3, qos=2)
    msgs = group[0].messages.wait_for(3)
    assert [m.qos for m in msgs] == [0, 0, 0]


@pytest.mark.millet_only(reason="mosquitto 2.0.11 sends retained messages to new shared subscriptions")
def test_shared_subscription_gets_no_retained_messages(clients, uid):
    """5.0 4.8.2 / 3.3.1.3: retained messages are sent on new *non-shared* subscriptions only; a
    shared subscription does not receive them (live messages still arrive)."""
    pub = clients(V5)
    pub.connect()
    pub.publish(f"{uid}/r", b"retained", qos=1, retain=True)
    group = members(clients, f"$share/ret/{uid}/r", 1)
    normal = clients(V5)
    normal.connect()
    normal.subscribe(f"{uid}/r", 1)
    normal.messages.wait_for(1)  # the non-shared subscription does get it
    pub.publish(f"{uid}/r", b"live", qos=1)
    msgs = group[0].messages.wait_for(1)
    assert [m.payload for m in group[0].messages.settle()] == [b"live"], [m.payload for m in msgs]
    pub.publish(f"{uid}/r", b"", qos=1, retain=True)


def test_shared_and_non_shared_coexist(clients, uid):
    """5.0 4.8.2: a shared subscription group and an ordinary subscription on the same filter each
    receive the message (the group once, the ordinary subscriber once)."""
    n = 6
    group = members(clients, f"$share/mix/{uid}/s", 2)
    normal = clients(V5)
    normal.connect()
    normal.subscribe(f"{uid}/s", 1)
    publish_n(clients, f"{uid}/s", n)
    assert len(normal.messages.wait_for(n)) == n
    wait_until(lambda: total(group) >= n, what="group messages")
    for c in group:
        c.messages.settle(0.2)
    assert total(group) == n


def test_two_share_groups_each_get_a_copy(clients, uid):
    """5.0 4.8.2: different ShareNames are independent shared subscriptions; each group receives
    every message once."""
    n = 6
    g1 = members(clients, f"$share/a/{uid}/s", 2)
    g2 = members(clients, f"$share/b/{uid}/+", 2)
    publish_n(clients, f"{uid}/s", n)
    for g in (g1, g2):
        wait_until(lambda: total(g) >= n, what="group messages")
    for c in g1 + g2:
        c.messages.settle(0.1)
    for g in (g1, g2):
        payloads = collections.Counter(m.payload for c in g for m in c.messages.items)
        assert payloads == collections.Counter(b"%d" % i for i in range(n))


def test_shared_unsubscribe_member(clients, uid):
    """5.0 3.10.4 / 4.8.2: after one member unsubscribes, the remaining member receives every message."""
    group = members(clients, f"$share/u/{uid}/s", 2)
    assert group[0].unsubscribe(f"$share/u/{uid}/s") == [0]
    publish_n(clients, f"{uid}/s", 4)
    assert len(group[1].messages.wait_for(4)) == 4
    group[0].messages.assert_no_more(0)


def test_shared_member_disconnect(clients, uid):
    """5.0 4.8.2: when a member's session ends, messages go to the remaining members."""
    group = members(clients, f"$share/d/{uid}/s", 2)
    group[0].disconnect()
    publish_n(clients, f"{uid}/s", 4)
    assert len(group[1].messages.wait_for(4)) == 4


_MOSQ_GRANTS = pytest.mark.millet_only(reason="mosquitto 2.0.11 grants this malformed shared filter (SUBACK 1)")


@pytest.mark.parametrize("bad", [
    "$share/g+/t", "$share/g#/t",
    pytest.param("$share/g", marks=_MOSQ_GRANTS),
    pytest.param("$share//t", marks=_MOSQ_GRANTS),
    pytest.param("$share/g/", marks=_MOSQ_GRANTS),
])
def test_invalid_shared_subscription_filter_rejected(raw, bad):
    """5.0 [MQTT-4.8.2-1] a ShareName is at least one character long and [MQTT-4.8.2-2] contains no
    '/', '+' or '#' and is followed by '/' and a Topic Filter. An invalid one is never granted: SUBACK
    with a reason code >= 0x80 (normally 0x8F), or DISCONNECT (>= 0x80) / close."""
    from helpers import DISCONNECT, SUBACK, subscribe_packet
    r = raw(V5)
    r.connect()
    r.send(subscribe_packet(3, [(bad, 1)], V5))
    p = r.recv()
    if p is None:
        return
    if p.type == SUBACK:
        pid, codes, _ = p.suback()
        assert pid == 3 and len(codes) == 1 and codes[0] >= 0x80, f"{bad!r} granted: {codes}"
    else:
        assert p.type == DISCONNECT and p.disconnect()[0] >= 0x80, p
        assert r.wait_closed() == []
