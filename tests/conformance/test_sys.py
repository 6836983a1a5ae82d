"""$SYS topics. $SYS is not defined by the MQTT specifications: 4.7.2 only reserves topics starting
with '$' for server-specific purposes. Millet follows the de-facto (Mosquitto) $SYS/broker/...
naming, published every --sys-interval seconds; these tests run a fresh broker with a 1 s interval
and wait with generous deadlines."""

import re
import time

import pytest

from helpers import (P_SESSION_EXPIRY, PUBLISH, V311, V5, Client, Packet, RawClient, enc_varint,
                     unique, wait_until)

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


# ---------------------------------------------------------------------------
# Mosquitto's meanings (`man mosquitto`, BROKER STATUS), checked exactly
# ---------------------------------------------------------------------------

# One broker, one raw client, nothing else connected: every byte and packet the broker counts is one
# this client sent or received. Millet publishes every $SYS topic at every interval, in this order
# (Mosquitto only those that changed: these tests are Millet's).
COUNTERS = [
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/publish/messages/received",
    "$SYS/broker/publish/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
]


class Metered(RawClient):
    """A raw client that keeps, for every packet it received, what it had received before it
    (wire bytes, packets, PUBLISH packets), and what it has sent so far."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent_bytes = self.sent_packets = self.sent_publishes = 0
        self.got_bytes = self.got_packets = self.got_publishes = 0
        self.records: list[tuple[dict, Packet]] = []

    def send(self, data: bytes) -> bool:  # one packet per call in these tests
        self.sent_bytes += len(data)
        self.sent_packets += 1
        self.sent_publishes += data[0] >> 4 == PUBLISH
        return super().send(data)

    def _try_parse(self):
        p = super()._try_parse()
        if p is not None:
            before = {"bytes": self.got_bytes, "packets": self.got_packets, "publishes": self.got_publishes}
            self.records.append((before, p))
            self.got_bytes += 1 + len(enc_varint(len(p.body))) + len(p.body)
            self.got_packets += 1
            self.got_publishes += p.type == PUBLISH
        return p

    def live_batch(self, after: int, timeout: float = 10) -> tuple[int, dict, dict]:
        """The first complete batch of live (retain 0) COUNTERS publishes starting at record index
        >= after: (its index, what this client had received before it, {topic: value})."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.records) - len(COUNTERS) + 1):
                group = self.records[i:i + len(COUNTERS)]
                pubs = [p.publish() if p.type == PUBLISH else None for _, p in group]
                if all(m is not None and not m.retain and m.topic == t for m, t in zip(pubs, COUNTERS)):
                    return i, group[0][0], {t: int(m.payload) for m, t in zip(pubs, COUNTERS)}
            try:
                self.recv(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                seen = [p.publish().topic for _, p in self.records[after:] if p.type == PUBLISH]
                raise AssertionError(f"no batch of {COUNTERS} within {timeout}s; got {seen}") from None


def _check_counts(r: Metered, after: int):
    """Skip the first batch after record ``after`` (it may have been taken while this client's last
    exchange was under way), check the next one exactly."""
    i, _, _ = r.live_batch(after)
    i, before, v = r.live_batch(i + 1)
    assert v == {
        "$SYS/broker/messages/received": r.sent_packets,
        "$SYS/broker/messages/sent": before["packets"],
        "$SYS/broker/publish/messages/received": r.sent_publishes,
        "$SYS/broker/publish/messages/sent": before["publishes"],
        "$SYS/broker/bytes/received": r.sent_bytes,
        "$SYS/broker/bytes/sent": before["bytes"],
    }


@pytest.mark.millet_only("every $SYS topic is republished at every interval")
def test_sys_wire_bytes_and_packet_counts_are_exact(sys_broker):
    """bytes/received|sent are wire bytes (every packet, fixed header included), messages/* count
    MQTT packets of any type and publish/messages/* PUBLISH packets, as Mosquitto's: equal to what
    the only client sent and received before each update."""
    r = Metered(sys_broker, V311)
    try:
        r.connect(keepalive=0)
        assert r.subscribe([(t, 0) for t in COUNTERS]) == [0] * len(COUNTERS)
        _check_counts(r, 0)
        # a QoS 1 PUBLISH with a 1000-byte payload, and its PUBACK
        r.publish(unique("sys/bytes/"), b"x" * 1000, qos=1)
        assert r.sent_publishes == 1
        _check_counts(r, len(r.records))
    finally:
        r.close()


def _latest(c) -> dict:
    out = {}
    for m in c.messages.items:
        out[m.topic] = m.payload
    return out


def _wait_values(c, expected: dict, timeout: float = 10):
    """Wait until the latest value of each topic (as an int) satisfies ``expected[topic]`` (an int,
    or a predicate)."""
    def ok():
        got = _latest(c)
        for t, want in expected.items():
            if t not in got:
                return False
            v = _int_prefix(got[t])
            if not (want(v) if callable(want) else v == want):
                return False
        return True
    try:
        wait_until(ok, timeout=timeout, what=f"$SYS values {expected}")
    except AssertionError:
        got = _latest(c)
        raise AssertionError({t: got.get(t) for t in expected}) from None


def test_sys_sessions_subscriptions_and_retained(sys_clients, sys_broker):
    """clients/total counts sessions (connected, and persistent ones whose client is offline, as
    Mosquitto's), clients/disconnected the latter, clients/maximum the most at once;
    subscriptions/count counts every session's subscriptions; retained messages/count does not count
    the $SYS topics themselves."""
    obs = sys_clients()
    obs.subscribe("$SYS/broker/clients/+", 0)
    obs.subscribe("$SYS/broker/subscriptions/count", 0)
    obs.subscribe("$SYS/broker/retained messages/count", 0)
    # a persistent session with two subscriptions, then offline
    off = RawClient(sys_broker, V311)
    off.connect(unique("offline"), clean=False)
    assert off.subscribe([("sys/a/+", 1), ("sys/b/#", 0)]) == [1, 0]
    off.disconnect()
    off.wait_closed()
    off.close()
    # two retained messages
    for t in ("sys/r1", "sys/r2"):
        obs.publish(t, b"kept", qos=1, retain=True)
    _wait_values(obs, {
        "$SYS/broker/clients/connected": 1,
        "$SYS/broker/clients/disconnected": 1,
        "$SYS/broker/clients/total": 2,
        "$SYS/broker/clients/maximum": 2,
        "$SYS/broker/subscriptions/count": 3 + 2,
        "$SYS/broker/retained messages/count": 2,
    })


def test_sys_clients_expired(sys_clients, sys_broker):
    """clients/expired counts persistent sessions removed at the end of their expiry interval."""
    obs = sys_clients()
    obs.subscribe("$SYS/broker/clients/+", 0)
    _wait_values(obs, {"$SYS/broker/clients/expired": 0, "$SYS/broker/clients/total": 1})
    r = RawClient(sys_broker, V5)
    r.connect(unique("expiring"), clean=True, properties={P_SESSION_EXPIRY: 1})
    r.disconnect()
    r.wait_closed()
    r.close()
    _wait_values(obs, {"$SYS/broker/clients/expired": 1, "$SYS/broker/clients/total": 1,
                       "$SYS/broker/clients/disconnected": 0})


LOAD_TOPICS = [f"$SYS/broker/load/{what}/{w}"
               for what in ("messages/received", "messages/sent", "publish/received", "publish/sent",
                            "publish/dropped", "bytes/received", "bytes/sent")
               for w in ("1min", "5min", "15min")]
NEW_TOPICS = [
    "$SYS/broker/clients/disconnected",
    "$SYS/broker/clients/expired",
    "$SYS/broker/clients/maximum",
    "$SYS/broker/clients/total",
    "$SYS/broker/publish/messages/received",
    "$SYS/broker/publish/messages/sent",
    "$SYS/broker/publish/messages/dropped",
    "$SYS/broker/subscriptions/count",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/memory/rss",
    "$SYS/broker/store/bytes",
]


@pytest.mark.millet_only("memory/rss and store/bytes are Millet's")
def test_sys_new_topics_are_numbers_and_loads_move(sys_clients):
    """Every topic listed in the README exists and is a number; the load averages (per minute,
    damped over 1/5/15 minutes as Mosquitto's) rise after a burst of publishes, the 1-minute one
    fastest."""
    c = sys_clients()
    c.subscribe("$SYS/#", 0)
    for t in NEW_TOPICS + LOAD_TOPICS:
        c.messages.wait_topic(t, timeout=10)
    got = _latest(c)
    for t in NEW_TOPICS:
        assert re.fullmatch(rb"\d+", got[t]), (t, got[t])
    for t in LOAD_TOPICS:
        assert re.fullmatch(rb"\d+\.\d\d", got[t]), (t, got[t])
    assert int(got["$SYS/broker/memory/rss"]) > 1 << 20
    assert int(got["$SYS/broker/store/bytes"]) > 0  # the default durable store has files
    for i in range(20):
        c.publish("sys/load", b"%d" % i, qos=1)
    load = "$SYS/broker/load/publish/received/"

    def risen():
        g = _latest(c)
        vals = [float(g.get(load + w, b"0")) for w in ("1min", "5min", "15min")]
        return vals[0] > vals[1] > vals[2] > 0
    wait_until(risen, timeout=10, what="publish load averages rising")
