"""Cluster mode when NATS goes away (issue 13, "Failure handling"): a node
stops acknowledging QoS 1/2 rather than lying (v5 gets 0x80, a 3.1.1
connection is closed), keeps delivering QoS 0 locally, and rejoins without
a restart when NATS is back. Its own NATS cluster: the test stops it.
"""

import os
import signal
import subprocess
import time

import pytest

from conftest import REPO, Broker, free_port
from helpers import (HOST, P_SESSION_EXPIRY, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, V311, V5,
                     Client, RawClient, ack_packet, publish_packet, raw_reached, subscribe_packet,
                     unique, wait_until)
from test_cluster import nats_cluster_down, nats_cluster_up, reached  # noqa: E402

BASE = 24820


@pytest.fixture
def cluster():
    run = nats_cluster_up(BASE)
    urls = [f"nats://127.0.0.1:{BASE + i}" for i in (1, 2, 3)]
    nodes, made, restarted = [], [], []

    def client(i, version=V311):
        c = Client(nodes[i], version)
        made.append(c)
        return c

    try:
        for i in (1, 2):
            b = Broker(kind="millet", host=HOST, port=free_port(), settings={},
                       args=["--nats", ",".join(urls), "--node-id", f"f{i}", "--no-admin"])
            nodes.append(b)
            b.start()
        yield run, nodes, client, restarted
    finally:
        for c in made:
            c.close()
        for b in nodes:
            b.stop()
        for p in restarted:  # ours to reap (cluster-down would wait on the zombies)
            p.terminate()
            p.wait(timeout=30)
        nats_cluster_down(run)


def nats_down(run):
    with open(os.path.join(run, "pids")) as f:
        pids = [int(p) for p in f.read().split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def nats_up(run, restarted):
    """Start the three NATS servers again on their configurations and stores."""
    venv = os.path.join(REPO, ".venv", "bin", "nats-server")
    for i in (1, 2, 3):
        log = open(os.path.join(run, f"n{i}.restart.log"), "wb")
        restarted.append(subprocess.Popen([venv, "-c", os.path.join(run, f"n{i}.conf")], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()


def try_publish(c, topic, payload, timeout=10):
    """A QoS 1 publish's reason code, or None when no PUBACK came in time."""
    try:
        return c.publish(topic, payload, qos=1, timeout=timeout)
    except AssertionError:
        return None


@pytest.mark.timeout(120)
def test_without_nats_qos1_is_refused_qos0_stays_local_and_the_node_rejoins(cluster):
    run, nodes, client, restarted = cluster
    t = unique("cl/f")
    pub5, pub3, sub, far = client(0, V5), client(0, V311), client(0, V311), client(1, V311)
    far5 = client(1, V5)
    for c in (pub5, pub3, sub, far, far5):
        c.connect()
    assert sub.subscribe(f"{t}/#", 1) == [1]
    assert far.subscribe(f"{t}/#", 1) == [1]
    reached(pub5, far, f"{t}/probe")
    assert pub5.publish(f"{t}/a", b"before", qos=1) == 0
    raw = RawClient(nodes[0], V5)
    raw.connect()

    nats_down(run)
    # The node notices when its connection to NATS breaks (at once on a
    # killed server: the socket closes); until then a publish may still go.
    wait_until(lambda: pub5.publish(f"{t}/a", b"probe-down", qos=1) == 0x80, timeout=15,
               what="QoS 1 refused with 0x80 once NATS is down")
    # Each node notices on its own: the other one too, before it is asked
    # for a connection below.
    wait_until(lambda: far5.publish(f"{t}/b", b"probe-down", qos=1) == 0x80, timeout=15,
               what="QoS 1 refused with 0x80 on the other node too")
    sub.messages.clear()
    assert pub5.publish(f"{t}/a", b"refused", qos=1) == 0x80
    # QoS 2: PUBREC 0x80 ends the exchange [MQTT-4.3.3-4] (paho reports no
    # PUBREC reason, so a raw client looks).
    try:
        raw.send(publish_packet(f"{t}/a", b"refused2", qos=2, pid=9, version=V5))
        assert raw.expect(PUBREC).ack()[:2] == (9, 0x80)
    finally:
        raw.close()
    # New connections are refused: who owns a client id cannot be known
    # (CONNACK 0x88 Server unavailable; 3.1.1: 0x03).
    late5, late3 = client(1, V5), client(1, V311)
    assert late5.connect(expect_rc=None).rc == 0x88
    # (paho reports a 3.x return code as its v5 equivalent: 0x03 as 0x88)
    assert late3.connect(expect_rc=None).rc == 0x88
    # QoS 0 still reaches the local subscriber.
    pub5.publish(f"{t}/a", b"local", qos=0)
    sub.messages.wait_for(1, pred=lambda m: m.payload == b"local")
    time.sleep(0.3)
    assert b"refused" not in [m.payload for m in sub.messages.items], "a refused message is not routed"
    # 3.1.1 has no negative acknowledgement: the connection is closed.
    pub3.c.publish(f"{t}/a", b"v3", 1)
    pub3.wait_disconnected()
    assert all(b.alive() for b in nodes)

    nats_up(run, restarted)
    # Until JetStream's streams have leaders again, a QoS 1 publish waits
    # for its store (and may be refused): probed until one is stored.
    wait_until(lambda: try_publish(pub5, f"{t}/a", b"probe-up") == 0, timeout=60,
               what="QoS 1 accepted again once NATS is back")
    far.messages.clear()
    reached(pub5, far, f"{t}/again")
    assert pub5.publish(f"{t}/a", b"after", qos=1) == 0
    far.messages.wait_for(1, pred=lambda m: m.payload == b"after")


def stored_wills(port):
    """How many wills the MILLET_WILLS stream holds (nats-py)."""
    import asyncio

    import nats

    async def count():
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
        try:
            info = await nc.jetstream().stream_info("MILLET_WILLS")
            return info.state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


def test_a_dead_nodes_wills_are_published_once_by_the_others(cluster):
    """kill -9 of a node: another node publishes the wills of its
    connections, once each, after their delays; a connection that ended
    normally before leaves no will behind [MQTT-3.1.2-8], [MQTT-3.1.2-10]."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _, nodes, client, _ = cluster
    t = unique("cl/will")
    watcher, prober = client(0, V5), client(1, V5)
    watcher.connect()
    prober.connect()
    assert watcher.subscribe(f"{t}/#", 1) == [1]
    reached(prober, watcher, f"{t}/probe")
    delayed = Properties(PacketTypes.WILLMESSAGE)
    delayed.WillDelayInterval = 3
    dying = client(1, V5)
    dying.connect(will={"topic": f"{t}/now", "payload": b"gone", "qos": 1})
    dying_later = client(1, V5)
    dying_later.connect(will={"topic": f"{t}/later", "payload": b"gone later", "qos": 1,
                              "properties": delayed})
    polite = client(1, V5)
    polite.connect(will={"topic": f"{t}/polite", "payload": b"never", "qos": 1})
    polite.disconnect()
    # The node purges a will from JetStream once its connection ended (a
    # crash before that purge lands would leave it to the others): wait
    # for the two dying clients' wills to be all that is stored.
    wait_until(lambda: stored_wills(BASE + 1) == 2, timeout=10,
               what="the polite client's will purged from JetStream")
    watcher.messages.clear()

    nodes[1].proc.kill()
    nodes[1].proc.wait()
    got = watcher.messages.wait_for(2, timeout=30, pred=lambda m: m.payload.startswith(b"gone"))
    by_topic = {m.topic: m for m in got}
    assert set(by_topic) == {f"{t}/now", f"{t}/later"}
    # Both found at once (the node's heartbeat expired); the delay counts
    # from there.
    assert by_topic[f"{t}/later"].received_at - by_topic[f"{t}/now"].received_at >= 2.5
    time.sleep(1)  # any second copy, or the polite client's will, would land within this window
    payloads = [m.payload for m in watcher.messages.items]
    assert payloads.count(b"gone") == 1 and payloads.count(b"gone later") == 1, payloads
    assert b"never" not in payloads


def cluster_members(port):
    """The node entries of millet_members (nats-py)."""
    return sorted(kv_live_keys(port, ("millet_members",))[0])


async def _live_keys(js, bucket):
    """A bucket's live keys, read without nats-py's `kv.keys()`. That lists
    through an ordered consumer and waits for a delivery that reports nothing
    pending; when JetStream removes entries meanwhile (their TTL, a delete),
    that delivery may never come and the listing waits forever (the same
    defect nats.go fixed in its PR 1824). Here: the stream's subjects, then
    each one's last message, skipping delete, purge and TTL markers."""
    import nats.js.errors

    stream = f"KV_{bucket}"
    prefix = f"$KV.{bucket}."
    try:
        info = await js.stream_info(stream, subjects_filter=f"{prefix}>")
    except nats.js.errors.NotFoundError:
        return set()  # not created yet: JetStream still settling after start
    live = set()
    for subject in info.state.subjects or {}:
        try:
            msg = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            continue  # removed since the stream's answer
        headers = msg.headers or {}
        if headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            continue
        live.add(subject[len(prefix):])
    return live


def kv_live_keys(port, buckets):
    """The live keys of each bucket in `buckets` (nats-py), each listing
    bounded in time so that a stuck request fails the test instead of
    wedging it."""
    import asyncio

    import nats

    async def keys():
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
        try:
            js = nc.jetstream()
            return [await asyncio.wait_for(_live_keys(js, b), timeout=10) for b in buckets]
        finally:
            await nc.close()

    return asyncio.run(keys())


def test_a_node_stopped_cleanly_leaves_no_will_for_the_others(cluster):
    """SIGTERM: the node closes its connections itself (and decides on their
    wills), then leaves: its member entry and stored wills are gone, so no
    other node takes it for dead and publishes a will a second time. Its
    persistent sessions stay for their clients to resume elsewhere, and
    their entries in KV expire with them [MQTT-3.1.2-23]."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _, nodes, client, _ = cluster
    # (The listing answers [] while JetStream is still settling after start.)
    wait_until(lambda: len(cluster_members(BASE + 1)) == 2, timeout=10, what="two members")
    c = client(1, V5)
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 2
    c.connect(clean_start=False, properties=p,
              will={"topic": unique("cl/leave"), "payload": b"w", "qos": 1})
    assert stored_wills(BASE + 1) == 1
    buckets = ("millet_owners", "millet_sessions", "millet_marks")
    key = kv_key(c.client_id)
    wait_until(lambda: all(key in keys for keys in session_kv_keys(BASE + 1, buckets)),
               timeout=10, what="the session's entries in KV")
    nodes[1].stop()
    wait_until(lambda: len(cluster_members(BASE + 1)) == 1, timeout=10, what="one member left")
    assert stored_wills(BASE + 1) == 0
    wait_until(lambda: not any(key in keys for keys in session_kv_keys(BASE + 1, buckets)),
               timeout=10, what="the session's entries to expire with it (2 s)")


@pytest.mark.timeout(180)
def test_losing_one_nats_server_under_load_loses_no_acknowledged_message(cluster):
    """kill -9 of one NATS server of three under QoS 1 load: every message
    acknowledged to its publisher (stored R3 in JetStream) reaches the
    subscriber on another node, and acknowledgements resume (the streams'
    leaders move to the two left). The publisher's and subscriber's nodes
    are each held to a server that stays (a node whose own server dies:
    test_a_node_back_from_a_nats_break_catches_up_what_was_sent_meanwhile)."""
    import threading

    run, _, _, _ = cluster
    urls = [f"nats://127.0.0.1:{BASE + i}" for i in (1, 2, 3)]
    pinned = []
    try:
        for i in (0, 1):
            b = Broker(kind="millet", host=HOST, port=free_port(), settings={},
                       args=["--nats", urls[i], "--node-id", f"pin{i}", "--no-admin"])
            pinned.append(b)
            b.start()
        t = unique("cl/nl")
        pub, sub = Client(pinned[0], V5), Client(pinned[1], V5)
        pub.connect()
        sub.connect()
        assert sub.subscribe(f"{t}/#", 1) == [1]
        reached(pub, sub, f"{t}/probe", qos=1)
        acked, refused, stop = [], [], threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                payload = b"n%d" % i
                # No answer in time (None): neither acknowledged nor refused.
                rc = try_publish(pub, f"{t}/x", payload)
                (acked if rc == 0 else refused).append(payload)
                i += 1

        th = threading.Thread(target=load, daemon=True)
        th.start()
        wait_until(lambda: len(acked) >= 200, timeout=30,
                   what=f"200 acknowledged before the kill (so far {len(acked)}; refused {refused[:3]}...)")
        with open(os.path.join(run, "pids")) as f:
            third = int(f.read().split()[2])
        os.kill(third, signal.SIGKILL)
        at_kill = len(acked)
        wait_until(lambda: len(acked) >= at_kill + 300, timeout=60,
                   what="acknowledgements resuming after the server's loss")
        stop.set()
        th.join(timeout=30)
        want = set(acked)
        wait_until(lambda: want <= {m.payload for m in sub.messages.items}, timeout=30,
                   what=f"all {len(want)} acknowledged messages delivered")
        for c in (pub, sub):
            c.close()
        assert all(b.alive() for b in pinned)
    finally:
        for b in pinned:
            b.stop()


def msgs_stream(port, action):
    """Delete, or create again (as the nodes do), the MILLET_MSGS stream (nats-py)."""
    import asyncio

    import nats
    from nats.js.api import StreamConfig

    async def run():
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
        try:
            js = nc.jetstream()
            if action == "delete":
                await js.delete_stream("MILLET_MSGS")
            else:
                await js.add_stream(StreamConfig(name="MILLET_MSGS", subjects=["m.1.>", "m.2.>"],
                                                 num_replicas=3, max_age=86400))
        finally:
            await nc.close()

    asyncio.run(run())


def test_a_qos1_publish_jetstream_does_not_store_is_refused(cluster):
    """The acknowledgement is JetStream's: with the MILLET_MSGS stream gone
    (deleted by an operator), a QoS 1 PUBLISH gets PUBACK 0x80 instead of a
    success it could not keep; once the stream is back, 0 again."""
    _, _, client, _ = cluster
    t = unique("cl/nostore")
    pub = client(0, V5)
    pub.connect()
    assert pub.publish(f"{t}/a", b"kept", qos=1) == 0
    msgs_stream(BASE + 1, "delete")
    assert try_publish(pub, f"{t}/a", b"not kept") == 0x80
    msgs_stream(BASE + 1, "create")
    wait_until(lambda: try_publish(pub, f"{t}/a", b"kept again") == 0, timeout=30,
               what="QoS 1 acknowledged again once the stream is back")


def session_kv_keys(port, buckets=("millet_sessions", "millet_marks")):
    """The live keys of millet_sessions and millet_marks, or of `buckets`."""
    return kv_live_keys(port, buckets)


def kv_key(client_id):
    import hashlib

    return hashlib.sha256(client_id.encode()).hexdigest()[:40]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("version", [V311, V5])
def test_a_dead_nodes_persistent_sessions_resume_elsewhere_with_no_acknowledged_message_lost(
        cluster, version):
    """kill -9 of the node holding two persistent sessions, one connected and
    one offline, under QoS 1 load from another node: both clients reconnect
    to the surviving node with session present = 1 [MQTT-3.2.2-2], and
    every message the publisher had acknowledged, before and after the
    kill, reaches both (at least once: the sessions are rebuilt from KV
    and catch up from MILLET_MSGS since their last mark)."""
    import threading

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _, nodes, client, _ = cluster
    t = unique("cl/dead")

    def persistent(i, cid):
        c = Client(nodes[i], version, client_id=cid, clean_session=False)
        if version == V5:
            p = Properties(PacketTypes.CONNECT)
            p.SessionExpiryInterval = 300
            return c, c.connect(clean_start=False, properties=p)
        return c, c.connect()

    online_id, offline_id = unique("cl-on"), unique("cl-off")
    online, _ = persistent(1, online_id)
    assert online.subscribe(f"{t}/#", 1) == [1]
    offline, _ = persistent(1, offline_id)
    assert offline.subscribe(f"{t}/#", 2) == [2]
    offline.disconnect()
    pub = client(0, version)
    pub.connect()
    reached(pub, online, f"{t}/probe", qos=1)
    # Both sessions written to KV (record and mark) before the kill.
    wait_until(lambda: all({kv_key(online_id), kv_key(offline_id)} <= keys
                           for keys in session_kv_keys(BASE + 1)),
               timeout=10, what="the sessions' records and marks in KV")

    acked, stop = [], threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            payload = b"m-%d" % i
            if try_publish(pub, f"{t}/x", payload) == 0:
                acked.append(payload)
            i += 1

    th = threading.Thread(target=load)
    th.start()
    try:
        wait_until(lambda: len(acked) >= 100, timeout=30, what="100 acknowledged before the kill")
        nodes[1].proc.kill()
        nodes[1].proc.wait()
        at_kill = len(acked)
        wait_until(lambda: len(acked) >= at_kill + 100, timeout=30,
                   what="100 more acknowledged after the kill")
    finally:
        stop.set()
        th.join()
    online.close()
    want = set(acked)
    for cid in (online_id, offline_id):
        c, ack = persistent(0, cid)
        assert ack.session_present, f"{cid}: the session of the dead node resumes here"
        got = c.messages.wait_for(len(want), timeout=30,
                                  pred=lambda m: m.payload in want)
        assert want <= {m.payload for m in got}, f"{cid}: {len(want - {m.payload for m in got})} lost"
        c.close()


def test_a_dead_nodes_session_keeps_its_expiry(cluster):
    """kill -9 of the node holding two disconnected v5 sessions: the one
    whose Session Expiry Interval (2 s) has passed since its disconnection
    is gone on the surviving node (session present = 0 [MQTT-3.1.2-23]),
    the other (300 s) resumes there."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _, nodes, _, _ = cluster

    def session(i, cid, expiry):
        c = Client(nodes[i], V5, client_id=cid)
        p = Properties(PacketTypes.CONNECT)
        p.SessionExpiryInterval = expiry
        return c, c.connect(clean_start=False, properties=p)

    short_id, long_id = unique("cl-short"), unique("cl-long")
    for cid, expiry in ((short_id, 2), (long_id, 300)):
        c, _ = session(1, cid, expiry)
        c.subscribe(unique("cl/exp"), 1)
        c.disconnect()
        c.close()
    wait_until(lambda: all({kv_key(short_id), kv_key(long_id)} <= keys
                           for keys in session_kv_keys(BASE + 1)),
               timeout=10, what="the sessions' records and marks in KV")
    disconnected = time.monotonic()
    nodes[1].proc.kill()
    nodes[1].proc.wait()
    time.sleep(max(0.0, disconnected + 2.5 - time.monotonic()))  # past the short expiry (2 s)
    c, ack = session(0, short_id, 300)
    assert not ack.session_present, "expired 2 s after its disconnection"
    c.close()
    c, ack = session(0, long_id, 300)
    assert ack.session_present
    c.close()


@pytest.mark.timeout(120)
def test_a_dead_nodes_client_ids_leave_kv_when_their_sessions_expire(cluster):
    """kill -9 of a node: what it left in KV goes with its sessions. The
    owner entry of a client without a persistent session goes at once; a
    session's owner entry, record and mark go when its expiry has passed,
    counted from its disconnection, which for a session connected at the
    node's death is the death [MQTT-3.1.2-23]; a longer session keeps them
    and resumes elsewhere."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _, nodes, _, _ = cluster
    buckets = ("millet_owners", "millet_sessions", "millet_marks")

    def session(i, cid, expiry):
        c = Client(nodes[i], V5, client_id=cid)
        p = Properties(PacketTypes.CONNECT)
        p.SessionExpiryInterval = expiry
        return c, c.connect(clean_start=False, properties=p)

    connected_short, offline_short, connected_long = (
        unique("cl-cs"), unique("cl-os"), unique("cl-cl"))
    keep = []
    for cid, expiry in ((connected_short, 3), (offline_short, 3), (connected_long, 300)):
        c, _ = session(1, cid, expiry)
        c.subscribe(unique("cl/kv"), 1)
        keep.append(c)
    keep[1].disconnect()
    plain = Client(nodes[1], V311, client_id=unique("cl-plain"))
    plain.connect()
    keep.append(plain)
    persistent = {kv_key(c) for c in (connected_short, offline_short, connected_long)}
    wait_until(lambda: all(persistent <= keys for keys in session_kv_keys(BASE + 1)),
               timeout=10, what="the sessions' records and marks in KV")
    assert kv_key(plain.client_id) in session_kv_keys(BASE + 1, ("millet_owners",))[0]
    nodes[1].proc.kill()
    nodes[1].proc.wait()
    gone = {kv_key(c) for c in (connected_short, offline_short, plain.client_id)}

    def left():
        return [keys & gone for keys in session_kv_keys(BASE + 1, buckets)]

    # Found dead after its heartbeat's 6 s, then 3 s more for the connected one.
    wait_until(lambda: not any(left()), timeout=40, what="the dead node's expired entries to go")
    assert all(kv_key(connected_long) in keys for keys in session_kv_keys(BASE + 1, buckets))
    c, ack = session(0, connected_short, 300)
    assert not ack.session_present, "expired 3 s after the node's death"
    c.close()
    c, ack = session(0, connected_long, 300)
    assert ack.session_present
    c.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", [V311, V5])
def test_a_qos2_publish_resent_after_its_node_died_is_not_delivered_twice(cluster, version):
    """A persistent publisher's QoS 2 message is acknowledged (PUBREC) by a
    node that is then killed (kill -9) before the PUBREL. The publisher
    resumes its session on another node and sends the PUBLISH again with
    DUP, as it must [MQTT-4.4.0-1]: that node knows the packet id from KV
    (millet_qos2), acknowledges it and does not deliver it again
    [MQTT-4.3.3-10]. The PUBREL then releases the id: a new message with
    the same id is delivered, once."""
    _, nodes, client, _ = cluster
    t = unique("cl/q2")
    sub = client(0, version)
    sub.connect()
    assert sub.subscribe(t, 2) == [2]
    cid = unique("cl-q2pub")
    props = {P_SESSION_EXPIRY: 300} if version == V5 else None

    def publisher(i):
        c = RawClient(nodes[i], version)
        ack = c.connect(cid, clean=False, properties=props)
        return c, ack

    probe = client(1, version)
    probe.connect()
    reached(probe, sub, t)
    pub, ack = publisher(1)
    assert not ack.session_present
    pid = 7
    pub.send(publish_packet(t, b"once", qos=2, pid=pid, version=version))
    assert pub.expect(PUBREC).ack()[0] == pid
    sub.messages.wait_for(1, pred=lambda m: m.payload == b"once")
    # The id is in KV (the PUBREC waited for it; the resend below is
    # delivered twice if the node died before it was).
    wait_until(lambda: kv_key(cid) in session_kv_keys(BASE + 1, ("millet_qos2",))[0],
               timeout=10, what="the id in millet_qos2")
    nodes[1].proc.kill()
    nodes[1].proc.wait()
    pub.close()

    pub, ack = publisher(0)
    assert ack.session_present, "the dead node's session resumes here"
    pub.send(publish_packet(t, b"once", qos=2, pid=pid, dup=True, version=version))
    assert pub.expect(PUBREC).ack()[:2] == (pid, 0)
    pub.send(ack_packet(PUBREL, pid, version=version))
    assert pub.expect(PUBCOMP).ack()[:2] == (pid, 0)
    # Released: the same id is a new message now.
    pub.send(publish_packet(t, b"next", qos=2, pid=pid, version=version))
    assert pub.expect(PUBREC).ack()[:2] == (pid, 0)
    pub.send(ack_packet(PUBREL, pid, version=version))
    assert pub.expect(PUBCOMP).ack()[0] == pid
    # Routed in order on this node: "next" comes after any second "once".
    sub.messages.wait_for(1, pred=lambda m: m.payload == b"next")
    got = [m.payload for m in sub.messages.items]
    assert got.count(b"once") == 1, got
    assert got.count(b"next") == 1, got
    # The session's entry goes with the id released.
    wait_until(lambda: kv_key(cid) not in session_kv_keys(BASE + 1, ("millet_qos2",))[0],
               timeout=10, what="the released id to leave millet_qos2")
    pub.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", [V311, V5])
def test_qos2_to_a_subscriber_stays_exactly_once_when_its_node_dies(cluster, version):
    """A persistent QoS 2 subscriber on a node that is killed (kill -9) with
    one message completed (PUBCOMP sent), one released (PUBREL received, no
    PUBCOMP) and one in flight (PUBLISH received, no PUBREC). It resumes on
    the other node: the PUBREL and the PUBLISH are resent with their packet
    ids (the PUBLISH with DUP) [MQTT-4.4.0-1], and nothing is delivered to
    it as a new message again: exactly once across the node's death
    [MQTT-4.3.3], from what the dead node recorded (MILLET_QOS2OUT)."""
    _, nodes, client, _ = cluster
    t = unique("cl/q2out")
    cid = unique("cl-q2sub")
    props = {P_SESSION_EXPIRY: 300} if version == V5 else None
    sub = RawClient(nodes[1], version)
    assert not sub.connect(cid, clean=False, properties=props).session_present
    sub.send(subscribe_packet(1, [(t, 2)], version=version))
    assert sub.expect(SUBACK).suback()[1] == [2]
    pub = client(0, version)
    pub.connect()
    raw_reached(pub, sub, t)

    def next_publish(payload):
        while True:
            p = sub.expect(PUBLISH).publish()
            if p.payload != b"probe":
                assert p.payload == payload, p
                return p

    pub.publish(t, b"a", qos=2)
    a = next_publish(b"a")
    sub.send(ack_packet(PUBREC, a.pid, version=version))
    assert sub.expect(PUBREL).ack()[0] == a.pid
    sub.send(ack_packet(PUBCOMP, a.pid, version=version))
    pub.publish(t, b"b", qos=2)
    b = next_publish(b"b")
    sub.send(ack_packet(PUBREC, b.pid, version=version))
    # The PUBREL waits for the KV write (which has a's completion too).
    assert sub.expect(PUBREL).ack()[0] == b.pid
    pub.publish(t, b"c", qos=2)
    c = next_publish(b"c")  # sent once its in-flight entry is in KV
    nodes[1].proc.kill()
    nodes[1].proc.wait()
    sub.close()

    sub = RawClient(nodes[0], version)
    assert sub.connect(cid, clean=False, properties=props).session_present
    # The window resent in order: PUBRELs (b's; a's too, whose PUBCOMP is
    # not recorded: answered, harmless), then c's PUBLISH.
    rels = []
    while True:
        p = sub.recv()
        assert p is not None, "connection closed"
        if p.type == PUBLISH:
            again = p.publish()
            break
        assert p.type == PUBREL, p
        rels.append(p.ack()[0])
        sub.send(ack_packet(PUBCOMP, rels[-1], version=version))
    assert b.pid in rels and set(rels) <= {a.pid, b.pid}, rels
    assert (again.payload, again.pid, again.dup) == (b"c", c.pid, True), again
    sub.send(ack_packet(PUBREC, c.pid, version=version))
    assert sub.expect(PUBREL).ack()[0] == c.pid
    sub.send(ack_packet(PUBCOMP, c.pid, version=version))
    # Nothing else of a, b, c: the next PUBLISH is a new message.
    pub.publish(t, b"e", qos=2)
    e = sub.expect(PUBLISH).publish()
    assert e.payload == b"e" and not e.dup, f"{e}: a message delivered again"
    sub.close()


def nats_restart_one(run, i, restarted):
    """Start NATS server i (1-based) again on its configuration and store."""
    venv = os.path.join(REPO, ".venv", "bin", "nats-server")
    log = open(os.path.join(run, f"n{i}.restart.log"), "wb")
    restarted.append(subprocess.Popen([venv, "-c", os.path.join(run, f"n{i}.conf")], stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    log.close()


@pytest.mark.timeout(180)
def test_a_node_back_from_a_nats_break_catches_up_what_was_sent_meanwhile(cluster):
    """The subscriber's node is held to one NATS server, which is killed
    (kill -9) while a node on another server publishes QoS 1 messages
    (acknowledged: JetStream keeps quorum with two servers of three), then
    started again: the node reconnects and catches up from MILLET_MSGS, so
    every acknowledged message reaches its subscriber, including those
    published while it was cut off."""
    import threading

    run, _, _, restarted = cluster
    urls = [f"nats://127.0.0.1:{BASE + i}" for i in (1, 2, 3)]
    pinned = []
    try:
        for i in (0, 2):
            b = Broker(kind="millet", host=HOST, port=free_port(), settings={},
                       args=["--nats", urls[i], "--node-id", f"brk{i}", "--no-admin"])
            pinned.append(b)
            b.start()
        t = unique("cl/brk")
        pub, sub = Client(pinned[0], V5), Client(pinned[1], V5)
        pub.connect()
        sub.connect()
        assert sub.subscribe(f"{t}/#", 1) == [1]
        reached(pub, sub, f"{t}/probe", qos=1)
        acked, stop = [], threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                payload = b"k%d" % i
                if try_publish(pub, f"{t}/x", payload) == 0:
                    acked.append(payload)
                i += 1

        th = threading.Thread(target=load, daemon=True)
        th.start()
        wait_until(lambda: len(acked) >= 100, timeout=30, what="100 acknowledged before the break")
        with open(os.path.join(run, "pids")) as f:
            third = int(f.read().split()[2])
        os.kill(third, signal.SIGKILL)
        at_kill = len(acked)
        wait_until(lambda: len(acked) >= at_kill + 200, timeout=60,
                   what="200 acknowledged while the subscriber's node is cut off")
        nats_restart_one(run, 3, restarted)
        wait_until(lambda: len(acked) >= at_kill + 400, timeout=60,
                   what="200 more acknowledged once the server is back")
        stop.set()
        th.join(timeout=30)
        want = set(acked)
        wait_until(lambda: want <= {m.payload for m in sub.messages.items}, timeout=60,
                   what=f"all {len(want)} acknowledged messages delivered "
                        f"({len(want - {m.payload for m in sub.messages.items})} missing)")
        for c in (pub, sub):
            c.close()
        assert all(b.alive() for b in pinned)
    finally:
        for b in pinned:
            b.stop()
