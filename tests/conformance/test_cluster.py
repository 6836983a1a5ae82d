"""Cluster mode (issue 13, docs/CLUSTER.md): Millet nodes joined through
NATS. Three nodes, each on its own server of a three-server NATS cluster
(scripts/cluster-up.sh), with independent MQTT clients (paho) on each.

Covered here: live routing across nodes (wildcards, every QoS, 3.1.1 and
5.0, no copies doubled for own messages or overlapping filters,
per-publisher order), shared subscriptions balanced across nodes, a node's
NATS interest following its subscriptions, takeover across nodes, and
retained messages kept in JetStream. Failures (NATS down, nodes killed) are
in test_cluster_failure.py.
"""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

from conftest import REPO, Broker, free_port
from helpers import HOST, TIMEOUT, V311, V5, Client, unique, wait_until

BASE = 24720  # NATS_PORT_BASE: away from cluster-up.sh's default and test_cluster_infra's


def nats_cluster_up(base):
    """Start a three-server NATS cluster at NATS_PORT_BASE `base`
    (scripts/cluster-up.sh, no Millet nodes); its run directory."""
    if os.environ.get("MILLET_ENGINE__TEST_DELAY_MS"):
        pytest.skip("the delaying engine is the embedded one's test wrapper; cluster mode runs once")
    run = tempfile.mkdtemp(prefix="millet-nats-")
    env = dict(os.environ, NATS_PORT_BASE=str(base), MILLET_NODES="0")
    up = subprocess.run([os.path.join(REPO, "scripts", "cluster-up.sh"), run], env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr + up.stdout
    return run


def nats_cluster_down(run):
    subprocess.run([os.path.join(REPO, "scripts", "cluster-down.sh"), run], timeout=60)


@pytest.fixture(scope="module")
def nats_urls():
    run = nats_cluster_up(BASE)
    yield [f"nats://127.0.0.1:{BASE + i}" for i in (1, 2, 3)]
    nats_cluster_down(run)


@pytest.fixture(scope="module")
def nodes(nats_urls):
    """Three Millet nodes, node i on NATS server i."""
    started = []
    try:
        for i, url in enumerate(nats_urls, 1):
            b = Broker(kind="millet", host=HOST, port=free_port(), settings={},
                       args=["--nats", url, "--node-id", f"n{i}", "--no-admin"])
            started.append(b)
            b.start()
        yield started
    finally:
        for b in started:
            b.stop()


@pytest.fixture
def on(nodes):
    """``on(i, version)``: a paho client for node i (0-based); all closed at teardown."""
    made = []

    def make(i, version=V311, **kw):
        c = Client(nodes[i], version, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
    for b in nodes:
        assert b.alive(), f"node died:\n{b.log_tail()}"


def reached(pub, sub, topic, qos=0):
    """Publish probes on `topic` from `pub` until `sub` gets one: NATS
    propagates a subscription to the other servers of its cluster
    asynchronously, after the SUBACK. Bounded; the probes are cleared."""
    deadline = time.monotonic() + 10
    while not sub.messages.items:
        assert time.monotonic() < deadline, f"{topic}: no probe reached {sub.client_id} in 10 s"
        pub.publish(topic, b"probe", qos=qos)
        time.sleep(0.05)
    time.sleep(0.2)  # late probes in flight land before the clear (they are skipped below anyway)
    sub.messages.clear()


def payloads(c, prefix=b""):
    return [m.payload for m in c.messages.items if m.payload.startswith(prefix)]


@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_a_publish_on_one_node_reaches_wildcard_subscribers_on_the_others(on, version, qos):
    t = unique("cl/w")
    a, b, c = on(0, version), on(1, version), on(2, version)
    for x in (a, b, c):
        x.connect()
    assert b.subscribe(f"{t}/+/x", 2) == [2]
    assert c.subscribe(f"{t}/#", 1) == [1]
    reached(a, b, f"{t}/p/x")
    reached(a, c, f"{t}/p/x")
    kw = {}
    if version == V5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("k", "v")]
        props.ContentType = "text/plain"
        kw["properties"] = props
    for i in range(20):
        a.publish(f"{t}/d{i}/x", b"m%d" % i, qos=qos, **kw)
    want = [b"m%d" % i for i in range(20)]
    wait_until(lambda: len(payloads(b, b"m")) >= 20 and len(payloads(c, b"m")) >= 20,
               what="20 messages on both nodes")
    time.sleep(0.3)  # any extra copy would land within this window
    assert payloads(b, b"m") == want, "each once, in the publisher's order"
    assert payloads(c, b"m") == want
    got_b = [m for m in b.messages.items if m.payload.startswith(b"m")]
    got_c = [m for m in c.messages.items if m.payload.startswith(b"m")]
    assert {m.qos for m in got_b} == {qos}
    assert {m.qos for m in got_c} == {min(qos, 1)}
    if version == V5:
        for m in got_b + got_c:
            assert m.props.get("UserProperty") == [("k", "v")]
            assert m.props.get("ContentType") == "text/plain"


def test_a_node_routes_its_own_messages_once(on):
    """A local subscriber gets a local publish in-process; the copy NATS
    sends back to its node (the node subscribes for it) is dropped."""
    t = unique("cl/own")
    a, b, far = on(0), on(0), on(1)
    for x in (a, b, far):
        x.connect()
    assert b.subscribe(f"{t}/#", 1) == [1]
    assert far.subscribe(f"{t}/#", 1) == [1]
    reached(a, far, f"{t}/probe")
    b.messages.clear()
    for i in range(30):
        a.publish(f"{t}/x", b"o%d" % i, qos=1)
    wait_until(lambda: len(payloads(far, b"o")) >= 30, what="30 messages on the far node")
    time.sleep(0.3)
    assert payloads(b, b"o") == [b"o%d" % i for i in range(30)]


def test_overlapping_filters_on_a_node_deliver_each_message_once(on):
    """A node holding `t/#` and `t/+/x` gets two copies from NATS and
    routes one; the session with both filters gets one delivery at the
    higher QoS [MQTT-3.3.4-2], as on one node."""
    t = unique("cl/ov")
    a, b, other = on(0, V5), on(1, V5), on(1, V5)
    for x in (a, b, other):
        x.connect()
    assert b.subscribe(f"{t}/#", 0) == [0]
    assert b.subscribe(f"{t}/+/x", 1) == [1]
    assert other.subscribe(f"{t}/+/x", 0) == [0]
    reached(a, b, f"{t}/p/x")
    reached(a, other, f"{t}/p/x")
    for i in range(30):
        a.publish(f"{t}/k/x", b"v%d" % i, qos=1)
    wait_until(lambda: len(payloads(b, b"v")) >= 30 and len(payloads(other, b"v")) >= 30,
               what="30 messages")
    time.sleep(0.3)
    assert payloads(b, b"v") == [b"v%d" % i for i in range(30)]
    assert payloads(other, b"v") == [b"v%d" % i for i in range(30)]
    assert {m.qos for m in b.messages.items if m.payload.startswith(b"v")} == {1}


def test_a_shared_subscription_spread_over_three_nodes_gets_each_message_once(on):
    t = unique("cl/sh")
    members = [on(i, V5) for i in (0, 1, 2)]
    pub = on(0, V5)
    pub.connect()
    for m in members:
        m.connect()
        assert m.subscribe(f"$share/g/{t}/#", 1) == [1]
    # Every node's queue subscription known everywhere: probes until each
    # member got one (each probe goes to one member).
    deadline = time.monotonic() + 15
    while not all(m.messages.items for m in members):
        assert time.monotonic() < deadline, "the group never spread over three nodes"
        pub.publish(f"{t}/probe", b"probe", qos=0)
        time.sleep(0.02)
    time.sleep(0.2)
    for m in members:
        m.messages.clear()
    n = 300
    for i in range(n):
        pub.publish(f"{t}/s", b"s%d" % i, qos=1)
    wait_until(lambda: sum(len(payloads(m, b"s")) for m in members) >= n, what=f"{n} messages across the group")
    time.sleep(0.3)
    got = [p for m in members for p in payloads(m, b"s")]
    assert sorted(got) == sorted(b"s%d" % i for i in range(n)), "each message to one member"
    for m in members:
        assert len(payloads(m, b"s")) >= n // 10, [len(payloads(x, b"s")) for x in members]


def nats_subjects(port_offset, node_name):
    """The subjects a Millet node's NATS connection subscribes to, from
    its NATS server's monitoring endpoint."""
    url = f"http://127.0.0.1:{BASE + 20 + port_offset}/connz?subs=1"
    with urllib.request.urlopen(url, timeout=5) as r:
        conns = json.load(r)["connections"]
    for c in conns:
        if c.get("name") == f"millet-{node_name}":
            return set(c.get("subscriptions_list") or [])
    raise AssertionError(f"no NATS connection named millet-{node_name}: {[c.get('name') for c in conns]}")


def test_a_node_holds_one_nats_subscription_per_distinct_filter(on):
    """Interest is per node and filter, reference-counted: two sessions on
    one filter make one NATS subscription, gone with the last of them
    (and a session's end removes its filters like an UNSUBSCRIBE)."""
    t = unique("cl/int")
    s1, s2 = on(1), on(1)
    s1.connect()
    s2.connect()
    assert s1.subscribe(f"{t}/+/x", 1) == [1]
    assert s2.subscribe(f"{t}/+/x", 1) == [1]
    subject = "m.*." + t.replace("/", ".") + ".*.x"
    assert subject in nats_subjects(2, "n2")
    assert subject not in nats_subjects(1, "n1"), "no interest on a node without subscribers"
    s1.unsubscribe(f"{t}/+/x")
    time.sleep(0.2)
    assert subject in nats_subjects(2, "n2"), "s2 still holds the filter"
    s2.disconnect()  # a clean session ends with its connection
    wait_until(lambda: subject not in nats_subjects(2, "n2"), what="the NATS subscription to go")


def test_a_client_id_connecting_on_another_node_takes_the_connection_over(on):
    """[MQTT-3.1.4-3] across nodes: the connection on the first node is
    closed with 0x8E (Session taken over) before the new one is attached."""
    cid = unique("cl-to")
    first = on(0, V5, client_id=cid)
    first.connect()
    second = on(1, V5, client_id=cid)
    second.connect()
    rc, _ = first.wait_disconnected()
    assert rc == 0x8E
    assert second.is_connected
    third = on(2, V5, client_id=cid)
    third.connect()
    rc, _ = second.wait_disconnected()
    assert rc == 0x8E
    assert third.is_connected
    # Back on the first node: a takeover there too.
    again = on(0, V5, client_id=cid)
    again.connect()
    rc, _ = third.wait_disconnected()
    assert rc == 0x8E
    assert again.is_connected


def test_two_nodes_racing_for_one_client_id_leave_one_connection(on):
    """The same client id connects to two nodes at once, 100 times: each
    round ends with exactly one of the two connected (ownership is a
    compare-and-set on the owner entry; the loser of a race takes over
    from the winner)."""
    import threading

    cid = unique("cl-race")
    for round_ in range(100):
        pair = [on(0, client_id=cid), on(1, client_id=cid)]
        errors = []

        def go(c):
            try:
                c.connect(expect_rc=None)
            except Exception as e:  # noqa: BLE001 - closed before its CONNACK: it lost
                errors.append(e)

        threads = [threading.Thread(target=go, args=(c,)) for c in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: sum(c.is_connected for c in pair) <= 1,
                   what=f"round {round_}: one connection left")
        time.sleep(0.05)  # a late takeover would close the survivor within this window
        alive = [c for c in pair if c.is_connected]
        assert len(alive) == 1, f"round {round_}: {len(alive)} connections left ({errors})"
        for c in pair:
            c.close()


def retained_of(c, prefix=b"r"):
    return sorted((m.topic, m.payload) for m in c.messages.items if m.retain and m.payload.startswith(prefix))


@pytest.mark.parametrize("version", [V311, V5])
def test_retained_messages_live_in_the_cluster(on, version):
    """Retained messages are the cluster's (JetStream), not a node's: kept
    on one node, found by wildcard and exact subscriptions on the others,
    replaced and cleared from any node [MQTT-3.3.1-5, -10]. The QoS 1
    acknowledgement comes once JetStream stored the message, so a
    subscription made on another node right after it finds it."""
    t = unique("cl/ret")
    a, b, c = on(0, version), on(1, version), on(2, version)
    for x in (a, b, c):
        x.connect()
    a.publish(f"{t}/a/1", b"r1", qos=1, retain=True)
    a.publish(f"{t}/b", b"r2", qos=1, retain=True)
    assert b.subscribe(f"{t}/#", 1) == [1]
    b.messages.wait_for(2, pred=lambda m: m.retain)
    assert c.subscribe(f"{t}/b", 1) == [1]  # no wildcard: a direct get
    c.messages.wait_for(1, pred=lambda m: m.retain)
    time.sleep(0.3)  # a third (wrong) retained message would land within this
    assert retained_of(b) == [(f"{t}/a/1", b"r1"), (f"{t}/b", b"r2")]
    assert retained_of(c) == [(f"{t}/b", b"r2")]
    assert all(m.qos == 1 for m in b.messages.items if m.retain)

    c.publish(f"{t}/a/1", b"", qos=1, retain=True)  # cleared on another node
    b.publish(f"{t}/b", b"r3", qos=1, retain=True)  # replaced on a third
    late = on(0, version)
    late.connect()
    assert late.subscribe(f"{t}/+/#", 0) == [0]
    late.messages.wait_for(1, pred=lambda m: m.retain)
    time.sleep(0.3)
    assert retained_of(late) == [(f"{t}/b", b"r3")]
    assert all(m.qos == 0 for m in late.messages.items if m.retain)


def test_retained_message_expiry_holds_cluster_wide(on):
    """A retained message with a Message Expiry Interval is gone for every
    node once it expires [MQTT-3.3.2-5]; until then its remaining interval
    goes with it [MQTT-3.3.2-6]."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    t = unique("cl/rexp")
    a, b = on(0, V5), on(1, V5)
    for x in (a, b):
        x.connect()
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 1
    a.publish(f"{t}/short", b"rs", qos=1, retain=True, properties=props)
    a.publish(f"{t}/long", b"rl", qos=1, retain=True)
    assert b.subscribe(f"{t}/#", 1) == [1]
    got = b.messages.wait_for(2, pred=lambda m: m.retain)
    short = [m for m in got if m.payload == b"rs"]
    assert short and 0 < short[0].props.get("MessageExpiryInterval", 0) <= 1
    time.sleep(1.2)  # the expiry itself
    late = on(2, V5)
    late.connect()
    assert late.subscribe(f"{t}/#", 1) == [1]
    late.messages.wait_for(1, pred=lambda m: m.retain)
    time.sleep(0.3)
    assert retained_of(late) == [(f"{t}/long", b"rl")]


def test_a_node_started_later_finds_the_clusters_retained_messages(nats_urls):
    """No node holds the retained messages: one started after they were
    kept, whose publisher's node is gone, finds them in JetStream (and
    loads none at start-up: it asks for a subscription's own)."""
    t = unique("cl/rnew")
    first = Broker(kind="millet", host=HOST, port=free_port(), settings={},
                   args=["--nats", nats_urls[0], "--node-id", "rn1", "--no-admin"])
    first.start()
    try:
        p = Client(first, V5)
        p.connect()
        for i in range(5):
            p.publish(f"{t}/{i}", b"r%d" % i, qos=1, retain=True)
        p.close()
    finally:
        first.stop()
    later = Broker(kind="millet", host=HOST, port=free_port(), settings={},
                   args=["--nats", nats_urls[2], "--node-id", "rn2", "--no-admin"])
    later.start()
    try:
        s = Client(later, V311)
        s.connect()
        assert s.subscribe(f"{t}/+", 1) == [1]
        s.messages.wait_for(5, pred=lambda m: m.retain)
        assert retained_of(s) == [(f"{t}/{i}", b"r%d" % i) for i in range(5)]
        s.close()
    finally:
        later.stop()


def stream_config(port, stream):
    """`stream`'s configuration as its NATS server reports it (nats-py)."""
    import asyncio

    import nats

    async def get():
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
        try:
            return (await nc.jetstream().stream_info(stream)).config
        finally:
            await nc.close()

    return asyncio.run(get())


@pytest.mark.timeout(120)
def test_the_retained_caps_hold_cluster_wide(nats_urls, monkeypatch):
    """`limits.max_retained_messages` caps the cluster's retained topics,
    not a node's: the stream `MILLET_RETAINED` is limited to it and refuses
    a new topic beyond (discard new). Such a message is routed but not
    kept, as on one node for 3.x and QoS 0; replacing and clearing a kept
    topic still work at the cap. A node started with another cap sets it
    for the cluster. One NATS server (R1) of this test's own: the caps are
    the whole cluster's (`nats_urls` only installs the NATS server)."""
    monkeypatch.setenv("MILLET_ENGINE__NATS__REPLICAS", "1")
    port = free_port()
    store = tempfile.mkdtemp(prefix="millet-nats-r1-")
    nats = subprocess.Popen([os.path.join(REPO, ".venv", "bin", "nats-server"), "-js", "-a", "127.0.0.1",
                             "-p", str(port), "-sd", store], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    started = []

    def nats_listening():
        assert nats.poll() is None, "the NATS server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def node(name, cap):
        b = Broker(kind="millet", host=HOST, port=free_port(), settings={},
                   args=["--nats", f"nats://127.0.0.1:{port}", "--node-id", name, "--no-admin",
                         "--max-retained-messages", str(cap)])
        started.append(b)
        b.start()
        return b

    try:
        wait_until(nats_listening, timeout=20, what="the NATS server listening")
        n1, n2 = node("cap1", 3), node("cap2", 3)
        config = stream_config(port, "MILLET_RETAINED")
        assert (config.max_msgs, str(getattr(config.discard, "value", config.discard))) == (3, "new"), config
        t = unique("cl/cap")
        pub = Client(n1, V5)
        pub.connect()
        live = Client(n2, V311)
        live.connect()
        assert live.subscribe(f"{t}/#", 1) == [1]
        reached(pub, live, f"{t}/probe")  # a QoS 0 probe: never retained
        for i in range(3):
            assert pub.publish(f"{t}/{i}", b"r%d" % i, qos=1, retain=True) == 0
        # A fourth topic: beyond the cap, routed but not kept.
        assert pub.publish(f"{t}/3", b"r3", qos=1, retain=True) == 0
        live.messages.wait_for(4)
        assert sorted(m.payload for m in live.messages.items) == [b"r0", b"r1", b"r2", b"r3"]
        # At the cap, a kept topic is replaced, and another cleared.
        assert pub.publish(f"{t}/0", b"r0'", qos=1, retain=True) == 0
        assert pub.publish(f"{t}/1", b"", qos=1, retain=True) == 0
        late = Client(n2, V5)
        late.connect()
        assert late.subscribe(f"{t}/#", 1) == [1]
        late.messages.wait_for(2, pred=lambda m: m.retain)
        time.sleep(0.3)  # a wrong third one would land within this
        assert retained_of(late) == [(f"{t}/0", b"r0'"), (f"{t}/2", b"r2")]
        for c in (pub, live, late):
            c.close()

        # A node with a larger cap raises it for the cluster.
        n2.stop()
        n3 = node("cap3", 6)
        assert stream_config(port, "MILLET_RETAINED").max_msgs == 6
        pub = Client(n1, V311)
        pub.connect()
        pub.publish(f"{t}/4", b"r4", qos=1, retain=True)
        late = Client(n3, V311)
        late.connect()
        assert late.subscribe(f"{t}/4", 1) == [1]  # no wildcard: a direct get
        late.messages.wait_for(1, pred=lambda m: m.retain)
        assert retained_of(late) == [(f"{t}/4", b"r4")]
        for c in (pub, late):
            c.close()
    finally:
        for b in started:
            b.stop()
        nats.terminate()
        nats.wait(timeout=10)


def subject_of(prefix, topic):
    """engine/subject.rs's topic_to_subject, again: plain bytes kept, the others %XX, an empty level %."""
    out = []
    for level in topic.split("/"):
        if not level:
            out.append("%")
            continue
        out.append("".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-") else f"%{b:02X}"
                           for b in level.encode()))
    return ".".join([prefix] + out)


def stream_last(port, stream, subject):
    """The last message of `subject` in `stream` (nats-py), or None."""
    import asyncio

    import nats
    from nats.js.errors import NotFoundError

    async def get():
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
        try:
            return (await nc.jetstream().get_last_msg(stream, subject)).data
        except NotFoundError:
            return None
        finally:
            await nc.close()

    return asyncio.run(get())


@pytest.mark.parametrize("version", [V311, V5])
def test_a_qos1_or_2_publish_is_acknowledged_once_jetstream_stored_it(on, version):
    """PUBACK / PUBREC (then PUBCOMP) come once the message is in the
    `MILLET_MSGS` stream (replicated: R3 on this three-server cluster);
    QoS 0 is not stored. Looked at in JetStream right after the
    acknowledgement, with an independent client (nats-py)."""
    t = unique("cl/dur")
    a = on(0, version)
    a.connect()
    for qos in (1, 2):
        # 0, not 0x10 (no matching subscribers): other nodes may have some.
        assert a.publish(f"{t}/q{qos}", b"stored-%d" % qos, qos=qos) == 0
        data = stream_last(BASE + 2, "MILLET_MSGS", subject_of(f"m.{qos}", f"{t}/q{qos}"))
        assert data is not None and b"stored-%d" % qos in data, data
    a.publish(f"{t}/q0", b"not-stored", qos=0)
    a.publish(f"{t}/q1", b"barrier", qos=1)  # the QoS 0 message went before it
    assert stream_last(BASE + 2, "MILLET_MSGS", subject_of("m.0", f"{t}/q0")) is None


def test_a_long_topic_cannot_cut_a_node_off_the_cluster(on):
    """A topic travels as a NATS subject, and a NATS server closes a
    connection whose protocol line passes 4 KiB: in cluster mode topics and
    filters are held to 1,024 bytes (limits.max_topic_length), so a client
    sending a longer one is refused like any over-long topic (v5 PUBACK /
    SUBACK 0x90 / 0x8F) and the node stays joined: its QoS 1 publishes are
    still acknowledged and still reach the other nodes."""
    t = unique("cl/long")
    attacker, pub, far = on(0, V5), on(0, V5), on(1, V5)
    for c in (attacker, pub, far):
        c.connect()
    assert far.subscribe(f"{t}/#", 1) == [1]
    reached(pub, far, f"{t}/probe")
    long = f"{t}/" + "x" * 1100
    assert attacker.publish(long, b"long", qos=1) == 0x90
    assert attacker.subscribe(long + "/#", 1) == [0x8F]
    assert attacker.publish(f"{t}/" + "é" * 500, b"escaped", qos=1) == 0  # 1,000 bytes: 3 kB as a subject
    for i in range(5):
        assert pub.publish(f"{t}/after", b"a%d" % i, qos=1) == 0
    far.messages.wait_for(6, pred=lambda m: m.payload in {b"escaped"} | {b"a%d" % i for i in range(5)})


def session_on(on, i, version, cid, clean=False):
    """A paho client on node i for `cid`: persistent unless `clean`
    (v5: Session Expiry Interval 300)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = on(i, version, client_id=cid, clean_session=clean)
    if version == V5:
        p = Properties(PacketTypes.CONNECT)
        if not clean:
            p.SessionExpiryInterval = 300
        return c, c.connect(clean_start=clean, properties=p)
    return c, c.connect()


@pytest.mark.parametrize("version", [V311, V5])
def test_a_persistent_session_moves_to_the_node_its_client_reconnects_to(on, version):
    """Issue 13: subscribe on node A, disconnect, publish via node B,
    reconnect on node C: session present = 1 [MQTT-3.2.2-2], and every
    QoS 1/2 message published meanwhile arrives, QoS 2 exactly once. The
    session then lives on C: live messages reach it there, and node A no
    longer queues for it (back on A, nothing arrives twice)."""
    cid = unique("cl-move")
    t = unique("cl/move")
    sub, ack = session_on(on, 0, version, cid)
    assert not ack.session_present
    assert sub.subscribe(f"{t}/#", 2) == [2]
    sub.disconnect()
    pub = on(1, version)
    pub.connect()
    for i in range(40):
        pub.publish(f"{t}/a", b"q%d-%d" % (1 + i % 2, i), qos=1 + i % 2)
    moved, ack = session_on(on, 2, version, cid)
    assert ack.session_present, "the session moved from node A to node C"
    got = moved.messages.wait_for(40, pred=lambda m: m.payload.startswith(b"q"))
    assert sorted(m.payload for m in got) == sorted(b"q%d-%d" % (1 + i % 2, i) for i in range(40))
    # Per topic and QoS, in order [MQTT-4.6.0-6].
    for q in (1, 2):
        seq = [int(m.payload.split(b"-")[1]) for m in got if m.payload.startswith(b"q%d" % q)]
        assert seq == sorted(seq)
    # Live, on node C now: published on A and B.
    on0 = on(0, version)
    on0.connect()
    on0.publish(f"{t}/b", b"live-a", qos=2)
    pub.publish(f"{t}/b", b"live-b", qos=1)
    moved.messages.wait_for(2, pred=lambda m: m.payload.startswith(b"live"))
    moved.disconnect()
    pub.publish(f"{t}/c", b"offline-2", qos=1)
    # Back on node A: the session moves again, with the one queued message.
    back, ack = session_on(on, 0, version, cid)
    assert ack.session_present
    back.messages.wait_for(1, pred=lambda m: m.payload == b"offline-2")
    back.messages.assert_no_more(1)  # fixed negative window: nothing twice
    # A clean start on another node ends the session everywhere.
    back.disconnect()
    fresh, ack = session_on(on, 1, version, cid, clean=True)
    assert not ack.session_present
    fresh.disconnect()
    again, ack = session_on(on, 2, version, cid)
    assert not ack.session_present


@pytest.mark.parametrize("version", [V311, V5])
def test_a_qos2_message_completed_just_before_a_takeover_is_not_delivered_again(
        nodes, on, version):
    """A persistent QoS 2 subscriber completes a message (PUBCOMP) and is
    at once taken over on another node (clean start 0): the new node reads
    back from MILLET_MSGS what was published just before the move, and the
    old node's QoS 2 events (MILLET_QOS2OUT) tell it that this message was
    completed, so it is not delivered again: exactly once across the move
    [MQTT-4.3.3]. The next message is delivered, once."""
    from helpers import (P_SESSION_EXPIRY, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, RawClient,
                         ack_packet, raw_reached, subscribe_packet)

    t = unique("cl/q2mv")
    cid = unique("cl-q2mv")
    props = {P_SESSION_EXPIRY: 300} if version == V5 else None
    sub = RawClient(nodes[0], version)
    sub.connect(cid, clean=False, properties=props)
    sub.send(subscribe_packet(1, [(t, 2)], version=version))
    assert sub.expect(SUBACK).suback()[1] == [2]
    pub = on(1, version)
    pub.connect()
    raw_reached(pub, sub, t)
    pub.publish(t, b"x", qos=2)
    while True:
        x = sub.expect(PUBLISH).publish()
        if x.payload != b"probe":
            break
    assert x.payload == b"x"
    sub.send(ack_packet(PUBREC, x.pid, version=version))
    assert sub.expect(PUBREL).ack()[0] == x.pid
    sub.send(ack_packet(PUBCOMP, x.pid, version=version))
    # Taken over at once (well within the move's 250 ms read-back).
    moved = RawClient(nodes[2], version)
    assert moved.connect(cid, clean=False, properties=props).session_present
    pub.publish(t, b"y", qos=2)
    p = moved.expect(PUBLISH).publish()
    assert p.payload == b"y" and not p.dup, f"{p}: delivered again after the move"
    moved.send(ack_packet(PUBREC, p.pid, version=version))
    assert moved.expect(PUBREL).ack()[0] == p.pid
    moved.send(ack_packet(PUBCOMP, p.pid, version=version))
    moved.close()
    sub.close()


def test_a_session_moving_between_nodes_under_load_loses_no_acknowledged_message(on):
    """Issue 13: a persistent subscriber taken over on another node 15 times
    (its old connection still open: kicked, 0x8E) while publishers on two
    nodes send QoS 1 without pause: every message acknowledged to them
    reaches one of its connections (at least once), including those
    published while the session was moving."""
    import threading

    cid = unique("cl-mv")
    t = unique("cl/mvl")
    sub, _ = session_on(on, 0, V5, cid)
    # Two filters that overlap without one covering the other: read back
    # together or one by one, each message once.
    assert sub.subscribe(f"{t}/m/+", 1) == [1]
    assert sub.subscribe(f"{t}/+/x", 1) == [1]
    subs = [sub]
    acked, stop = [], threading.Event()
    pubs = [on(i, V5) for i in (1, 2)]
    for p in pubs:
        p.connect()
    reached(pubs[1], sub, f"{t}/probe/x")

    def publish(p, tag):
        i = 0
        while not stop.is_set():
            payload = b"%s-%d" % (tag, i)
            if p.publish(f"{t}/m/x", payload, qos=1, timeout=10) == 0:
                acked.append(payload)
            i += 1

    threads = [threading.Thread(target=publish, args=(p, tag)) for p, tag in zip(pubs, (b"x", b"y"))]
    for th in threads:
        th.start()
    try:
        for move in range(15):
            wait_until(lambda: len(acked) >= 20 * (move + 1), what=f"publishes before move {move}")
            nxt, ack = session_on(on, (move + 1) % 3, V5, cid)
            assert ack.session_present, f"move {move}"
            subs.append(nxt)
    finally:
        stop.set()
        for th in threads:
            th.join()
    want = set(acked)

    def got():
        return {m.payload for c in subs for m in c.messages.items} & want

    try:
        wait_until(lambda: got() == want, timeout=10, what="every acknowledged message")
    except AssertionError:
        missing = sorted(want - got())
        raise AssertionError(f"{len(missing)} of {len(want)} acknowledged messages missing: {missing[:20]}")


def test_a_leaving_shared_members_unacknowledged_messages_go_to_a_member_on_another_node(on):
    """Issue 13: a member of a shared subscription that leaves (its session
    ends) with QoS 1 messages it did not acknowledge has them given to
    another member of the group [MQTT-4.8.2-6's "SHOULD"]; with none left on
    its node, to one on another node (once: not to plain subscribers)."""
    t = unique("cl/shl")
    keeper = on(1, V5)
    keeper.connect()
    assert keeper.subscribe(f"$share/g/{t}/#", 1) == [1]
    leaver = on(0, V5, manual_ack=True)  # never acknowledges
    leaver.connect()
    assert leaver.subscribe(f"$share/g/{t}/#", 1) == [1]
    plain = on(2, V5)
    plain.connect()
    assert plain.subscribe(f"{t}/#", 1) == [1]
    pub = on(2, V5)
    pub.connect()
    deadline = time.monotonic() + 15
    while not (keeper.messages.items and leaver.messages.items and plain.messages.items):
        assert time.monotonic() < deadline, "the group never spread over two nodes"
        pub.publish(f"{t}/probe", b"probe", qos=0)
        time.sleep(0.02)
    time.sleep(0.2)
    for c in (keeper, leaver, plain):
        c.messages.clear()
    n = 100
    want = sorted(b"s%d" % i for i in range(n))
    for i in range(n):
        pub.publish(f"{t}/s", b"s%d" % i, qos=1)
    # (Past its in-flight window, the leaver's messages wait in its queue.)
    wait_until(lambda: payloads(leaver, b"s"), what="messages at the member that leaves")
    held = payloads(leaver, b"s")
    leaver.disconnect()  # clean session: it ends, with its messages unacknowledged
    try:
        wait_until(lambda: set(payloads(keeper, b"s")) >= set(want), timeout=10, what="")
    except AssertionError:
        missing = sorted(set(want) - set(payloads(keeper, b"s")))
        raise AssertionError(f"{len(missing)} of the {n} messages never reached the other member "
                             f"({len(held)} were sent to the leaver): {missing[:10]}") from None
    time.sleep(0.3)  # a second copy would land within this window
    assert sorted(payloads(keeper, b"s")) == sorted(set(payloads(keeper, b"s"))), "each once"
    assert sorted(payloads(plain, b"s")) == want, "plain subscribers get each message once"
