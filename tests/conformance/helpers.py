"""Helpers for the Millet black-box MQTT conformance suite.

Two kinds of clients are provided:

* ``Client``: a thin, synchronous wrapper around a ``paho-mqtt`` 2.x client
  (MQTT 3.1, 3.1.1 or 5.0). Every wait is on a ``threading.Condition`` with a
  deadline; nothing sleeps and hopes.
* ``RawClient``: a hand-rolled MQTT codec over a plain TCP socket, used for
  malformed input and for precise wire-level checks (DUP flags, packet
  identifiers, exact reason codes, flow control).

Negative checks ("nothing arrives") necessarily wait a short, fixed window
(``NEGATIVE_WINDOW``); they are the only fixed waits in the suite.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST = "127.0.0.1"

# Default deadline for anything that should happen "immediately".
TIMEOUT = float(os.environ.get("CONFORMANCE_TIMEOUT", "5"))
# Fixed window used only for negative checks ("nothing else arrives").
NEGATIVE_WINDOW = 0.5

V31, V311, V5 = "3.1", "3.1.1", "5"
PAHO_PROTOCOL = {V31: mqtt.MQTTv31, V311: mqtt.MQTTv311, V5: mqtt.MQTTv5}
PROTOCOL_LEVEL = {V31: 3, V311: 4, V5: 5}

_ids = itertools.count(1)


def unique(prefix: str = "c") -> str:
    """A short identifier unique within this process (usable as client id)."""
    return f"{prefix}{next(_ids)}-{uuid.uuid4().hex[:8]}"


def wait_until(predicate, timeout: float = TIMEOUT, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it is truthy or the deadline passes (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# Message collector
# ---------------------------------------------------------------------------


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False
    props: dict = field(default_factory=dict)
    mid: int = 0
    received_at: float = 0.0

    def prop(self, name, default=None):
        return self.props.get(name, default)


def paho_props_to_dict(props: Properties | None) -> dict:
    """Convert a paho Properties object into {PropertyName: value}."""
    out: dict = {}
    if props is None:
        return out
    for name in props.names.keys():
        attr = name.replace(" ", "")
        if hasattr(props, attr):
            out[attr] = getattr(props, attr)
    return out


class Collector:
    """Thread-safe list of received messages with deadline-based waits."""

    def __init__(self):
        self._cond = threading.Condition()
        self._items: list = []

    def add(self, item):
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    @property
    def items(self) -> list:
        with self._cond:
            return list(self._items)

    def __len__(self):
        with self._cond:
            return len(self._items)

    def clear(self):
        with self._cond:
            self._items.clear()

    def wait_for(self, n: int = 1, timeout: float = TIMEOUT, pred=None) -> list:
        """Wait until at least ``n`` items (matching ``pred`` if given) arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matching = [m for m in self._items if pred is None or pred(m)]
                if len(matching) >= n:
                    return matching
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"expected at least {n} message(s) within {timeout}s, got {len(matching)}: "
                        f"{_summary(self._items)}"
                    )
                self._cond.wait(remaining)

    def wait_topic(self, topic: str, n: int = 1, timeout: float = TIMEOUT) -> list:
        return self.wait_for(n, timeout, pred=lambda m: m.topic == topic)

    def settle(self, window: float = NEGATIVE_WINDOW) -> list:
        """Fixed-window wait for checks where an arrival is optional; returns what arrived."""
        deadline = time.monotonic() + window
        with self._cond:
            while (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            return list(self._items)

    def assert_no_more(self, expected: int, window: float = NEGATIVE_WINDOW, pred=None) -> list:
        """Negative check: after a short fixed window, exactly ``expected`` items."""
        deadline = time.monotonic() + window
        with self._cond:
            while True:
                matching = [m for m in self._items if pred is None or pred(m)]
                if len(matching) > expected:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            matching = [m for m in self._items if pred is None or pred(m)]
            assert len(matching) == expected, (
                f"expected exactly {expected} message(s), got {len(matching)}: {_summary(matching)}"
            )
            return matching


def _summary(items) -> str:
    out = []
    for m in items[:20]:
        if isinstance(m, Msg):
            out.append(f"({m.topic!r}, {m.payload[:40]!r}, qos={m.qos}, retain={int(m.retain)})")
        else:
            out.append(repr(m))
    if len(items) > 20:
        out.append(f"... {len(items) - 20} more")
    return "[" + ", ".join(out) + "]"


# ---------------------------------------------------------------------------
# paho wrapper
# ---------------------------------------------------------------------------


@dataclass
class Connack:
    rc: int
    session_present: bool
    props: dict


# The conformance subset against a cluster (MILLET_CLUSTER=1; conftest's
# CLUSTER_NATS_BASE): NATS servers' monitoring ports.
CLUSTER_NATS_MONITOR = [24920 + 20 + i for i in (1, 2, 3)]
_PLAIN_LEVEL = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def cluster_interest_settled(broker, filters, timeout: float = TIMEOUT) -> None:
    """In the cluster subset, after a SUBACK: wait until every NATS server
    of the cluster has the node's interest in `filters`. A node's SUBACK
    waits for its own NATS server only; the others learn of it
    asynchronously (docs/CLUSTER.md), and a message published through one
    of them meanwhile would miss the new subscriber: a race of the test's,
    not a failure of the broker's. Filters whose subjects this does not
    spell (escaped levels, shared, `$`) are not waited for."""
    if not os.environ.get("MILLET_CLUSTER") or "--nats" not in (getattr(broker, "args", None) or []):
        return  # not a node of the subset's cluster
    import json
    import urllib.request

    want = set()
    for f in filters:
        levels = f.split("/")
        if f.startswith("$") or not all(
                lv in ("+", "#") or (lv and set(lv) <= _PLAIN_LEVEL) for lv in levels):
            continue
        toks = ["*" if lv == "+" else ">" if lv == "#" else lv for lv in levels]
        want.add("m.*." + ".".join(toks))
    if not want:
        return

    def known(port):
        subs = set()
        for path, key in (("routez", "routes"), ("connz", "connections")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}?subs=1", timeout=5) as r:
                for c in json.load(r).get(key) or []:
                    subs |= set(c.get("subscriptions_list") or [])
        return want <= subs

    deadline = time.monotonic() + timeout
    pending = list(CLUSTER_NATS_MONITOR)
    while pending:
        pending = [p for p in pending if not known(p)]
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"NATS servers {pending} never learnt of the interest in {sorted(want)}")
        if pending:
            time.sleep(0.005)


def raw_reached(pub, sub, topic: str, timeout: float = 10) -> None:
    """Publish QoS 0 probes (payload ``b"probe"``) on `topic` from the paho
    client `pub` until the RawClient `sub` gets one: in a cluster, NATS
    propagates a subscription to its other servers asynchronously, after
    the SUBACK. QoS 0 is never stored, so a catch-up never brings a probe
    back; probes still on their way land in the next 0.2 s, and callers
    skip them by payload."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"{topic}: no probe reached the subscriber in {timeout} s"
        pub.publish(topic, b"probe", qos=0)
        try:
            if sub.expect(PUBLISH, timeout=0.2).publish().payload == b"probe":
                break
        except AssertionError:
            pass
    time.sleep(0.2)


class Client:
    """Synchronous wrapper over a paho-mqtt 2.x client."""

    def __init__(self, broker, version: str = V311, client_id: str | None = None,
                 clean_session: bool = True, manual_ack: bool = False):
        # A cluster (MILLET_CLUSTER=1) gives each client one of its nodes, in turn.
        self.broker = broker = broker.pick() if hasattr(broker, "pick") else broker
        self.version = version
        self.client_id = unique("p") if client_id is None else client_id
        kw: dict[str, Any] = {}
        if version != V5:
            kw["clean_session"] = clean_session
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=PAHO_PROTOCOL[version],
            reconnect_on_failure=False,
            manual_ack=manual_ack,
            **kw,
        )
        self.messages = Collector()
        self._cond = threading.Condition()
        self._connack: Connack | None = None
        self._subacks: dict[int, list] = {}
        self._unsubacks: dict[int, list] = {}
        self._published: dict[int, int] = {}
        self._disconnect: tuple | None = None
        self._loop_started = False
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message

    # -- callbacks (paho network thread) --
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self._connack = Connack(int(reason_code.value), bool(flags.session_present),
                                    paho_props_to_dict(properties))
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks[mid] = [int(rc.value) for rc in reason_codes]
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._unsubacks[mid] = [int(rc.value) for rc in reason_codes]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._published[mid] = int(reason_code.value)
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self._disconnect = (int(reason_code.value), paho_props_to_dict(properties))
            self._cond.notify_all()

    def _on_message(self, client, userdata, message):
        self.messages.add(Msg(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            dup=bool(message.dup),
            props=paho_props_to_dict(getattr(message, "properties", None)),
            mid=message.mid,
            received_at=time.monotonic(),
        ))

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                v = pred()
                if v is not None and v is not False:
                    return v
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.client_id}: timed out after {timeout}s waiting for {what}")
                self._cond.wait(remaining)

    # -- API --
    def connect(self, keepalive: int = 60, clean_start: bool = True, properties: Properties | None = None,
                will: dict | None = None, username: str | None = None, password=None,
                timeout: float = TIMEOUT, expect_rc: int | None = 0) -> Connack:
        if will is not None:
            self.c.will_set(will["topic"], will.get("payload", b""), will.get("qos", 0),
                            will.get("retain", False), will.get("properties"))
        if username is not None or password is not None:
            self.c.username_pw_set(username, password)
        kw: dict[str, Any] = {}
        if self.version == V5:
            kw["clean_start"] = clean_start
            kw["properties"] = properties
        self._connack = None
        self._disconnect = None
        self.c.connect(self.broker.host, self.broker.port, keepalive, **kw)
        if not self._loop_started:
            self.c.loop_start()
            self._loop_started = True
        ack = self._wait(lambda: self._connack, timeout, "CONNACK")
        if expect_rc is not None:
            assert ack.rc == expect_rc, f"CONNACK reason code {ack.rc:#x}, expected {expect_rc:#x}"
        return ack

    def subscribe(self, topic: str, qos: int = 0, options: SubscribeOptions | None = None,
                  properties: Properties | None = None, timeout: float = TIMEOUT,
                  no_local: bool = False, retain_as_published: bool = False,
                  retain_handling: int = 0) -> list[int]:
        if self.version == V5:
            if options is None:
                options = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=retain_as_published,
                                           retainHandling=retain_handling)
            result, mid = self.c.subscribe(topic, options=options, properties=properties)
        else:
            result, mid = self.c.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {result}"
        codes = self._wait(lambda: self._subacks.get(mid), timeout, f"SUBACK for {topic!r}")
        if all(c < 0x80 for c in codes):
            cluster_interest_settled(self.broker, [topic])
        return codes

    def unsubscribe(self, topic, properties: Properties | None = None, timeout: float = TIMEOUT) -> list[int]:
        if self.version == V5:
            result, mid = self.c.unsubscribe(topic, properties=properties)
        else:
            result, mid = self.c.unsubscribe(topic)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe failed locally: {result}"
        return self._wait(lambda: self._unsubacks.get(mid), timeout, "UNSUBACK")

    def publish(self, topic: str, payload=b"", qos: int = 0, retain: bool = False,
                properties: Properties | None = None, timeout: float = TIMEOUT, wait: bool = True) -> int:
        """Publish; for QoS>0 wait until the handshake completed. Returns the ack reason code."""
        info = self.c.publish(topic, payload, qos, retain, properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed locally: {info.rc}"
        if not wait:
            return 0
        return self._wait(lambda: self._published.get(info.mid), timeout, f"publish completion on {topic!r}")

    def disconnect(self, reasoncode=None, properties: Properties | None = None, timeout: float = TIMEOUT):
        if self.version == V5 and (reasoncode is not None or properties is not None):
            from paho.mqtt.reasoncodes import ReasonCode
            rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reasoncode or 0)
            self.c.disconnect(rc, properties)
        else:
            self.c.disconnect()
        try:
            self._wait(lambda: self._disconnect, timeout, "disconnect")
        finally:
            self.stop()

    def wait_disconnected(self, timeout: float = TIMEOUT) -> tuple:
        """Wait for a server-initiated disconnection; returns (reason code, props)."""
        return self._wait(lambda: self._disconnect, timeout, "server-side disconnection")

    @property
    def is_connected(self) -> bool:
        return self.c.is_connected()

    def stop(self):
        if self._loop_started:
            self.c.loop_stop()
            self._loop_started = False

    def close(self):
        """Best-effort teardown (used by fixtures)."""
        try:
            if self.c.is_connected():
                self.c.disconnect()
        except Exception:
            pass
        self.stop()
        try:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
        except Exception:
            pass


def session_client(factory, version: str, client_id: str, clean: bool = False, expiry: int = 300,
                   **connect_kw) -> tuple[Client, Connack]:
    """Connect a paho client with a persistent (clean=False) or clean session.
    For MQTT 5 a non-clean session gets Session Expiry Interval ``expiry``."""
    c = factory(version, client_id=client_id, clean_session=clean)
    if version == V5:
        p = connect_kw.pop("properties", None) or Properties(PacketTypes.CONNECT)
        if expiry:
            p.SessionExpiryInterval = expiry
        ack = c.connect(clean_start=clean, properties=p, **connect_kw)
    else:
        ack = c.connect(**connect_kw)
    return c, ack


def props(packet_type, **kw) -> Properties:
    """Build paho Properties, e.g. props(PacketTypes.PUBLISH, MessageExpiryInterval=5)."""
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


# ---------------------------------------------------------------------------
# Raw wire codec
# ---------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
PACKET_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
                7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
                12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH", 0: "RESERVED0"}

# MQTT 5 property identifiers
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_CONTENT_TYPE = 0x03
P_RESPONSE_TOPIC = 0x08
P_CORRELATION_DATA = 0x09
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_SERVER_KEEP_ALIVE = 0x13
P_AUTH_METHOD = 0x15
P_AUTH_DATA = 0x16
P_REQUEST_PROBLEM_INFO = 0x17
P_WILL_DELAY = 0x18
P_REQUEST_RESPONSE_INFO = 0x19
P_RESPONSE_INFO = 0x1A
P_SERVER_REFERENCE = 0x1C
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_QOS = 0x24
P_RETAIN_AVAILABLE = 0x25
P_USER_PROPERTY = 0x26
P_MAXIMUM_PACKET_SIZE = 0x27
P_WILDCARD_SUB_AVAILABLE = 0x28
P_SUB_ID_AVAILABLE = 0x29
P_SHARED_SUB_AVAILABLE = 0x2A

PROP_TYPES = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint",
    0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "byte",
    0x18: "u32", 0x19: "byte", 0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16",
    0x22: "u16", 0x23: "u16", 0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "u32",
    0x28: "byte", 0x29: "byte", 0x2A: "byte",
}
MULTI_PROPS = {P_USER_PROPERTY, P_SUBSCRIPTION_ID}


def enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def enc_str(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


enc_bin = enc_str


def enc_props(properties: Iterable | dict | None) -> bytes:
    """Encode a property list. Accepts a dict {id: value} or a list of (id, value);
    a list allows duplicates (for malformed tests). Values for id 0x26 are (k, v)."""
    if properties is None:
        return enc_varint(0)
    items = list(properties.items()) if isinstance(properties, dict) else list(properties)
    out = bytearray()
    for pid, value in items:
        if isinstance(value, list) and pid in MULTI_PROPS and isinstance(properties, dict):
            vals = value
        else:
            vals = [value]
        for v in vals:
            out += enc_varint(pid)
            t = PROP_TYPES.get(pid, "raw")
            if t == "byte":
                out += bytes([v])
            elif t == "u16":
                out += struct.pack("!H", v)
            elif t == "u32":
                out += struct.pack("!I", v)
            elif t == "varint":
                out += enc_varint(v)
            elif t in ("str", "bin"):
                out += enc_str(v)
            elif t == "pair":
                out += enc_str(v[0]) + enc_str(v[1])
            else:  # unknown id: raw bytes
                out += bytes(v)
    return enc_varint(len(out)) + bytes(out)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | (flags & 0x0F)]) + enc_varint(len(body)) + body


def connect_packet(version=V311, client_id="", clean=True, keepalive=60, will=None,
                   username=None, password=None, properties=None, reserved_flag=False,
                   protocol_name=None, protocol_level=None, extra_flags=0) -> bytes:
    """Encode a CONNECT. ``will`` is a dict(topic, payload, qos, retain, properties)."""
    level = PROTOCOL_LEVEL[version] if protocol_level is None else protocol_level
    name = protocol_name if protocol_name is not None else ("MQIsdp" if version == V31 else "MQTT")
    flags = extra_flags
    if clean:
        flags |= 0x02
    if will is not None:
        flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    if reserved_flag:
        flags |= 0x01
    body = enc_str(name) + bytes([level, flags]) + struct.pack("!H", keepalive)
    if version == V5:
        body += enc_props(properties)
    body += enc_str(client_id)
    if will is not None:
        if version == V5:
            body += enc_props(will.get("properties"))
        body += enc_str(will["topic"]) + enc_bin(will.get("payload", b""))
    if username is not None:
        body += enc_str(username)
    if password is not None:
        body += enc_bin(password)
    return packet(CONNECT, 0, body)


def publish_packet(topic, payload=b"", qos=0, retain=False, dup=False, pid=None, version=V311,
                   properties=None, flags=None) -> bytes:
    if flags is None:
        flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = enc_str(topic)
    if (flags >> 1) & 0x03:
        body += struct.pack("!H", 1 if pid is None else pid)
    if version == V5:
        body += enc_props(properties)
    body += bytes(payload) if not isinstance(payload, str) else payload.encode()
    return packet(PUBLISH, flags, body)


def ack_packet(ptype: int, pid: int, rc: int | None = None, version=V311, properties=None) -> bytes:
    flags = 0x02 if ptype == PUBREL else 0
    body = struct.pack("!H", pid)
    if version == V5 and (rc is not None or properties is not None):
        body += bytes([rc or 0])
        if properties is not None:
            body += enc_props(properties)
    return packet(ptype, flags, body)


def subscribe_packet(pid: int, filters, version=V311, properties=None, flags=0x02) -> bytes:
    """``filters``: list of (topic_filter, options_byte)."""
    body = struct.pack("!H", pid)
    if version == V5:
        body += enc_props(properties)
    for f, opts in filters:
        body += enc_str(f) + bytes([opts])
    return packet(SUBSCRIBE, flags, body)


def sub_opts(qos=0, no_local=False, rap=False, rh=0) -> int:
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (rh << 4)


def unsubscribe_packet(pid: int, filters, version=V311, properties=None, flags=0x02) -> bytes:
    body = struct.pack("!H", pid)
    if version == V5:
        body += enc_props(properties)
    for f in filters:
        body += enc_str(f)
    return packet(UNSUBSCRIBE, flags, body)


def disconnect_packet(version=V311, rc=None, properties=None) -> bytes:
    body = b""
    if version == V5 and (rc is not None or properties is not None):
        body = bytes([rc or 0])
        if properties is not None:
            body += enc_props(properties)
    return packet(DISCONNECT, 0, body)


PINGREQ_PACKET = bytes([0xC0, 0x00])


class _Reader:
    def __init__(self, data: bytes):
        self.d = data
        self.i = 0

    def remaining(self) -> int:
        return len(self.d) - self.i

    def byte(self) -> int:
        v = self.d[self.i]
        self.i += 1
        return v

    def u16(self) -> int:
        v = struct.unpack_from("!H", self.d, self.i)[0]
        self.i += 2
        return v

    def u32(self) -> int:
        v = struct.unpack_from("!I", self.d, self.i)[0]
        self.i += 4
        return v

    def varint(self) -> int:
        mult, val = 1, 0
        for _ in range(4):
            b = self.byte()
            val += (b & 0x7F) * mult
            if not b & 0x80:
                return val
            mult *= 128
        raise ValueError("malformed variable byte integer from server")

    def bin(self) -> bytes:
        n = self.u16()
        v = self.d[self.i:self.i + n]
        if len(v) != n:
            raise ValueError("truncated string from server")
        self.i += n
        return bytes(v)

    def str(self) -> str:
        return self.bin().decode("utf-8")

    def rest(self) -> bytes:
        v = self.d[self.i:]
        self.i = len(self.d)
        return bytes(v)

    def props(self) -> dict:
        """Decode a property block into {id: value}; 0x26 and 0x0B become lists.
        Raises on duplicates of single-valued properties (server protocol error)."""
        n = self.varint()
        end = self.i + n
        out: dict = {}
        while self.i < end:
            pid = self.varint()
            t = PROP_TYPES.get(pid)
            if t is None:
                raise ValueError(f"server sent unknown property {pid:#x}")
            if t == "byte":
                v = self.byte()
            elif t == "u16":
                v = self.u16()
            elif t == "u32":
                v = self.u32()
            elif t == "varint":
                v = self.varint()
            elif t == "str":
                v = self.str()
            elif t == "bin":
                v = self.bin()
            else:
                v = (self.str(), self.str())
            if pid in MULTI_PROPS:
                out.setdefault(pid, []).append(v)
            else:
                if pid in out:
                    raise ValueError(f"server sent property {pid:#x} twice")
                out[pid] = v
        if self.i != end:
            raise ValueError("property length mismatch from server")
        return out


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes
    version: str = V311

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.type, str(self.type))

    def __repr__(self):
        return f"<{self.name} flags={self.flags:#x} body={self.body[:60]!r}>"

    # --- decoders ---
    def connack(self) -> Connack:
        assert self.type == CONNACK, f"expected CONNACK, got {self!r}"
        r = _Reader(self.body)
        ack_flags = r.byte()
        rc = r.byte()
        p = r.props() if self.version == V5 and r.remaining() else {}
        return Connack(rc, bool(ack_flags & 1), p)

    def publish(self) -> "RawPublish":
        assert self.type == PUBLISH, f"expected PUBLISH, got {self!r}"
        r = _Reader(self.body)
        qos = (self.flags >> 1) & 3
        topic = r.str()
        pid = r.u16() if qos else None
        p = r.props() if self.version == V5 else {}
        return RawPublish(topic, r.rest(), qos, bool(self.flags & 1), bool(self.flags & 8), pid, p)

    def ack(self) -> tuple[int, int, dict]:
        """PUBACK/PUBREC/PUBREL/PUBCOMP -> (packet id, reason code, props)."""
        r = _Reader(self.body)
        pid = r.u16()
        rc = r.byte() if r.remaining() else 0
        p = r.props() if r.remaining() else {}
        return pid, rc, p

    def suback(self) -> tuple[int, list[int], dict]:
        r = _Reader(self.body)
        pid = r.u16()
        p = r.props() if self.version == V5 else {}
        return pid, list(r.rest()), p

    unsuback = suback

    def disconnect(self) -> tuple[int, dict]:
        r = _Reader(self.body)
        rc = r.byte() if r.remaining() else 0
        p = r.props() if r.remaining() else {}
        return rc, p


@dataclass
class RawPublish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    pid: int | None
    props: dict


class ConnectionClosed(Exception):
    pass


class RawClient:
    """Minimal hand-encoded MQTT client over a blocking TCP socket."""

    def __init__(self, broker, version: str = V311, timeout: float = TIMEOUT):
        # A cluster (MILLET_CLUSTER=1) gives each client one of its nodes, in turn.
        self.broker = broker = broker.pick() if hasattr(broker, "pick") else broker
        self.version = version
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.closed = False
        self._pid = itertools.count(1)
        self.pending: list[Packet] = []

    def next_pid(self) -> int:
        return next(self._pid) % 65535 + 1

    # -- io --
    def send(self, data: bytes) -> bool:
        """Send bytes; returns False if the connection is already closed."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            self.closed = True
            return False

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True

    def _try_parse(self) -> Packet | None:
        if len(self.buf) < 2:
            return None
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            i += 1
            if not b & 0x80:
                break
            mult *= 128
            if i > 4:
                raise ValueError("server sent a malformed remaining length")
        if len(self.buf) < i + length:
            return None
        first = self.buf[0]
        body = bytes(self.buf[i:i + length])
        del self.buf[:i + length]
        return Packet(first >> 4, first & 0x0F, body, self.version)

    def recv(self, timeout: float = TIMEOUT) -> Packet | None:
        """Next packet, or None if the connection was closed. Raises TimeoutError."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            p = self._try_parse()
            if p is not None:
                return p
            if self.closed:
                return None
            if not self._fill(deadline):
                p = self._try_parse()
                return p

    def expect(self, ptype: int, timeout: float = TIMEOUT, skip_pingresp: bool = True,
               stash: bool = False) -> Packet:
        """Wait for a packet of type ``ptype``. With ``stash``, other PUBLISH/PUBREL packets that
        arrive first are kept (in order) for later ``recv`` calls instead of failing."""
        deadline = time.monotonic() + timeout
        deferred: list[Packet] = []
        try:
            while True:
                try:
                    p = self._recv_wire(max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {PACKET_NAMES[ptype]}") from None
                if p is None:
                    raise AssertionError(f"connection closed while waiting for {PACKET_NAMES[ptype]}")
                if skip_pingresp and p.type == PINGRESP and ptype != PINGRESP:
                    continue
                if p.type != ptype and stash and p.type in (PUBLISH, PUBREL):
                    deferred.append(p)
                    continue
                assert p.type == ptype, f"expected {PACKET_NAMES[ptype]}, got {p!r}"
                return p
        finally:
            self.pending[:0] = deferred

    def _recv_wire(self, timeout: float) -> Packet | None:
        if self.pending:
            return self.pending.pop(0)
        return self.recv(timeout)

    def wait_closed(self, timeout: float = TIMEOUT) -> list[Packet]:
        """Read until the server closes the connection; returns packets seen before close."""
        seen: list[Packet] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                p = self.recv(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(
                    f"connection still open after {timeout}s (received before: {seen!r})") from None
            except ValueError:
                # garbage from server; treat as protocol failure
                raise
            if p is None:
                return seen
            seen.append(p)

    def assert_silent(self, window: float = NEGATIVE_WINDOW):
        """Negative check: no packet arrives and the connection stays open for a fixed window."""
        try:
            p = self.recv(window)
        except TimeoutError:
            return
        raise AssertionError(f"expected silence, got {p!r}" if p else "connection closed unexpectedly")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def abort(self):
        """Close abruptly (RST) without DISCONNECT."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    # -- high level --
    def connect(self, client_id: str | None = None, clean: bool = True, keepalive: int = 60,
                expect_rc: int | None = 0, timeout: float = TIMEOUT, **kw) -> Connack:
        if client_id is None:
            client_id = unique("r")
        self.client_id = client_id
        self.send(connect_packet(self.version, client_id, clean, keepalive, **kw))
        ack = self.expect(CONNACK, timeout).connack()
        if expect_rc is not None:
            assert ack.rc == expect_rc, f"CONNACK rc {ack.rc:#x}, expected {expect_rc:#x}"
        return ack

    def publish(self, topic, payload=b"", qos=0, retain=False, dup=False, pid=None, properties=None,
                wait_ack: bool = True) -> int | None:
        if qos and pid is None:
            pid = self.next_pid()
        self.send(publish_packet(topic, payload, qos, retain, dup, pid, self.version, properties))
        if qos == 1 and wait_ack:
            got = self.expect(PUBACK, stash=True).ack()
            assert got[0] == pid, f"PUBACK for packet id {got[0]}, expected {pid}"
        elif qos == 2 and wait_ack:
            got = self.expect(PUBREC, stash=True).ack()
            assert got[0] == pid, f"PUBREC for packet id {got[0]}, expected {pid}"
            self.send(ack_packet(PUBREL, pid, version=self.version))
            got = self.expect(PUBCOMP, stash=True).ack()
            assert got[0] == pid, f"PUBCOMP for packet id {got[0]}, expected {pid}"
        return pid

    def subscribe(self, filters, properties=None, pid=None) -> list[int]:
        """``filters``: list of (filter, options_byte) or a single filter string (QoS 0)."""
        if isinstance(filters, str):
            filters = [(filters, 0)]
        pid = pid or self.next_pid()
        self.send(subscribe_packet(pid, filters, self.version, properties))
        got_pid, codes, _ = self.expect(SUBACK, stash=True).suback()
        assert got_pid == pid, f"SUBACK packet id {got_pid}, expected {pid}"
        cluster_interest_settled(self.broker, [f for (f, _), c in zip(filters, codes) if c < 0x80])
        return codes

    def unsubscribe(self, filters, properties=None, pid=None) -> list[int]:
        if isinstance(filters, str):
            filters = [filters]
        pid = pid or self.next_pid()
        self.send(unsubscribe_packet(pid, filters, self.version, properties))
        got_pid, codes, _ = self.expect(UNSUBACK, stash=True).unsuback()
        assert got_pid == pid, f"UNSUBACK packet id {got_pid}, expected {pid}"
        return codes

    def recv_publish(self, timeout: float = TIMEOUT) -> RawPublish:
        return self.expect(PUBLISH, timeout).publish()

    def puback(self, pid, rc=None, properties=None):
        self.send(ack_packet(PUBACK, pid, rc, self.version, properties))

    def disconnect(self, rc=None, properties=None):
        self.send(disconnect_packet(self.version, rc, properties))
