"""Fixtures for the Millet black-box MQTT conformance suite.

Broker selection:
  BROKER=mosquitto   run against Mosquitto (validation of the suite itself)
  (default)          run against Millet: $MILLET_BIN, else <repo>/target/release/millet,
                     else <repo>/target/debug/millet; extra args from $MILLET_ARGS.

Every broker is started on a free loopback port and waited for by polling the port
with a deadline.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import HOST, Client, RawClient, unique, V311, V5  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BROKER_KIND = os.environ.get("BROKER", "millet").strip().lower() or "millet"
IS_MOSQUITTO = BROKER_KIND == "mosquitto"
STARTUP_TIMEOUT = 15.0

# Settings a test may ask a fresh broker for, and their Millet flag / mosquitto.conf option.
SETTINGS = {
    "max_packet_size": ("--max-packet-size", "max_packet_size"),
    "max_inflight": ("--max-inflight", "max_inflight_messages"),
    # the Receive Maximum the server announces in CONNACK (mosquitto derives it from
    # max_inflight_messages)
    "receive_maximum": ("--receive-maximum", "max_inflight_messages"),
    "max_queued": ("--max-queued", "max_queued_messages"),
    "topic_alias_max": ("--topic-alias-max", "max_topic_alias"),
    "max_keepalive": ("--max-keepalive", "max_keepalive"),
    "sys_interval": ("--sys-interval", "sys_interval"),
    # Millet's store policy; the suite's mosquitto runs with persistence off anyway
    "durability": ("--durability", None),
}
# mosquitto options that belong to the listener block rather than the global section
_MOSQ_LISTENER_OPTS = {"max_topic_alias"}


def pytest_configure(config):
    config.addinivalue_line("markers", "millet_only(reason): only meaningful against Millet")
    config.addinivalue_line("markers", "mosquitto_only(reason): only meaningful against Mosquitto")


# Tests of the cluster subset (MILLET_CLUSTER=1) that need what cluster mode
# does not do yet (docs/CLUSTER.md), skipped there with the reason. A prefix
# of the test id (file::name, or file::name[params]).
CLUSTER_GAPS = {
    "test_shared.py::test_shared_messages_distributed_round_robin":
        "cluster: a group's messages are spread by NATS queue groups (at random), not in turn",
    "test_compat.py::test_bridge_state_topic_may_be_published":
        "cluster: $SYS topics are each node's own (a bridge's state topic is not forwarded)",
    "test_compat.py::test_maximal_topic_and_filters_are_accepted":
        "cluster: topics and filters are held to 1,024 bytes (CLUSTER_MAX_TOPIC_LENGTH)",
}


def pytest_collection_modifyitems(config, items):
    if IN_CLUSTER:
        for item in items:
            nodeid = item.nodeid.split("/")[-1]
            for prefix, reason in CLUSTER_GAPS.items():
                if nodeid == prefix or nodeid.startswith(prefix + "["):
                    item.add_marker(pytest.mark.skip(reason=reason))
    if os.environ.get("CONFORMANCE_RUN_ALL"):
        return  # debugging aid: run millet_only / mosquitto_only tests against any broker
    for item in items:
        m = item.get_closest_marker("millet_only")
        if m is not None and IS_MOSQUITTO:
            reason = m.kwargs.get("reason") or (m.args[0] if m.args else "Millet-specific behaviour")
            item.add_marker(pytest.mark.skip(reason=f"millet_only: {reason}"))
        m = item.get_closest_marker("mosquitto_only")
        if m is not None and not IS_MOSQUITTO:
            reason = m.kwargs.get("reason") or (m.args[0] if m.args else "Mosquitto-specific behaviour")
            item.add_marker(pytest.mark.skip(reason=f"mosquitto_only: {reason}"))


def pytest_report_header(config):
    return f"conformance broker under test: {BROKER_KIND}"


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _find_mosquitto() -> str:
    exe = shutil.which("mosquitto")
    if exe:
        return exe
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/local/bin/mosquitto"):
        if os.path.exists(cand):
            return cand
    pytest.exit("BROKER=mosquitto but no mosquitto binary found (apt-get install mosquitto)", returncode=3)


def _find_millet() -> str:
    env = os.environ.get("MILLET_BIN")
    if env:
        return env
    for cand in (REPO / "target" / "release" / "millet", REPO / "target" / "debug" / "millet"):
        if cand.exists():
            return str(cand)
    pytest.exit("Millet binary not found: build it (cargo build --release) or set MILLET_BIN", returncode=3)


# Brokers started and not stopped yet: a failing test's report shows the
# end of each one's log (a CI failure is otherwise all there is to go by).
RUNNING: list = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed or not RUNNING:
        return
    tails = []
    for b in RUNNING:
        node = [a for a in b.args if not str(a).startswith("nats://")][-3:]
        tails.append(f"--- {b.kind} on port {b.port} {' '.join(map(str, node))}:\n{b.log_tail(30)}")
    rep.sections.append(("broker logs (the last 30 lines of each broker running)", "\n".join(tails)))


@dataclass
class Broker:
    kind: str
    host: str
    port: int
    settings: dict
    proc: subprocess.Popen | None = None
    workdir: str = ""
    log_path: str = ""
    extra: dict = field(default_factory=dict)
    # Extra Millet flags (cluster nodes: --nats, --node-id).
    args: list = field(default_factory=list)

    @property
    def is_mosquitto(self) -> bool:
        return self.kind == "mosquitto"

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def start(self):
        self.workdir = tempfile.mkdtemp(prefix=f"conformance-{self.kind}-")
        self.log_path = os.path.join(self.workdir, "broker.log")
        if self.is_mosquitto:
            conf = os.path.join(self.workdir, "mosquitto.conf")
            glob_lines = ["persistence false", "log_dest stderr", "log_type all", "allow_anonymous true"]
            listener_lines = [f"listener {self.port} {self.host}"]
            for key, value in self.settings.items():
                opt = SETTINGS[key][1]
                if opt is None:
                    continue
                (listener_lines if opt in _MOSQ_LISTENER_OPTS else glob_lines).append(f"{opt} {value}")
            with open(conf, "w") as f:
                f.write("\n".join(glob_lines + listener_lines) + "\n")
            os.chmod(self.workdir, 0o755)
            os.chmod(conf, 0o644)
            cmd = [_find_mosquitto(), "-c", conf]
        else:
            data_dir = os.path.join(self.workdir, "data")
            os.makedirs(data_dir, exist_ok=True)
            cmd = [_find_millet(), "--listen", f"{self.host}:{self.port}", "--data-dir", data_dir]
            cmd += ["--no-ws"]  # no WebSocket listener on the default port 8083
            for key, value in self.settings.items():
                cmd += [SETTINGS[key][0], str(value)]
            cmd += self.args
            cmd += shlex.split(os.environ.get("MILLET_ARGS", ""))
        self.extra["cmd"] = cmd
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        RUNNING.append(self)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode} during startup: {cmd}\n"
                                   f"{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"broker did not accept connections within {STARTUP_TIMEOUT}s: {cmd}\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        RUNNING[:] = [b for b in RUNNING if b is not self]
        if self.proc is None:
            return
        terminate(self.proc)
        self.proc = None
        if os.environ.get("KEEP_BROKER_LOGS"):
            return
        shutil.rmtree(self.workdir, ignore_errors=True)


# MILLET_CLUSTER=1: every broker of the suite is a cluster of three Millet
# nodes on one three-server NATS cluster (cluster mode, issue 13), and each
# client is given one of its nodes in turn (helpers: ``broker.pick()``), so a
# test's clients are spread over the nodes. scripts/test-cluster-suite.sh
# runs the subset that holds across nodes.
IN_CLUSTER = bool(os.environ.get("MILLET_CLUSTER"))
CLUSTER_NATS_BASE = 24920
_nats_run: list = []


def _cluster_nats_urls() -> list[str]:
    if not _nats_run:
        from test_cluster import nats_cluster_up
        _nats_run.append(nats_cluster_up(CLUSTER_NATS_BASE))
    return [f"nats://127.0.0.1:{CLUSTER_NATS_BASE + i}" for i in (1, 2, 3)]


@pytest.fixture(scope="session", autouse=True)
def _cluster_nats():
    yield
    if _nats_run:
        from test_cluster import nats_cluster_down
        nats_cluster_down(_nats_run.pop())


class ClusterBroker:
    """Three Millet nodes with the same settings, node i on NATS server i."""

    kind = "millet"
    is_mosquitto = False

    def __init__(self, settings: dict):
        self.host = HOST
        self.settings = settings
        self.nodes: list[Broker] = []
        self._next = 0

    def start(self):
        for i, url in enumerate(_cluster_nats_urls(), 1):
            b = Broker(kind="millet", host=HOST, port=free_port(), settings=self.settings,
                       args=["--nats", url, "--node-id", f"s{i}-{free_port()}", "--no-admin"])
            self.nodes.append(b)
            b.start()

    def pick(self) -> Broker:
        """The next node, in turn."""
        b = self.nodes[self._next % len(self.nodes)]
        self._next += 1
        return b

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def proc(self):
        return self.nodes[0].proc

    def alive(self) -> bool:
        return all(b.alive() for b in self.nodes)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(f"--- node {i}:\n{b.log_tail(n)}" for i, b in enumerate(self.nodes, 1))

    def stop(self):
        for b in self.nodes:
            b.stop()


def start_broker(**settings) -> Broker:
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown broker settings: {unknown}")
    if IN_CLUSTER:
        c = ClusterBroker(settings)
        try:
            c.start()
        except RuntimeError:
            c.stop()
            raise
        return c  # type: ignore[return-value]
    b = Broker(kind="mosquitto" if IS_MOSQUITTO else "millet", host=HOST, port=free_port(), settings=settings)
    last = None
    for _ in range(3):  # a free port may be grabbed between probe and bind; retry a few times
        try:
            b.start()
            return b
        except RuntimeError as e:
            last = e
            if "in use" not in str(e).lower():
                break
            b.port = free_port()
    raise last  # type: ignore[misc]


@pytest.fixture(scope="session")
def broker():
    """The shared broker under test, default settings."""
    b = start_broker()
    yield b
    b.stop()


@pytest.fixture
def broker_factory():
    """Start fresh brokers with specific settings: ``broker_factory(max_packet_size=1000)``."""
    started: list[Broker] = []

    def make(**settings) -> Broker:
        b = start_broker(**settings)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture(autouse=True)
def _broker_still_alive(request):
    """Fail loudly if a test crashed the shared broker."""
    yield
    if "broker" in request.fixturenames:
        b = request.getfixturevalue("broker")
        if not b.alive():
            pytest.fail(f"broker process died during this test:\n{b.log_tail()}")


@pytest.fixture
def uid() -> str:
    """Unique prefix for topics of one test (the shared broker keeps retained messages)."""
    return unique("conf/t")


@pytest.fixture
def clients(broker):
    """Factory for paho clients bound to the shared broker; all closed at teardown."""
    made: list = []

    def make(version=V311, target=None, **kw) -> Client:
        c = Client(target or broker, version, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def raw(broker):
    """Factory for RawClients bound to the shared broker; all closed at teardown."""
    made: list = []

    def make(version=V311, target=None, **kw) -> RawClient:
        r = RawClient(target or broker, version, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def pubsub_roundtrip(target: Broker, version=V311):
    """Check that a fresh client can connect, subscribe, publish and receive on ``target``."""
    topic = unique("conf/alive/")
    c = Client(target, version)
    try:
        c.connect()
        assert c.subscribe(topic, 1) == [1]
        c.publish(topic, b"still-alive", qos=1)
        msgs = c.messages.wait_for(1)
        assert msgs[0].payload == b"still-alive"
    finally:
        c.close()


@pytest.fixture
def assert_alive(broker):
    def check(target=None, version=V311):
        b = target or broker
        assert b.alive(), f"broker process died:\n{b.log_tail()}"
        pubsub_roundtrip(b, version)
    return check


# ---------------------------------------------------------------------------
# Millet started from a generated TOML configuration file (security tests)
# ---------------------------------------------------------------------------


@dataclass
class ConfigBroker(Broker):
    """A Millet started with ``--config FILE`` (the TOML text given), listening on
    ``listen`` (default ``host:port``) and, with ``tls_port``, on ``host:tls_port`` over TLS."""

    config_text: str = ""
    listen: str = ""
    tls_port: int | None = None
    args: list = field(default_factory=list)

    def start(self):
        self.workdir = tempfile.mkdtemp(prefix="conformance-millet-cfg-")
        self.log_path = os.path.join(self.workdir, "broker.log")
        data_dir = os.path.join(self.workdir, "data")
        os.makedirs(data_dir, exist_ok=True)
        conf = os.path.join(self.workdir, "millet.toml")
        with open(conf, "w") as f:
            f.write(self.config_text)
        cmd = [_find_millet(), "--config", conf, "--data-dir", data_dir,
               "--listen", self.listen or f"{self.host}:{self.port}"]
        if self.tls_port is not None:
            cmd += ["--tls-listen", f"{self.host}:{self.tls_port}"]
        cmd += [str(a) for a in self.args]
        if not {"--ws-listen", "--wss-listen"} & set(cmd):
            cmd += ["--no-ws"]  # no WebSocket listeners on the default ports 8083 / 8084
        self.extra["cmd"] = cmd
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        RUNNING.append(self)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode} during startup: {cmd}\n"
                                   f"{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    if self.tls_port is None:
                        return
                    with socket.create_connection((self.host, self.tls_port), timeout=0.5):
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"broker did not accept connections within {STARTUP_TIMEOUT}s: {cmd}\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def start_millet_config(config_text: str = "", tls: bool = False, listen: str | None = None,
                        args=()) -> ConfigBroker:
    """Start Millet with ``config_text`` as its TOML file (``{PORT}`` in it is replaced by the
    plain listener's port). ``listen`` may contain ``{port}``."""
    last = None
    for _ in range(3):
        port = free_port()
        text = config_text.replace("{PORT}", str(port))
        b = ConfigBroker(kind="millet", host=HOST, port=port, settings={}, config_text=text,
                         listen=(listen or "").format(port=port),
                         tls_port=free_port() if tls else None, args=list(args))
        try:
            b.start()
            return b
        except RuntimeError as e:
            last = e
            if "in use" not in str(e).lower():
                break
    raise last  # type: ignore[misc]


@pytest.fixture
def millet_config():
    """Start Millet brokers from TOML text: ``millet_config(text, tls=True)``; stopped at teardown."""
    started: list[ConfigBroker] = []

    def make(config_text: str = "", **kw) -> ConfigBroker:
        b = start_millet_config(config_text, **kw)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()
