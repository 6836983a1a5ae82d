"""Durability of Millet's embedded store (docs/STORE.md): what survives a restart and a crash.

Every test runs its own Millet process (``MilletProc``) on a fixed data directory and a fixed
port, so it can be stopped (SIGTERM), killed (SIGKILL) and started again on the same store.

* Restart: persistent subscribers offline, QoS 1/2 publishes, SIGTERM, start: every acknowledged
  message arrives, QoS 2 exactly once, QoS 1 at least once; subscriptions, session present, retained.
* Crash: ``kill -9`` in the middle of a load of thousands of messages, several rounds on the same
  store, under ``--durability sync``: every message whose PUBACK / PUBCOMP reached its publisher
  before the kill is delivered after the restart (offline subscriber; online slow subscriber with
  in-flight window and queue at the crash; QoS 2 in-flight in both directions).
* Expiry across a restart (session expiry, message expiry elapsing while the broker is down).
* A corrupted / truncated store file: recover, or refuse to start with the path on stderr (never a
  hang or a panic); ``quarantine_corrupt = true`` starts empty and says so.
* Disk full (data dir on a 4 MiB tmpfs): v5 PUBACK 0x97 / 0x80 instead of success, 3.1.1 is
  disconnected instead of acknowledged, QoS 0 keeps flowing, and acks resume once space is freed.

The load clients are raw-socket MQTT clients built on ``helpers`` (pipelined, so a few thousand
messages take well under a second); the restart / session / expiry tests use paho-mqtt.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import _find_millet, free_port
from helpers import (
    HOST, P_RECEIVE_MAXIMUM, P_SESSION_EXPIRY, PUBACK, PUBCOMP, PUBLISH,
    PUBREC, PUBREL, V311, V5, Client, RawClient, ack_packet, props, publish_packet, session_client,
    unique, wait_until,
)
from paho.mqtt.packettypes import PacketTypes

pytestmark = pytest.mark.millet_only("durability of Millet's own embedded store")

STARTUP_TIMEOUT = 15.0
# Upper bound for draining what a restarted broker owes a subscriber.
DRAIN_TIMEOUT = 30.0


# ---------------------------------------------------------------------------
# A Millet process on a fixed data dir and port, restartable
# ---------------------------------------------------------------------------


class MilletProc:
    """One Millet installation: data dir + port fixed, process started / stopped / killed at will.
    Has ``host`` / ``port`` so helpers' ``Client`` and ``RawClient`` accept it as a broker."""

    def __init__(self, workdir: str, args=(), config_text: str | None = None, data_dir: str | None = None):
        self.workdir = workdir
        self.data_dir = data_dir or os.path.join(workdir, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.args = [str(a) for a in args]
        self.config_path = None
        if config_text is not None:
            self.config_path = os.path.join(workdir, "millet.toml")
            with open(self.config_path, "w") as f:
                f.write(config_text)
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.log_path = ""

    @property
    def store_file(self) -> Path:
        return Path(self.data_dir) / "store" / "millet.redb"

    def cmd(self, extra=()) -> list:
        cmd = [_find_millet(), "--listen", f"{self.host}:{self.port}", "--data-dir", self.data_dir,
               "--sys-interval", "0"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        return cmd + self.args + [str(a) for a in extra]

    def spawn(self, extra=()) -> subprocess.Popen:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        self.log_path = os.path.join(self.workdir, f"millet-{self.runs}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd(extra), stdout=subprocess.DEVNULL, stderr=log,
                                         stdin=subprocess.DEVNULL)
        return self.proc

    def start(self, extra=()):
        """Start and wait (bounded) until the port accepts connections."""
        last = None
        for _ in range(3):
            self.spawn(extra)
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                if self.proc.poll() is not None:
                    last = f"millet exited with {self.proc.returncode} at startup:\n{self.log_text()[-3000:]}"
                    break
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return self
                except OSError:
                    pass
                if time.monotonic() >= deadline:
                    self.kill()
                    raise AssertionError(f"millet did not listen within {STARTUP_TIMEOUT}s:\n{self.log_text()}")
                time.sleep(0.02)
            if "in use" not in last.lower():
                break
            self.port = free_port()  # port taken by another process meanwhile
        raise AssertionError(last)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait (bounded) for a clean exit."""
        p = self.proc
        assert p is not None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
                raise AssertionError(f"millet did not stop within {timeout}s of SIGTERM:\n{self.log_text()[-3000:]}")
        return p.returncode

    def kill(self):
        """SIGKILL: no flush, no shutdown path."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=10)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@pytest.fixture
def millet_proc():
    """Factory: ``millet_proc(args=[...], config_text=...)`` -> an unstarted MilletProc with its own
    fixed data dir and port; every process is killed and every dir removed at teardown."""
    made: list[MilletProc] = []
    dirs: list[str] = []

    def make(args=(), config_text=None, data_dir=None) -> MilletProc:
        wd = tempfile.mkdtemp(prefix="millet-durability-")
        dirs.append(wd)
        m = MilletProc(wd, args, config_text, data_dir)
        made.append(m)
        return m

    yield make
    for m in made:
        m.kill()
    if not os.environ.get("KEEP_BROKER_LOGS"):
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# Load clients (raw sockets, pipelined)
# ---------------------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes ``count`` QoS 1 or 2 messages ``<tag>:<seq>`` to ``topic`` keeping ``window``
    unacknowledged, and records the sequences acknowledged (PUBACK; PUBCOMP for QoS 2). Ends
    when all are acknowledged or when the connection drops (the broker was killed)."""

    def __init__(self, target, tag: str, topic: str, qos: int, count: int, window: int = 32,
                 version: str = V311):
        super().__init__(daemon=True)
        self.target, self.tag, self.topic, self.qos = target, tag, topic, qos
        self.count, self.window, self.version = count, window, version
        self.acked: list[int] = []
        self.pubrec: set[int] = set()  # QoS 2: PUBREC seen (owned by the broker, not yet complete)
        self.refused: list[tuple[int, int]] = []
        self.error: str | None = None
        self.sent = 0

    def payload(self, seq: int) -> bytes:
        return f"{self.tag}:{seq}".encode()

    def run(self):
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = repr(e)

    def _run(self):
        raw = RawClient(self.target, self.version)
        raw.connect(unique("pub"), clean=True)
        inflight: dict[int, int] = {}  # packet id -> seq
        nxt = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = bytearray()
            while len(inflight) < self.window and nxt < self.count:
                pid = nxt % 65535 + 1
                inflight[pid] = nxt
                out += publish_packet(self.topic, self.payload(nxt), self.qos, pid=pid, version=self.version)
                nxt += 1
            if out and not raw.send(bytes(out)):
                return
            self.sent = nxt
            if not inflight:
                raw.disconnect()
                raw.close()
                return
            try:
                p = raw.recv(2.0)
            except TimeoutError:
                continue
            except OSError:
                return
            if p is None:
                return  # broker gone
            while p is not None:
                reply = self._handle(p, inflight)
                if reply and not raw.send(reply):
                    return
                p = raw._try_parse()  # everything already buffered, without blocking
        self.error = "publisher did not finish within 60s"

    def _handle(self, p, inflight) -> bytes | None:
        if p.type in (PUBACK, PUBREC, PUBCOMP):
            pid, rc, _ = p.ack()
            seq = inflight.get(pid)
            if seq is None:
                return None
            if rc >= 0x80:
                self.refused.append((seq, rc))
                del inflight[pid]
            elif p.type == PUBREC:
                self.pubrec.add(seq)
                return ack_packet(PUBREL, pid, version=self.version)
            else:
                self.acked.append(seq)
                del inflight[pid]
        return None

    def acked_payloads(self) -> set[bytes]:
        return {self.payload(s) for s in self.acked}


class Subscriber:
    """A raw-socket subscriber with a persistent session that outlives broker restarts, like a
    correct client: acknowledges QoS 1 (PUBACK) and QoS 2 (PUBREC on PUBLISH, delivering at
    once; PUBCOMP on PUBREL), and a QoS 2 PUBLISH whose packet id still awaits PUBREL is not
    delivered again (method A of [MQTT-4.3.3]); those ids are kept across reconnections.
    ``delay``: seconds spent per PUBLISH (a slow consumer). ``hold_qos2``: do not answer QoS 2
    PUBLISH / PUBREL at all (stash them for the test)."""

    def __init__(self, target, client_id: str, version: str = V5, expiry: int = 3600,
                 receive_max: int | None = None, delay: float = 0.0):
        self.target, self.client_id, self.version = target, client_id, version
        self.expiry, self.receive_max, self.delay = expiry, receive_max, delay
        self.awaiting_rel: set[int] = set()
        self.cond = threading.Condition()
        self.received: list[bytes] = []
        self.log: list[tuple] = []  # (payload, packet id, dup, connection number) of QoS 2 deliveries
        self.conn_no = 0
        self.redelivered_ids = 0  # PUBLISH for an id awaiting PUBREL (correctly not delivered)
        self.raw: RawClient | None = None
        self.thread: threading.Thread | None = None
        self._stop = False

    def connect(self, clean: bool = False):
        self.raw = RawClient(self.target, self.version)
        self.conn_no += 1
        kw = {}
        if self.version == V5:
            p = {P_SESSION_EXPIRY: self.expiry}
            if self.receive_max:
                p[P_RECEIVE_MAXIMUM] = self.receive_max
            kw["properties"] = p
        return self.raw.connect(self.client_id, clean=clean, **kw)

    def subscribe(self, flt: str, qos: int = 2):
        assert self.raw.subscribe([(flt, qos)]) == [qos]

    def start(self):
        self._stop = False
        self.thread = threading.Thread(target=self._loop, args=(self.raw,), daemon=True)
        self.thread.start()

    def _loop(self, raw: RawClient):
        while not self._stop:
            try:
                p = raw.recv(0.2)
            except TimeoutError:
                continue
            except (OSError, ValueError):
                return
            if p is None:
                return
            if p.type == PUBLISH:
                if self.delay:
                    time.sleep(self.delay)
                reply = self.on_publish(p.publish())
            elif p.type == PUBREL:
                reply = self.on_pubrel(p.ack()[0])
            else:
                reply = None
            if reply and not raw.send(reply):
                return

    def on_publish(self, pub) -> bytes | None:
        if pub.qos == 2:
            if pub.pid in self.awaiting_rel:
                self.redelivered_ids += 1
            else:
                self.awaiting_rel.add(pub.pid)
                self.log.append((pub.payload, pub.pid, pub.dup, self.conn_no))
                self._deliver(pub.payload)
            return ack_packet(PUBREC, pub.pid, version=self.version)
        self._deliver(pub.payload)
        if pub.qos == 1:
            return ack_packet(PUBACK, pub.pid, version=self.version)
        return None

    def on_pubrel(self, pid: int) -> bytes:
        self.awaiting_rel.discard(pid)
        return ack_packet(PUBCOMP, pid, version=self.version)

    def _deliver(self, payload: bytes):
        with self.cond:
            self.received.append(payload)
            self.cond.notify_all()

    def wait_all(self, expected: set[bytes], timeout: float = DRAIN_TIMEOUT):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                missing = expected - set(self.received)
                if not missing:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    sample = sorted(missing)[:10]
                    raise AssertionError(f"{len(missing)} acknowledged message(s) never delivered "
                                         f"after {timeout}s, e.g. {sample}")
                self.cond.wait(min(left, 0.5))

    def settle(self, window: float = 0.5) -> list[bytes]:
        """Short fixed window for late (duplicate) arrivals."""
        time.sleep(window)
        with self.cond:
            return list(self.received)

    def stop(self):
        """Stop reading (the socket stays as it is)."""
        self._stop = True
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None

    def disconnect(self):
        self.stop()
        if self.raw is not None:
            self.raw.disconnect()
            self.raw.close()

    def drop(self):
        self.stop()
        if self.raw is not None:
            self.raw.abort()


def retained_barrier(target, topic: str):
    """A retained QoS 1 publish: its PUBACK comes once the store made it durable, and the store
    commits in submission order, so everything the broker submitted before is durable too."""
    raw = RawClient(target, V311)
    raw.connect(unique("barrier"), clean=True)
    raw.publish(topic, b"barrier", qos=1, retain=True)
    raw.disconnect()
    raw.close()


def assert_exactly_once(received: list[bytes], payloads: set[bytes], what: str, log=()):
    counts = collections.Counter(p for p in received if p in payloads)
    dups = {p: n for p, n in counts.items() if n > 1}
    if dups:
        first = sorted(dups)[:3]
        how = [e for e in log if e[0] in first]
        raise AssertionError(f"{what}: {len(dups)} QoS 2 message(s) delivered more than once, e.g. "
                             f"{list(dups.items())[:5]}; deliveries (payload, packet id, DUP, connection): {how}")


# ---------------------------------------------------------------------------
# Restart (SIGTERM)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["sync", "interval"])
def test_restart_delivers_acknowledged_messages_once(millet_proc, durability):
    """Persistent subscribers (v5 expiry > 0, 3.1.1 clean session 0) offline; QoS 1 and 2 from
    v5 and 3.1.1 publishers; SIGTERM; start: session present, every message arrives, QoS 2 once.
    Also under `interval`, which acknowledges before the write: a clean stop still writes and
    syncs everything it acknowledged."""
    m = millet_proc(args=["--durability", durability]).start()
    subs = {}
    for version in (V5, V311):
        cid = unique(f"rs-sub-{version}-")
        c, ack = session_client(lambda v, **kw: Client(m, v, **kw), version, cid, expiry=600)
        assert not ack.session_present
        assert c.subscribe("rs/#", 2) == [2]
        c.disconnect()
        subs[version] = cid
    n = 150
    expected: dict[bytes, int] = {}
    for version in (V5, V311):
        pub = Client(m, version)
        pub.connect()
        for qos in (1, 2):
            for i in range(n):
                payload = f"{version}:{qos}:{i}".encode()
                rc = pub.publish(f"rs/{version}/{qos}", payload, qos=qos)
                assert rc == 0, f"publish {payload!r} got reason {rc:#x}"
                expected[payload] = qos
        pub.disconnect()
    assert m.stop() == 0, f"SIGTERM exit code non-zero:\n{m.log_text()[-2000:]}"
    m.start()
    for version, cid in subs.items():
        c, ack = session_client(lambda v, **kw: Client(m, v, **kw), version, cid, expiry=600)
        try:
            assert ack.session_present, f"{version}: session present 0 after a restart"
            got = c.messages.wait_for(len(expected), timeout=DRAIN_TIMEOUT,
                                      pred=lambda msg: msg.payload in expected)
            got = c.messages.settle()
            payloads = [g.payload for g in got]
            assert set(expected) <= set(payloads)
            assert_exactly_once(payloads, {p for p, q in expected.items() if q == 2}, version)
            # QoS 1 may be duplicated, but only marked as such (DUP on a resend) or not at all
        finally:
            c.close()
    assert m.stop() == 0


def test_retained_and_session_state_survive_restart(millet_proc):
    """Retained messages (set, replaced, deleted), subscriptions with their options, and the
    session itself (session present = 1) come back after SIGTERM + start, and after kill -9."""
    m = millet_proc().start()
    pub = Client(m, V5)
    pub.connect()
    assert pub.publish("ret/a", b"a1", qos=1, retain=True) in (0, 0x10)
    assert pub.publish("ret/a", b"a2", qos=1, retain=True) in (0, 0x10)  # replaces a1
    assert pub.publish("ret/b", b"b1", qos=1, retain=True) in (0, 0x10)
    assert pub.publish("ret/b", b"", qos=1, retain=True) in (0, 0x10)  # deletes b
    assert pub.publish("ret/c", b"c1", qos=2, retain=True) in (0, 0x10)
    pub.disconnect()

    sid = unique("st-sub-")
    s, ack = session_client(lambda v, **kw: Client(m, v, **kw), V5, sid, expiry=600)
    assert not ack.session_present
    assert s.subscribe("st/one", 1) == [1]
    assert s.subscribe("st/two/+", 2) == [2]
    s.disconnect()

    for how in ("stop", "kill"):
        if how == "stop":
            assert m.stop() == 0
        else:
            retained_barrier(m, "ret/barrier")  # everything above durable before the kill
            m.kill()
        m.start()
        r = Client(m, V5)
        r.connect()
        assert r.subscribe("ret/#", 1) == [1]
        r.messages.wait_for(2, pred=lambda x: x.topic in ("ret/a", "ret/c"))
        got = r.messages.settle()
        by_topic = {g.topic: g for g in got}
        assert by_topic["ret/a"].payload == b"a2" and by_topic["ret/a"].retain
        assert by_topic["ret/c"].payload == b"c1"
        assert "ret/b" not in by_topic, f"deleted retained message came back after {how}"
        r.disconnect()

        s, ack = session_client(lambda v, **kw: Client(m, v, **kw), V5, sid, expiry=600)
        assert ack.session_present, f"session present 0 after {how}"
        # The subscriptions work without subscribing again, with their granted QoS.
        p = Client(m, V311)
        p.connect()
        p.publish("st/one", f"one-{how}".encode(), qos=2)
        p.publish("st/two/x", f"two-{how}".encode(), qos=2)
        p.publish("st/other", b"nope", qos=1)
        p.disconnect()
        msgs = s.messages.wait_for(2)
        msgs = s.messages.assert_no_more(2)
        got = {x.topic: x for x in msgs}
        assert got["st/one"].payload == f"one-{how}".encode() and got["st/one"].qos == 1
        assert got["st/two/x"].payload == f"two-{how}".encode() and got["st/two/x"].qos == 2
        s.disconnect()


# ---------------------------------------------------------------------------
# Crash (kill -9) under load
# ---------------------------------------------------------------------------


def _load_and_kill(m: MilletProc, round_tag: str, topic: str, kill_after: int, count: int = 20000,
                   pubs_spec=((1, V311), (2, V311), (1, V5))) -> list[Publisher]:
    pubs = [Publisher(m, f"{round_tag}-q{qos}-v{v}", f"{topic}/{qos}/{v}", qos, count, window=64, version=v)
            for qos, v in pubs_spec]
    for p in pubs:
        p.start()
    wait_until(lambda: sum(len(p.acked) for p in pubs) >= kill_after or not any(p.is_alive() for p in pubs),
               timeout=30, what=f"{kill_after} acknowledged messages")
    m.kill()
    for p in pubs:
        p.join(timeout=10)
        assert not p.is_alive(), "publisher did not notice the broker was killed"
        assert p.error is None, p.error
        assert not p.refused, f"{p.tag}: refused under load: {p.refused[:5]}"
    acked = sum(len(p.acked) for p in pubs)
    assert acked >= kill_after, f"only {acked} messages acknowledged before the kill"
    assert any(p.sent > len(p.acked) for p in pubs), "the load finished before the kill"
    return pubs


def _check_delivered(sub: Subscriber, pubs: list[Publisher], what: str):
    expected: set[bytes] = set()
    qos2: set[bytes] = set()
    for p in pubs:
        a = p.acked_payloads()
        expected |= a
        if p.qos == 2:
            qos2 |= a | {p.payload(s) for s in p.pubrec}
    sub.wait_all(expected)
    received = sub.settle()
    assert_exactly_once(received, qos2, what, sub.log)
    return len(expected)


def test_crash_offline_subscriber_loses_no_acknowledged_message(millet_proc):
    """kill -9 in the middle of thousands of QoS 1/2 publishes to an offline persistent session,
    4 rounds on the same store (sync): every PUBACKed / PUBCOMPed message is delivered after the
    restart, QoS 2 at most once."""
    m = millet_proc(args=["--durability", "sync"]).start()
    sub = Subscriber(m, unique("crash-off-"), V5)
    assert not sub.connect(clean=True).session_present
    sub.subscribe("crash/#", 2)
    sub.disconnect()
    total = 0
    for rnd in range(4):
        pubs = _load_and_kill(m, f"r{rnd}", f"crash/{rnd}", kill_after=1500 + 500 * rnd)
        m.start()
        ack = sub.connect(clean=False)
        assert ack.session_present, f"round {rnd}: session lost in the crash"
        sub.start()
        total += _check_delivered(sub, pubs, f"round {rnd}")
        sub.disconnect()
    assert total >= 4 * 1500
    assert "panicked" not in m.log_text()


@pytest.mark.parametrize("delay", [0.0005, 0.0], ids=["slow", "fast"])
def test_crash_online_subscriber(millet_proc, delay):
    """The subscriber is online when the broker is killed: slow (its in-flight window is full and a
    queue builds up), or fast (PUBLISH / PUBREL answered at once, so acknowledgements race the
    store's fsync). After the restart it resumes and gets every acknowledged message, QoS 2 at
    most once. 3 rounds."""
    m = millet_proc(args=["--durability", "sync"]).start()
    sub = Subscriber(m, unique("crash-on-"), V5, receive_max=16, delay=delay)
    assert not sub.connect(clean=True).session_present
    sub.subscribe("slow/#", 2)
    sub.start()
    for rnd in range(3):
        with sub.cond:
            start_len = len(sub.received)
        pubs = _load_and_kill(m, f"s{rnd}", f"slow/{rnd}", kill_after=1500,
                              pubs_spec=((1, V311), (2, V5)))
        sub.drop()
        with sub.cond:
            backlog = sum(len(p.acked) for p in pubs) - (len(sub.received) - start_len)
        m.start()
        assert sub.connect(clean=False).session_present
        sub.delay = 0.0
        sub.start()
        _check_delivered(sub, pubs, f"round {rnd}")
        sub.delay = delay
        if delay:
            assert backlog > 0, "the subscriber kept up: no queue at the crash"


def test_crash_with_qos2_inflight_both_ways(millet_proc):
    """QoS 2 in flight at the crash, outgoing (PUBLISH not yet PUBRECed, PUBREL not yet
    PUBCOMPed) and incoming (PUBREC sent, PUBREL not yet received): after kill -9 the broker
    resends PUBLISH with DUP and the same packet id, or PUBREL, and completes the incoming flow;
    nothing is delivered twice and nothing is lost."""
    m = millet_proc(args=["--durability", "sync"]).start()
    # Incoming: a persistent publisher session with QoS 2 ids awaiting PUBREL.
    pub_id = unique("q2pub-")
    pub = RawClient(m, V5)
    pub.connect(pub_id, clean=True, properties={P_SESSION_EXPIRY: 600})
    # Outgoing: the subscriber takes 10 at a time.
    sub = Subscriber(m, unique("q2sub-"), V5, receive_max=10)
    sub.connect(clean=True)
    sub.subscribe("q2/#", 2)
    payloads = [f"q2:{i}".encode() for i in range(30)]
    for i, pl in enumerate(payloads):
        pid = i + 1
        pub.send(publish_packet("q2/t", pl, 2, pid=pid, version=V5))
        assert pub.expect(PUBREC).ack()[:2] == (pid, 0)
        if i < 25:  # 25 completed, 5 left awaiting PUBREL in the broker
            pub.send(ack_packet(PUBREL, pid, version=V5))
            assert pub.expect(PUBCOMP).ack()[0] == pid
    # The subscriber receives its window of 10: PUBRECs the first 5 and takes the PUBREL of 3.
    first: dict[int, bytes] = {}
    for _ in range(10):
        p = sub.raw.recv_publish()
        assert p.qos == 2 and not p.dup
        first[p.pid] = p.payload
    sub.raw.assert_silent(0.3)  # receive maximum respected
    pids = list(first)
    for pid in pids:
        sub.awaiting_rel.add(pid)
        sub._deliver(first[pid])
    for pid in pids[:5]:
        sub.raw.send(ack_packet(PUBREC, pid, version=V5))
    rels = [sub.raw.expect(PUBREL).ack()[0] for _ in range(5)]
    assert sorted(rels) == sorted(pids[:5])
    for pid in pids[:3]:
        sub.raw.send(sub.on_pubrel(pid))
    retained_barrier(m, "q2-barrier")  # what the broker did above is durable
    m.kill()
    pub.close()
    sub.drop()

    m.start()
    # The publisher resumes and completes its 5 pending QoS 2 flows: PUBREL must be answered.
    pub = RawClient(m, V5)
    assert pub.connect(pub_id, clean=False, properties={P_SESSION_EXPIRY: 600}).session_present
    for pid in range(26, 31):
        pub.send(ack_packet(PUBREL, pid, version=V5))
        got = pub.expect(PUBCOMP).ack()
        assert got[:2] == (pid, 0), f"PUBREL {pid} after restart: PUBCOMP {got}"
    pub.disconnect()
    pub.close()
    # The subscriber resumes: 5 un-PUBRECed PUBLISH come again, DUP, same ids; 2 PUBREL again.
    assert sub.connect(clean=False).session_present
    seen = []
    first_seen: set[int] = set()
    deadline = time.monotonic() + 10
    while len([s for s in seen if s[0] == PUBLISH]) < 5 or len([s for s in seen if s[0] == PUBREL]) < 2:
        assert time.monotonic() < deadline, f"resend incomplete: {seen}"
        p = sub.raw.recv(max(0.01, deadline - time.monotonic()))
        assert p is not None, "connection closed"
        if p.type == PUBLISH:
            pb = p.publish()
            seen.append((PUBLISH, pb.pid, pb.dup, pb.payload))
            if pb.pid in pids[5:] and pb.pid not in first_seen:
                first_seen.add(pb.pid)
                assert pb.dup and pb.payload == first[pb.pid], f"resend of {pb.pid}: {pb}"
            reply = sub.on_publish(pb)
        elif p.type == PUBREL:
            pid = p.ack()[0]
            seen.append((PUBREL, pid))
            reply = sub.on_pubrel(pid)
        else:
            continue
        sub.raw.send(reply)
    resent = {s[1] for s in seen if s[0] == PUBLISH and s[2]}
    assert set(pids[5:]) <= resent, f"un-PUBRECed ids not resent with DUP: {seen}"
    assert {s[1] for s in seen if s[0] == PUBREL} >= set(pids[3:5]), seen
    sub.start()
    sub.wait_all(set(payloads), timeout=10)
    received = sub.settle()
    assert_exactly_once(received, set(payloads), "QoS 2 in flight at the crash")


# ---------------------------------------------------------------------------
# Expiry across a restart
# ---------------------------------------------------------------------------


def test_expiry_while_broker_down(millet_proc):
    """A session whose expiry elapses while the broker is down is gone after the restart; a
    queued message whose message expiry elapsed is not delivered, one without expiry is."""
    m = millet_proc().start()
    short_id, long_id = unique("exp-short-"), unique("exp-long-")
    s, _ = session_client(lambda v, **kw: Client(m, v, **kw), V5, short_id, expiry=1)
    assert s.subscribe("exp/s", 1) == [1]
    s.disconnect()
    l, _ = session_client(lambda v, **kw: Client(m, v, **kw), V5, long_id, expiry=600)
    assert l.subscribe("exp/l/#", 1) == [1]
    l.disconnect()
    p = Client(m, V5)
    p.connect()
    p.publish("exp/l/short", b"expires", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    p.publish("exp/l/long", b"stays", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=600))
    p.publish("exp/l/none", b"stays-too", qos=1)
    p.disconnect()
    assert m.stop() == 0
    time.sleep(1.5)  # deliberate: let both 1 s expiries elapse while the broker is down
    m.start()
    s, ack = session_client(lambda v, **kw: Client(m, v, **kw), V5, short_id, expiry=1)
    assert not ack.session_present, "a session that expired while the broker was down came back"
    s.disconnect()
    l, ack = session_client(lambda v, **kw: Client(m, v, **kw), V5, long_id, expiry=600)
    assert ack.session_present
    got = l.messages.wait_for(2)
    got = l.messages.assert_no_more(2)
    assert sorted(g.payload for g in got) == [b"stays", b"stays-too"]
    kept = [g for g in got if g.payload == b"stays"][0]
    assert 0 < kept.prop("MessageExpiryInterval") <= 600
    l.disconnect()


# ---------------------------------------------------------------------------
# Corrupted store
# ---------------------------------------------------------------------------


def _seed_store(m: MilletProc):
    m.start()
    s, _ = session_client(lambda v, **kw: Client(m, v, **kw), V5, unique("seed-"), expiry=600)
    s.subscribe("seed/#", 1)
    s.disconnect()
    p = Client(m, V311)
    p.connect()
    for i in range(200):
        p.publish(f"seed/{i}", b"x" * 200, qos=1, retain=(i % 10 == 0))
    p.disconnect()
    assert m.stop() == 0
    assert m.store_file.exists()


def _truncate(frac):
    def f(path: Path):
        os.truncate(path, int(path.stat().st_size * frac))
    return f


def _overwrite(at_frac, data):
    def f(path: Path):
        with open(path, "r+b") as fh:
            fh.seek(int(path.stat().st_size * at_frac))
            fh.write(data)
    return f


def _flip(at):
    def f(path: Path):
        with open(path, "r+b") as fh:
            fh.seek(at)
            b = fh.read(512)
            fh.seek(at)
            fh.write(bytes(x ^ 0x5A for x in b))
    return f


CORRUPTIONS = [
    pytest.param(_truncate(0.5), id="truncated-to-half"),
    pytest.param(lambda p: os.truncate(p, 100), id="truncated-to-100-bytes"),
    pytest.param(lambda p: os.truncate(p, 0), id="emptied"),
    pytest.param(_overwrite(0, os.urandom(4096)), id="header-garbage"),
    pytest.param(_overwrite(1 / 3, b"\xff" * 32768), id="middle-0xff"),
    pytest.param(_flip(600), id="flip-512-at-600"),
    pytest.param(_flip(4096), id="flip-512-at-4096"),  # once a redb panic in init (now caught)
    pytest.param(_overwrite(0.5, b"\x5a" * 512), id="middle-0x5a"),
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_corrupted_store_recovers_or_refuses_clearly(millet_proc, corrupt):
    """A damaged millet.redb: Millet either starts (and serves) or exits non-zero within a bound
    with the file's path on stderr. Never a hang, never a crash by panic."""
    m = millet_proc()
    _seed_store(m)
    corrupt(m.store_file)
    m.spawn()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    outcome = None
    while outcome is None:
        if m.proc.poll() is not None:
            outcome = "exit"
            break
        try:
            with socket.create_connection((m.host, m.port), timeout=0.5):
                outcome = "started"
        except OSError:
            assert time.monotonic() < deadline, f"neither started nor exited in {STARTUP_TIMEOUT}s"
            time.sleep(0.02)
    log = m.log_text()
    if outcome == "started":
        c = Client(m, V311)
        c.connect()
        assert c.subscribe("alive/t", 1) == [1]
        c.publish("alive/t", b"ok", qos=1)
        assert c.messages.wait_for(1)[0].payload == b"ok"
        c.disconnect()
        assert m.stop() == 0
        return
    # 101 is what an uncaught Rust panic exits with: the error must take the normal path.
    rc = m.proc.returncode
    assert rc not in (0, 101, -signal.SIGABRT), f"exit {rc}:\n{log[-4000:]}"
    tail = log.strip().splitlines()[-1]
    assert str(m.store_file) in tail, f"the final error does not name the store file:\n{log[-4000:]}"
    # A panic inside redb on a damaged page may be caught by the store and reported like any
    # open error; the default panic hook still prints it first (noise, not a crash).
    assert "panicked" not in log or "cannot open" in log, f"uncaught panic:\n{log[-4000:]}"


def test_corrupted_store_quarantined(millet_proc):
    """With ``[store] quarantine_corrupt = true`` an unreadable file is moved aside, Millet starts
    empty and logs it."""
    m = millet_proc(config_text="[store]\nquarantine_corrupt = true\n")
    _seed_store(m)
    os.truncate(m.store_file, 100)
    m.start()
    c, ack = session_client(lambda v, **kw: Client(m, v, **kw), V5, unique("q-"), expiry=60)
    assert not ack.session_present
    assert c.subscribe("after/q", 1) == [1]
    c.publish("after/q", b"fresh", qos=1)
    assert c.messages.wait_for(1)[0].payload == b"fresh"
    r = Client(m, V311)
    r.connect()
    r.subscribe("seed/#", 0)
    r.messages.assert_no_more(0)  # the retained messages of the old store are gone
    r.disconnect()
    c.disconnect()
    aside = list(m.store_file.parent.glob("millet.redb.corrupt-*"))
    assert aside, f"no quarantined file in {m.store_file.parent}: {os.listdir(m.store_file.parent)}"
    log = m.log_text()
    assert "quarantin" in log.lower() or aside[0].name in log, f"quarantine not logged:\n{log}"
    assert m.stop() == 0


# ---------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs():
    d = tempfile.mkdtemp(prefix="millet-diskfull-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", d], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a 4 MiB tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", d], capture_output=True)
        subprocess.run(["umount", "-l", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _fill(path: str) -> int:
    """Write zeros to ``path`` until the file system is full (unbuffered: ENOSPC surfaces at once)."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        for block in (b"\0" * 65536, b"\0" * 512):
            try:
                while True:
                    n += f.write(block) or 0
            except OSError:
                pass
    return n


def test_disk_full(millet_proc, small_tmpfs):
    m = millet_proc(data_dir=small_tmpfs)
    m.start()
    sid = unique("full-sub-")
    s, _ = session_client(lambda v, **kw: Client(m, v, **kw), V5, sid, expiry=600)
    assert s.subscribe("full/#", 1) == [1]
    s.disconnect()
    q0 = Client(m, V5)
    q0.connect()
    assert q0.subscribe("q0/t", 0) == [0]

    pub = Client(m, V5)
    pub.connect()
    assert pub.publish("full/pre", b"before", qos=1) == 0
    filler = os.path.join(small_tmpfs, "filler")
    _fill(filler)
    # The store file may still have free pages: publish until a write needs new space.
    codes = []
    for i in range(200):
        rc = pub.publish("full/x", os.urandom(16384), qos=1, timeout=10)
        codes.append(rc)
        if rc >= 0x80:
            break
    assert codes[-1] in (0x97, 0x80), f"never refused on a full disk: reason codes {codes[-10:]}"
    assert pub.is_connected
    # Still refused, never a false success, while the disk stays full.
    for _ in range(3):
        assert pub.publish("full/y", os.urandom(16384), qos=1, timeout=10) in (0x97, 0x80)
    # 3.1.1: no negative PUBACK exists, so the connection is closed instead of acknowledged.
    raw = RawClient(m, V311)
    raw.connect(unique("full-v3-"), clean=True)
    raw.send(publish_packet("full/v3", os.urandom(16384), 1, pid=7))
    seen = raw.wait_closed(timeout=10)
    assert not any(p.type == PUBACK for p in seen), f"3.1.1 publish acknowledged on a full disk: {seen}"
    # QoS 0 keeps flowing.
    for i in range(5):
        pub.publish("q0/t", f"q0-{i}".encode(), qos=0)
    assert [x.payload for x in q0.messages.wait_for(5)] == [f"q0-{i}".encode() for i in range(5)]

    os.remove(filler)
    # Writes resume once space is back (the engine is reopened at most every 100 ms).
    ok = wait_until(lambda: pub.publish("full/after", b"after", qos=1, timeout=10) == 0, timeout=10,
                    interval=0.1, what="QoS 1 acknowledged again after freeing space")
    assert ok
    assert pub.publish("full/after2", b"after2", qos=1) == 0
    pub.disconnect()
    q0.disconnect()
    assert m.alive()
    # What was acknowledged survives a crash.
    m.kill()
    m.start()
    s, ack = session_client(lambda v, **kw: Client(m, v, **kw), V5, sid, expiry=600)
    assert ack.session_present
    got = s.messages.wait_for(3, timeout=10, pred=lambda x: x.topic in ("full/pre", "full/after", "full/after2"))
    assert {x.payload for x in got} >= {b"before", b"after", b"after2"}
    s.disconnect()
    assert "panicked" not in m.log_text()
