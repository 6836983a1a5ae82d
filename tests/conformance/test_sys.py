"""$SYS topics. $SYS is not defined by the MQTT specifications: 4.7.2 only reserves topics starting
with '$' for server-specific purposes. Millet follows the de-facto (Mosquitto) $SYS/broker/...
naming, published every --sys-interval seconds; these tests run a fresh broker with a 1 s interval
and wait with generous deadlines."""

import re

import pytest

from helpers import V311, V5, Client

SYS_TOPICS = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/messages/received",
]


@pytest.fixture
def sys_broker(broker_factory):
    return broker_factory(sys_interval=1)


@pytest.fixture
def sys_clients(sys_broker):
    made = []

    def make(version=V311):
        c = Client(sys_broker, version)
        made.append(c)
        c.connect()
        return c

    yield make
    for c in made:
        c.close()


def _int_prefix(payload: bytes) -> int:
    m = re.match(rb"\s*(\d+)", payload)
    assert m, f"expected a number, got {payload!r}"
    return int(m.group(1))


@pytest.mark.parametrize("version", [V311, V5])
def test_sys_topics_published(sys_clients, version):
    """4.7.2 ($-topics are server-specific): subscribing to $SYS/# yields the broker version, uptime,
    connected clients count and received messages count."""
    c = sys_clients(version)
    c.subscribe("$SYS/#", 0)
    for t in SYS_TOPICS:
        c.messages.wait_topic(t, timeout=10)
    by_topic = {m.topic: m.payload for m in c.messages.items}
    assert by_topic["$SYS/broker/version"].strip(), "empty version"
    _int_prefix(by_topic["$SYS/broker/uptime"])
    # the first value may be a retained one from before this client connected: wait for >= 1
    c.messages.wait_for(1, timeout=10, pred=lambda m: m.topic == "$SYS/broker/clients/connected"
                        and _int_prefix(m.payload) >= 1)
    _int_prefix(by_topic["$SYS/broker/messages/received"])


def test_sys_uptime_advances(sys_clients):
    """$SYS/broker/uptime is republished periodically (sys interval 1 s) and increases."""
    c = sys_clients()
    c.subscribe("$SYS/broker/uptime", 0)
    c.messages.wait_for(1, timeout=10)
    first = _int_prefix(c.messages.items[0].payload)
    c.messages.wait_for(1, timeout=10, pred=lambda m: _int_prefix(m.payload) > first)


def test_sys_clients_connected_tracks_connections(sys_clients):
    """$SYS/broker/clients/connected reflects additional connections (eventually >= 3 with three
    clients connected)."""
    c = sys_clients()
    sys_clients()
    sys_clients()
    c.subscribe("$SYS/broker/clients/connected", 0)
    c.messages.wait_for(1, timeout=10, pred=lambda m: _int_prefix(m.payload) >= 3)


def test_sys_messages_received_counts(sys_clients):
    """$SYS/broker/messages/received grows after clients publish."""
    c = sys_clients()
    c.subscribe("$SYS/broker/messages/received", 0)
    c.messages.wait_for(1, timeout=10)
    before = _int_prefix(c.messages.items[-1].payload)
    for i in range(5):
        c.publish("sys/test", b"%d" % i, qos=1)
    c.messages.wait_for(1, timeout=10, pred=lambda m: _int_prefix(m.payload) >= before + 5)


def test_clients_cannot_publish_into_sys(sys_clients):
    """4.7.2: the server SHOULD prevent clients from using $-topics to exchange messages with other
    clients: a client publishing to $SYS/broker/version does not replace what subscribers see."""
    pub = sys_clients()
    pub.publish("$SYS/broker/version", b"forged", qos=1)
    c = sys_clients()
    c.subscribe("$SYS/broker/version", 0)
    c.messages.wait_for(1, timeout=10)
    msgs = c.messages.settle(1.2)
    assert all(m.payload != b"forged" for m in msgs), [m.payload for m in msgs]
