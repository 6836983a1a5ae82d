"""Parked connections (issue 11, idle memory): a connected client that has been quiet for
``limits.park_after_ms`` gives up its task and waits as a parked record. Everything a connection
does must still happen while parked: deliveries and PINGREQs wake it, the keep-alive still ends
it (with its will), a takeover and a shutdown still reach it. ``$SYS/broker/clients/parked``
shows that the clients under test really were parked (each check reads the retained value with
a fresh connection, computed before that connection existed)."""

from __future__ import annotations

import time

import pytest

from helpers import (DISCONNECT, PINGREQ_PACKET, PINGRESP, PUBLISH, V311, V5, RawClient, unique,
                     wait_until)

pytestmark = pytest.mark.millet_only("Millet's parked connections")

CONFIG = "sys_interval = 1\n[limits]\npark_after_ms = 100\ntcp_reactor = {reactor}\n"


@pytest.fixture(params=["true", "false"], ids=["event-loop", "task-per-connection"])
def park_config(request) -> str:
    """Both ways a plain-TCP connection parks: in its event loop (the default) and, with
    ``tcp_reactor = false``, by giving up its tokio task."""
    return CONFIG.format(reactor=request.param)


def parked(b) -> int:
    """The latest ``$SYS/broker/clients/parked`` (published every second, retained)."""
    r = RawClient(b, V311)
    r.connect(unique("parked-probe"))
    r.subscribe([("$SYS/broker/clients/parked", 0)])
    p = r.recv_publish(timeout=5)
    r.disconnect()
    r.close()
    return int(p.payload)


def wait_parked(b, n: int, what: str):
    wait_until(lambda: parked(b) >= n, timeout=10, interval=0.2, what=what)


def test_parked_subscriber_is_woken_by_deliveries_and_pings(millet_config, park_config):
    b = millet_config(park_config)
    topic = unique("park/")
    sub = RawClient(b, V5)
    sub.connect(unique("parked-sub"), keepalive=60)
    sub.subscribe([(topic, 1)])
    wait_parked(b, 1, "the subscriber parked")
    pub = RawClient(b, V311)
    pub.connect(unique("pub"))
    for i in range(3):
        pub.publish(topic, f"m{i}".encode(), qos=1)
        got = sub.recv_publish(timeout=5)
        assert got.payload == f"m{i}".encode()
        sub.puback(got.pid)
        # Quiet again: parked again before the next one.
        time.sleep(0.3)
    wait_parked(b, 1, "the subscriber parked again")
    # A PINGREQ wakes it through the socket.
    assert sub.send(PINGREQ_PACKET)
    assert sub.expect(PINGRESP, timeout=5, skip_pingresp=False).type == PINGRESP
    pub.disconnect()
    sub.disconnect()


def test_keep_alive_ends_a_parked_connection_and_publishes_its_will(millet_config, park_config):
    """[MQTT-3.1.2-22]: no packet within 1.5 x keep alive: the server closes the connection, and
    publishes the will [MQTT-3.1.2-8]. A parked connection has no timer of its own: the
    broker-wide sweep must wake it."""
    b = millet_config(park_config)
    # keep alive 3 s: deadline 4.5 s, far enough to park (the watcher parks too).
    elapsed = silent_client_closes(b, lambda: wait_parked(b, 2, "the quiet client parked"))
    assert 4.4 <= elapsed <= 6.5, f"closed after {elapsed:.2f} s, expected about 4.5 s"
    assert "keep alive" in b.log_text().lower()


def silent_client_closes(b, meanwhile=lambda: None) -> float:
    """A client with keep alive 3 s and a will that sends nothing after CONNECT: how many
    seconds after its CONNECT the broker closed it, once a watcher got its will."""
    will_topic = unique("ka-will/")
    watcher = RawClient(b, V311)
    watcher.connect(unique("watcher"), keepalive=60)
    watcher.subscribe([(will_topic, 0)])
    quiet = RawClient(b, V311, timeout=15)
    started = time.monotonic()
    quiet.connect(unique("quiet"), keepalive=3, will={"topic": will_topic, "payload": b"gone"})
    meanwhile()
    quiet.wait_closed(timeout=10)
    elapsed = time.monotonic() - started
    w = watcher.recv_publish(timeout=5)
    assert w.topic == will_topic and w.payload == b"gone"
    return elapsed


@pytest.mark.parametrize("reactor", ["true", "false"], ids=["event-loop", "task-per-connection"])
def test_keep_alive_ends_a_connection_that_never_parks(millet_config, reactor):
    """[MQTT-3.1.2-22] for a connection that is not parked: parking is off (an hour), so the
    connection keeps its task. In an event loop its keep-alive, 4.5 s away, is left to the
    loop's sweep rather than to a timer of its own (`Plan::split`); with a task per connection
    it is a timer. Either way the connection closes between 1 and 1.5 x keep alive (plus the
    0.75 s the strict keep-alive test allows, as the sweep may be that late), with its will."""
    b = millet_config(f"[limits]\npark_after_ms = 3600000\ntcp_reactor = {reactor}\n")
    elapsed = silent_client_closes(b)
    assert 3.0 <= elapsed <= 4.5 + 0.75, f"closed after {elapsed:.2f} s, expected 4.5 s"


def test_takeover_and_shutdown_reach_parked_connections(millet_config, park_config):
    b = millet_config(park_config)
    cid = unique("taken")
    old = RawClient(b, V5)
    old.connect(cid, keepalive=60)
    other = RawClient(b, V5)
    other.connect(unique("other"), keepalive=60)
    wait_parked(b, 2, "both clients parked")
    # [MQTT-3.1.4-3]: a new connection with the same client id: the old one gets DISCONNECT
    # 0x8E (session taken over) and is closed.
    new = RawClient(b, V5)
    new.connect(cid, keepalive=60)
    seen = old.wait_closed(timeout=5)
    assert [p.disconnect()[0] for p in seen if p.type == DISCONNECT] == [0x8E], seen
    wait_parked(b, 2, "the new connection and the other client parked")
    # Shutdown: every v5 client gets DISCONNECT 0x8B (server shutting down), parked or not.
    b.proc.terminate()
    for c in (new, other):
        seen = c.wait_closed(timeout=10)
        assert [p.disconnect()[0] for p in seen if p.type == DISCONNECT] == [0x8B], seen
    assert b.proc.wait(timeout=10) == 0
