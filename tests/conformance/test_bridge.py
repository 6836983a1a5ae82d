"""A real Mosquitto bridged to the broker under test, with Mosquitto's default bridge settings
(issue 10, item 7).

Mosquitto's bridge (``try_private true``, the default) connects with protocol level 0x84 (3.1.1
with the bridge bit 0x80) and expects bridge semantics: what it publishes is not sent back to it
(its own messages would loop) and retained messages keep their retain flag, so that it stores
them too. Mosquitto and EMQX accept it; so does Millet.

The test writes a mosquitto.conf into a temp dir and runs ``mosquitto`` (Debian package
``mosquitto``; scripts/test.sh installs it). Without it the test is skipped, or fails under CI.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import free_port
from helpers import HOST, V311, V5, Client, unique, wait_until, TIMEOUT


def _mosquitto() -> str | None:
    exe = shutil.which("mosquitto")
    if exe:
        return exe
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.path.exists(cand):
            return cand
    return None


class Edge:
    """A mosquitto process bridging ``topic`` both ways to ``remote``."""

    def __init__(self, remote, topic: str):
        exe = _mosquitto()
        if exe is None:
            if os.environ.get("CI"):
                pytest.fail("mosquitto is required in CI (apt-get install mosquitto)")
            pytest.skip("mosquitto not installed")
        self.host = HOST
        self.dir = tempfile.mkdtemp(prefix="conformance-bridge-")
        os.chmod(self.dir, 0o755)
        self.log_path = os.path.join(self.dir, "mosquitto.log")
        self.name = unique("edge")
        last = None
        for _ in range(3):  # the probed port may be taken before mosquitto binds it
            self.port = free_port()
            conf = os.path.join(self.dir, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write("\n".join([
                    "persistence false",
                    "log_dest stderr",
                    "log_type all",
                    "allow_anonymous true",
                    f"listener {self.port} {HOST}",
                    # The bridge, with Mosquitto's defaults otherwise: try_private true (level
                    # 0x84), MQTT 3.1.1, notifications on $SYS/broker/connection/<id>/state.
                    f"connection {self.name}",
                    f"address {remote.host}:{remote.port}",
                    f"remote_clientid {self.name}",
                    f"topic {topic} both 1",
                    "restart_timeout 1",
                ]) + "\n")
            os.chmod(conf, 0o644)
            log = open(self.log_path, "wb")
            self.proc = subprocess.Popen([exe, "-c", conf], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            log.close()
            try:
                self._wait_listening()
                return
            except RuntimeError as e:
                last = e
                self.stop(keep_dir=True)
        raise last  # type: ignore[misc]

    def _wait_listening(self):
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"mosquitto did not listen:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self, keep_dir=False):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def edge(broker, uid):
    e = Edge(broker, f"{uid}/#")
    yield e
    e.stop()


def _bridged(clients, broker, edge, uid):
    """Wait (with a deadline) until the bridge is up both ways: Millet holds its state "1" and a
    probe published on each side arrives on the other."""
    state = clients(V311)
    state.connect()
    state.subscribe(f"$SYS/broker/connection/{edge.name}/state", 1)
    try:
        state.messages.wait_for(1, timeout=15, pred=lambda m: m.payload == b"1")
    except AssertionError:
        raise AssertionError(f"bridge never connected; mosquitto log:\n{edge.log()}") from None
    central = clients(V5)
    central.connect()
    central.subscribe(f"{uid}/#", 1, no_local=True)
    local = clients(V311, target=edge)
    local.connect()
    local.subscribe(f"{uid}/#", 1)
    # The bridge subscribes right after its CONNACK; probe until both directions carry messages.
    n = 0

    def both_ways():
        nonlocal n
        n += 1
        central.publish(f"{uid}/probe/down", b"%d" % n, qos=1)
        local.publish(f"{uid}/probe/up", b"%d" % n, qos=1)
        got_down = any(m.topic == f"{uid}/probe/down" for m in local.messages.items)
        got_up = any(m.topic == f"{uid}/probe/up" for m in central.messages.items)
        return got_down and got_up

    wait_until(both_ways, timeout=15, interval=0.2, what="messages across the bridge both ways")
    # Let in-flight probes land, then start from empty collectors.
    central.messages.settle(0.3)
    local.messages.settle(0.3)
    central.messages.clear()
    local.messages.clear()
    return central, local


def test_mosquitto_bridge_with_default_settings(broker, clients, edge, uid):
    """A Mosquitto bridge with its default try_private (protocol level 0x84) is accepted with bridge
    semantics: messages flow both ways exactly once (no echo back to the bridge: its subscriptions
    are No Local, [MQTT-3.8.3-3]), and a retained message published on Millet's side reaches the
    edge with its retain flag (Retain As Published, [MQTT-3.3.1-12]), so the edge stores it."""
    central, local = _bridged(clients, broker, edge, uid)

    # Edge -> Millet: delivered once on each side (no copy echoed back to the edge).
    local.publish(f"{uid}/up", b"from-edge", qos=1)
    assert central.messages.wait_topic(f"{uid}/up")[0].payload == b"from-edge"
    local.messages.wait_topic(f"{uid}/up")
    local.messages.assert_no_more(1, pred=lambda m: m.topic == f"{uid}/up")  # fixed window
    central.messages.assert_no_more(1, pred=lambda m: m.topic == f"{uid}/up")

    # Millet -> edge: delivered once on each side.
    other = clients(V311)
    other.connect()
    other.publish(f"{uid}/down", b"from-central", qos=1)
    assert local.messages.wait_topic(f"{uid}/down")[0].payload == b"from-central"
    central.messages.wait_topic(f"{uid}/down")
    local.messages.assert_no_more(1, pred=lambda m: m.topic == f"{uid}/down")  # fixed window
    central.messages.assert_no_more(1, pred=lambda m: m.topic == f"{uid}/down")

    # Retained on Millet's side: the edge receives it with retain set and keeps it.
    other.publish(f"{uid}/kept", b"retained", qos=1, retain=True)
    local.messages.wait_topic(f"{uid}/kept")
    late = clients(V311, target=edge)
    late.connect()
    late.subscribe(f"{uid}/kept", 1)
    m = late.messages.wait_topic(f"{uid}/kept", timeout=TIMEOUT)[0]
    assert (m.payload, m.retain) == (b"retained", True)
    other.publish(f"{uid}/kept", b"", qos=1, retain=True)  # clean up the shared broker
