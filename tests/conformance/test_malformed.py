"""Malformed packets and protocol errors, sent with RawClient.

Expected reactions:

* MQTT 3.1.1: [MQTT-4.8.0-1] on a protocol violation the server MUST close the network connection.
  3.1.1 defines no server DISCONNECT, so the expectation is "closed without any response" (except
  where a CONNACK return code is mandated, e.g. unsupported protocol level [MQTT-3.1.2-2]).
* MQTT 5.0: 4.13.1 the server MUST close the network connection. For an error in CONNECT it MAY
  first send CONNACK with a reason code >= 0x80; for any other packet it SHOULD first send
  DISCONNECT with the reason code. So the spec mandates only the close: both "DISCONNECT (with one
  of the listed reason codes) then close" and a bare close are accepted; a DISCONNECT or CONNACK
  with any other reason code fails the test.

After every case the broker must still serve other clients (fresh client connect + pub/sub).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Callable

import pytest

from helpers import (
    AUTH, CONNACK, CONNECT, DISCONNECT, PINGREQ, PUBLISH, PUBREL, SUBSCRIBE, UNSUBSCRIBE, V311, V5,
    RawClient, connect_packet, enc_props, enc_str, enc_varint, packet, publish_packet, sub_opts,
    subscribe_packet, unique, unsubscribe_packet,
    P_AUTH_METHOD, P_MAXIMUM_PACKET_SIZE, P_PAYLOAD_FORMAT, P_RECEIVE_MAXIMUM, P_SESSION_EXPIRY,
    P_SUBSCRIPTION_ID, P_TOPIC_ALIAS,
)
from conftest import pubsub_roundtrip

BOTH = (V311, V5)
MALFORMED = {0x81}
PROTOCOL = {0x82}
MALFORMED_OR_PROTOCOL = {0x81, 0x82}


@dataclass
class Case:
    id: str
    ref: str  # normative statement(s) checked
    build: Callable[[str, str], bytes]  # (version, topic prefix) -> bytes sent
    versions: tuple = BOTH
    v5_codes: set = field(default_factory=lambda: set(MALFORMED))
    connect_first: bool = True  # CONNECT (valid) before sending the bad bytes
    connect_phase: bool = False  # the bad bytes are (in) the CONNECT itself
    v3_connack: set | None = None  # 3.1.1: a CONNACK with one of these codes is required before close
    settings: dict | None = None  # fresh broker with these settings
    millet_only: str | None = None
    v3_refusal_ok: bool = False  # 3.1.1: a CONNACK with a non-zero return code is also acceptable


def pub_v(topic, payload=b"x", qos=0, pid=None, props=None, flags=None):
    return lambda v, p: publish_packet(topic(p) if callable(topic) else topic, payload, qos=qos, pid=pid,
                                       version=v, properties=props, flags=flags)


def raw_publish_body(v, topic_bytes: bytes, props_bytes: bytes = b"\x00", payload=b"x", qos=0, pid=1):
    body = struct.pack("!H", len(topic_bytes)) + topic_bytes
    if qos:
        body += struct.pack("!H", pid)
    if v == V5:
        body += props_bytes
    return packet(PUBLISH, qos << 1, body + payload)


def connect_raw(v, flags: int, payload: bytes, props=b"\x00", name="MQTT", level=None):
    level = level if level is not None else (5 if v == V5 else 4)
    body = enc_str(name) + bytes([level, flags]) + struct.pack("!H", 60)
    if v == V5:
        body += props
    return packet(CONNECT, 0, body + payload)


CASES = [
    # --- fixed header / remaining length ---
    Case("remaining-length-5-bytes", "[MQTT-1.5.5-1]/2.2.3 Remaining Length is at most 4 bytes",
         lambda v, p: b"\x30\xff\xff\xff\xff\x01"),
    Case("remaining-length-5-bytes-before-connect", "2.2.3 / [MQTT-3.1.0-1]",
         lambda v, p: b"\x10\xff\xff\xff\xff\x01", versions=(V311,), connect_first=False),
    Case("subscribe-flags-0", "[MQTT-3.8.1-1] SUBSCRIBE fixed header flags MUST be 0010",
         lambda v, p: subscribe_packet(1, [(f"{p}/a", 0)], v, flags=0x00)),
    Case("unsubscribe-flags-0", "[MQTT-3.10.1-1] UNSUBSCRIBE fixed header flags MUST be 0010",
         lambda v, p: unsubscribe_packet(1, [f"{p}/a"], v, flags=0x00)),
    Case("pubrel-flags-0", "[MQTT-3.6.1-1] PUBREL fixed header flags MUST be 0010",
         lambda v, p: packet(PUBREL, 0x00, b"\x00\x01")),
    Case("pingreq-flags-1", "[MQTT-2.2.2-2] invalid fixed header flags -> close (5.0 2.1.3 malformed)",
         lambda v, p: packet(PINGREQ, 0x01, b""),
         millet_only="mosquitto 2.0 ignores PINGREQ flags and answers PINGRESP"),
    Case("disconnect-flags-1", "[MQTT-3.14.1-1] DISCONNECT reserved flags MUST be 0",
         lambda v, p: packet(DISCONNECT, 0x01, b"")),
    Case("reserved-packet-type-0", "2.2.1 packet type 0 is reserved/forbidden; [MQTT-4.8.0-1]",
         lambda v, p: packet(0, 0, b""), v5_codes=MALFORMED_OR_PROTOCOL),
    Case("packet-type-15-in-v311", "2.2.1 (3.1.1) packet type 15 is reserved; [MQTT-4.8.0-1]",
         lambda v, p: packet(AUTH, 0, b""), versions=(V311,)),
    Case("auth-without-auth-method", "5.0 4.12: AUTH without an Authentication Method in CONNECT is a "
         "Protocol Error", lambda v, p: packet(AUTH, 0, b"\x18\x00"), versions=(V5,),
         v5_codes=MALFORMED_OR_PROTOCOL),
    # --- PUBLISH ---
    Case("publish-qos-3", "[MQTT-3.3.1-4] a PUBLISH with both QoS bits set -> close",
         lambda v, p: publish_packet(f"{p}/a", b"x", pid=1, version=v, flags=0x06)),
    Case("publish-qos1-packet-id-0", "[MQTT-2.3.1-1] (5.0 [MQTT-2.2.1-3]) QoS>0 needs a non-zero Packet "
         "Identifier", lambda v, p: publish_packet(f"{p}/a", b"x", qos=1, pid=0, version=v),
         v5_codes=MALFORMED_OR_PROTOCOL),
    Case("publish-invalid-utf8-topic", "[MQTT-1.5.3-1] (5.0 [MQTT-1.5.4-1]) ill-formed UTF-8 -> close",
         lambda v, p: raw_publish_body(v, p.encode() + b"/\xff\xfe")),
    Case("publish-utf16-surrogate-topic", "[MQTT-1.5.3-1] (5.0 [MQTT-1.5.4-1]) U+D800..U+DFFF MUST NOT "
         "be encoded", lambda v, p: raw_publish_body(v, p.encode() + b"/\xed\xa0\x80")),
    Case("publish-null-char-topic", "[MQTT-1.5.3-2] (5.0 [MQTT-1.5.4-2]) U+0000 in a string -> close",
         lambda v, p: raw_publish_body(v, p.encode() + b"/a\x00b")),
    # 5.0 names no specific code for a wildcard in a Topic Name: 0x90 Topic Name invalid (Millet)
    # and 0x82 Protocol Error (mosquitto) are both accepted.
    Case("publish-wildcard-plus", "[MQTT-3.3.2-2] Topic Name MUST NOT contain wildcards",
         lambda v, p: publish_packet(f"{p}/+", b"x", version=v), v5_codes={0x90, 0x82}),
    Case("publish-wildcard-hash", "[MQTT-3.3.2-2] Topic Name MUST NOT contain wildcards",
         lambda v, p: publish_packet(f"{p}/#", b"x", version=v), v5_codes={0x90, 0x82}),
    Case("publish-empty-topic", "3.1.1 [MQTT-4.7.3-1] topic names are at least one character; 5.0 "
         "3.3.2.3.4 zero-length topic without Topic Alias is a Protocol Error",
         lambda v, p: publish_packet("", b"x", version=v), v5_codes=MALFORMED_OR_PROTOCOL | {0x90}),
    Case("publish-topic-length-overflows", "2.2/1.5.3: string length beyond the packet -> malformed",
         lambda v, p: packet(PUBLISH, 0, b"\x10\x00abc")),
    # --- MQTT 5 properties ---
    Case("duplicate-property", "5.0 3.3.2.3.2: including Payload Format Indicator more than once is a "
         "Protocol Error", lambda v, p: publish_packet(f"{p}/a", b"x", version=v,
                                                       properties=[(P_PAYLOAD_FORMAT, 0), (P_PAYLOAD_FORMAT, 0)]),
         versions=(V5,), v5_codes=PROTOCOL),
    Case("unknown-property-id", "5.0 2.2.2.2: an unknown property identifier makes the packet malformed",
         lambda v, p: raw_publish_body(v, f"{p}/a".encode(), props_bytes=b"\x02\x7f\x00"),
         versions=(V5,), v5_codes=MALFORMED),
    Case("property-length-overflows", "5.0 2.2.2.1: Property Length beyond the packet -> malformed",
         lambda v, p: raw_publish_body(v, f"{p}/a".encode(), props_bytes=b"\x20\x01", payload=b""),
         versions=(V5,), v5_codes=MALFORMED),
    Case("property-wrong-packet-type", "5.0 2.2.2.2: Session Expiry Interval is not valid in PUBLISH",
         lambda v, p: publish_packet(f"{p}/a", b"x", version=v, properties={P_SESSION_EXPIRY: 1}),
         versions=(V5,), v5_codes=MALFORMED_OR_PROTOCOL),
    # 0x94 is defined for an alias above the maximum; for alias 0 the spec only says "not permitted",
    # so 0x94 (Millet), 0x81 (mosquitto) and 0x82 are accepted.
    Case("topic-alias-0", "5.0 [MQTT-3.3.2-8] Topic Alias 0 is not permitted",
         lambda v, p: publish_packet(f"{p}/a", b"x", version=v, properties={P_TOPIC_ALIAS: 0}),
         versions=(V5,), v5_codes={0x94} | MALFORMED_OR_PROTOCOL),
    Case("topic-alias-above-maximum", "5.0 [MQTT-3.3.2-9]/3.3.2.3.4 alias > Topic Alias Maximum (5) "
         "-> DISCONNECT 0x94", lambda v, p: publish_packet(f"{p}/a", b"x", version=v,
                                                           properties={P_TOPIC_ALIAS: 6}),
         versions=(V5,), v5_codes={0x94}, settings={"topic_alias_max": 5}),
    Case("topic-alias-unmapped", "5.0 3.3.2.3.4: empty Topic Name with an alias that has no mapping is "
         "a Protocol Error", lambda v, p: publish_packet("", b"x", version=v, properties={P_TOPIC_ALIAS: 1}),
         versions=(V5,), v5_codes=PROTOCOL | {0x94}, settings={"topic_alias_max": 5}),
    Case("publish-with-subscription-identifier", "5.0 [MQTT-3.3.4-6] a PUBLISH from a client MUST NOT "
         "contain a Subscription Identifier", lambda v, p: publish_packet(
             f"{p}/a", b"x", version=v, properties={P_SUBSCRIPTION_ID: 5}),
         versions=(V5,), v5_codes=PROTOCOL,
         millet_only="mosquitto 2.0 accepts it (eclipse-mosquitto/mosquitto#3319)"),
    Case("oversize-packet", "5.0 3.2.2.3.6 / [MQTT-3.2.2-15]: a packet above the server's Maximum "
         "Packet Size (1000) -> DISCONNECT 0x95; 3.1.1: close",
         lambda v, p: publish_packet(f"{p}/a", b"z" * 2000, version=v), v5_codes={0x95},
         settings={"max_packet_size": 1000}),
    # --- SUBSCRIBE / UNSUBSCRIBE payloads ---
    Case("subscribe-no-filters", "[MQTT-3.8.3-3] SUBSCRIBE MUST contain at least one filter",
         lambda v, p: subscribe_packet(1, [], v), v5_codes=MALFORMED_OR_PROTOCOL),
    Case("subscribe-qos-3", "[MQTT-3-8.3-4] (5.0 [MQTT-3.8.3-5]) requested QoS 3 -> malformed",
         lambda v, p: subscribe_packet(1, [(f"{p}/a", 3)], v)),
    Case("subscribe-reserved-option-bits", "[MQTT-3-8.3-4] (5.0 [MQTT-3.8.3-5]) reserved bits in the "
         "options byte MUST be 0", lambda v, p: subscribe_packet(1, [(f"{p}/a", 0xC1 if v == V5 else 0x05)], v)),
    Case("subscribe-retain-handling-3", "5.0 3.8.3.1: Retain Handling 3 is a Protocol Error",
         lambda v, p: subscribe_packet(1, [(f"{p}/a", sub_opts(1, rh=3))], v), versions=(V5,),
         v5_codes=MALFORMED_OR_PROTOCOL),
    Case("subscribe-packet-id-0", "[MQTT-2.3.1-1] SUBSCRIBE needs a non-zero Packet Identifier",
         lambda v, p: subscribe_packet(0, [(f"{p}/a", 0)], v), v5_codes=MALFORMED_OR_PROTOCOL),
    Case("subscription-identifier-0", "5.0 3.8.2.1.2: Subscription Identifier 0 is a Protocol Error",
         lambda v, p: subscribe_packet(1, [(f"{p}/a", 0)], v, properties={P_SUBSCRIPTION_ID: 0}),
         versions=(V5,), v5_codes=MALFORMED_OR_PROTOCOL),
    Case("shared-subscription-no-local", "5.0 [MQTT-3.8.3-4] No Local on a Shared Subscription is a "
         "Protocol Error", lambda v, p: subscribe_packet(1, [(f"$share/g/{p}/a", sub_opts(1, no_local=True))], v),
         versions=(V5,), v5_codes=PROTOCOL,
         millet_only="mosquitto 2.0 grants it (SUBACK 0x01)"),
    Case("unsubscribe-no-filters", "[MQTT-3.10.3-2] UNSUBSCRIBE MUST contain at least one filter",
         lambda v, p: unsubscribe_packet(1, [], v), v5_codes=MALFORMED_OR_PROTOCOL),
    # --- connection state ---
    Case("publish-before-connect", "[MQTT-3.1.0-1] the first packet MUST be CONNECT",
         lambda v, p: publish_packet(f"{p}/a", b"x"), versions=(V311,), connect_first=False),
    Case("subscribe-before-connect", "[MQTT-3.1.0-1] the first packet MUST be CONNECT",
         lambda v, p: subscribe_packet(1, [(f"{p}/a", 0)]), versions=(V311,), connect_first=False),
    Case("pingreq-before-connect", "[MQTT-3.1.0-1] the first packet MUST be CONNECT",
         lambda v, p: packet(PINGREQ, 0, b""), versions=(V311,), connect_first=False),
    Case("second-connect", "[MQTT-3.1.0-2] a second CONNECT is a protocol violation (5.0: 0x82)",
         lambda v, p: connect_packet(v, unique()), v5_codes=PROTOCOL),
    # --- CONNECT itself ---
    Case("connect-reserved-flag", "[MQTT-3.1.2-3] the CONNECT reserved flag MUST be 0",
         lambda v, p: connect_packet(v, unique(), reserved_flag=True), connect_first=False,
         connect_phase=True),
    Case("connect-will-qos-without-will-flag", "3.1.1 [MQTT-3.1.2-13] / 5.0 [MQTT-3.1.2-11]: Will QoS "
         "MUST be 0 if the Will Flag is 0", lambda v, p: connect_packet(v, unique(), extra_flags=0x08),
         connect_first=False, connect_phase=True, v5_codes=MALFORMED_OR_PROTOCOL),
    Case("connect-will-qos-3", "3.1.1 [MQTT-3.1.2-14] / 5.0 [MQTT-3.1.2-12]: Will QoS MUST NOT be 3",
         lambda v, p: connect_packet(v, unique(), will={"topic": f"{p}/w", "qos": 3}),
         connect_first=False, connect_phase=True),
    Case("connect-will-retain-without-will-flag", "3.1.1 [MQTT-3.1.2-15] / 5.0 [MQTT-3.1.2-13]",
         lambda v, p: connect_packet(v, unique(), extra_flags=0x20), connect_first=False, connect_phase=True,
         v5_codes=MALFORMED_OR_PROTOCOL),
    Case("connect-password-without-username", "3.1.1 [MQTT-3.1.2-22] password flag requires the user "
         "name flag", lambda v, p: connect_packet(v, unique(), password=b"pw"), versions=(V311,),
         connect_first=False, connect_phase=True),
    Case("connect-client-id-overflows", "1.5.3/3.1.3: Client Identifier length beyond the packet",
         lambda v, p: connect_raw(v, 0x02, b"\x00\x40abc"), connect_first=False, connect_phase=True),
    Case("connect-receive-maximum-0", "5.0 3.1.2.11.3: Receive Maximum 0 is a Protocol Error",
         lambda v, p: connect_packet(v, unique(), properties={P_RECEIVE_MAXIMUM: 0}), versions=(V5,),
         connect_first=False, connect_phase=True, v5_codes=MALFORMED_OR_PROTOCOL),
    Case("connect-maximum-packet-size-0", "5.0 3.1.2.11.4: Maximum Packet Size 0 is a Protocol Error",
         lambda v, p: connect_packet(v, unique(), properties={P_MAXIMUM_PACKET_SIZE: 0}), versions=(V5,),
         connect_first=False, connect_phase=True, v5_codes=MALFORMED_OR_PROTOCOL),
    Case("connect-duplicate-property", "5.0 3.1.2.11.2: Session Expiry Interval more than once is a "
         "Protocol Error", lambda v, p: connect_packet(v, unique(), properties=[(P_SESSION_EXPIRY, 1),
                                                                               (P_SESSION_EXPIRY, 2)]),
         versions=(V5,), connect_first=False, connect_phase=True, v5_codes=MALFORMED_OR_PROTOCOL),
    Case("connect-unsupported-auth-method", "5.0 3.1.2.11.9 / 4.12: an unsupported Authentication "
         "Method -> CONNACK 0x8C (or 0x87) then close",
         lambda v, p: connect_packet(v, unique(), properties={P_AUTH_METHOD: "NO-SUCH-METHOD"}),
         versions=(V5,), connect_first=False, connect_phase=True, v5_codes={0x8C, 0x87}),
    # The server cannot know which layout an unknown level uses: 3.1.1 [MQTT-3.1.2-2] mandates CONNACK
    # 0x01 then close; 5.0 [MQTT-3.1.2-2] allows CONNACK 0x84 then close. Either CONNACK is accepted
    # (for both the 3.1.1- and the 5.0-shaped CONNECT), a bare close is not.
    Case("connect-unsupported-protocol-level", "[MQTT-3.1.2-2] unsupported Protocol Level -> CONNACK "
         "0x01 (3.1.1) / 0x84 (5.0) then close",
         lambda v, p: connect_packet(v, unique(), protocol_level=6),
         connect_first=False, connect_phase=True, v3_connack={0x01, 0x84}),
    Case("connect-bad-protocol-name", "[MQTT-3.1.2-1] protocol name not 'MQTT': the server MAY "
         "disconnect and MUST NOT continue processing per this specification (no CONNACK 0)",
         lambda v, p: connect_packet(v, unique(), protocol_name="MQTX"), connect_first=False,
         connect_phase=True, v5_codes={0x81, 0x82, 0x84}, v3_refusal_ok=True),
]


def _expect_rejected(r: RawClient, case: Case, version: str):
    pkts = r.wait_closed(timeout=5)
    if version == V5 and not case.v3_connack:
        if not pkts:
            return "bare close"
        assert len(pkts) == 1, f"expected at most one packet before close, got {pkts}"
        p = pkts[0]
        if case.connect_phase:
            assert p.type == CONNACK, f"expected CONNACK (or nothing) before close, got {p!r}"
            rc = p.body[1] if len(p.body) >= 2 else None
        else:
            assert p.type == DISCONNECT, f"expected DISCONNECT (or nothing) before close, got {p!r}"
            rc = p.disconnect()[0]
        assert rc in case.v5_codes, f"reason code {rc:#x}, expected one of {sorted(hex(c) for c in case.v5_codes)}"
        return f"{p.name} {rc:#x}"
    if case.v3_connack:
        assert len(pkts) == 1 and pkts[0].type == CONNACK, f"expected CONNACK then close, got {pkts}"
        rc = pkts[0].body[1]
        assert rc in case.v3_connack, f"CONNACK return code {rc:#x}"
        return f"CONNACK {rc:#x}"
    if case.v3_refusal_ok and len(pkts) == 1 and pkts[0].type == CONNACK and pkts[0].body[1:2] != b"\x00":
        return f"CONNACK {pkts[0].body[1]:#x}"
    assert pkts == [], f"3.1.1: expected the connection to be closed without any response, got {pkts}"
    return "bare close"


def _params():
    out = []
    for case in CASES:
        for v in case.versions:
            marks = []
            if case.millet_only:
                marks.append(pytest.mark.millet_only(reason=case.millet_only))
            out.append(pytest.param(case, v, id=f"{case.id}-v{v}", marks=marks))
    return out


@pytest.mark.parametrize("case,version", _params())
def test_malformed(case: Case, version, broker, broker_factory, uid):
    """Each case names its normative statement in ``Case.ref``."""
    target = broker_factory(**case.settings) if case.settings else broker
    r = RawClient(target, version)
    try:
        if case.connect_first:
            r.connect()
        r.send(case.build(version, uid))
        outcome = _expect_rejected(r, case, version)
        print(f"[{case.id} v{version}: {outcome}]")
    finally:
        r.close()
    assert target.alive(), f"broker died on {case.id}:\n{target.log_tail()}"
    pubsub_roundtrip(target, version)


def _v5_post_connect_params():
    out = []
    for case in CASES:
        if V5 in case.versions and case.connect_first and not case.connect_phase:
            out.append(pytest.param(case, id=case.id))
    return out


@pytest.mark.millet_only(reason="SHOULD-level (5.0 4.13.1): mosquitto closes without DISCONNECT in several "
                                "cases (5-byte remaining length, PUBREL/DISCONNECT flags, second CONNECT, "
                                "duplicate property, unexpected AUTH)")
@pytest.mark.parametrize("case", _v5_post_connect_params())
def test_v5_protocol_error_sends_disconnect(case: Case, broker, broker_factory, uid):
    """5.0 4.13.1: for an error in a packet other than CONNECT the server SHOULD send DISCONNECT with
    the reason code before closing; Millet always does, with the code listed for the case."""
    target = broker_factory(**case.settings) if case.settings else broker
    r = RawClient(target, V5)
    try:
        r.connect()
        r.send(case.build(V5, uid))
        pkts = r.wait_closed(timeout=5)
        assert len(pkts) == 1 and pkts[0].type == DISCONNECT, f"expected DISCONNECT then close, got {pkts}"
        rc = pkts[0].disconnect()[0]
        assert rc in case.v5_codes, f"reason code {rc:#x}, expected one of {sorted(hex(c) for c in case.v5_codes)}"
    finally:
        r.close()


def test_partial_packet_does_not_block_others(raw, clients, uid):
    """The server keeps serving other clients while one connection has sent only half a packet
    (each connection is handled independently; 4.8 only the offending connection is affected)."""
    stuck = raw(V311)
    full = connect_packet(V311, unique())
    stuck.send(full[:7])
    c = clients(V311)
    c.connect()
    c.subscribe(f"{uid}/x", 1)
    c.publish(f"{uid}/x", b"served", qos=1)
    assert c.messages.wait_for(1)[0].payload == b"served"
    stuck2 = raw(V311)
    stuck2.connect()
    stuck2.send(publish_packet(f"{uid}/x", b"y" * 100)[:20])
    c.publish(f"{uid}/x", b"served-2", qos=1)
    c.messages.wait_for(2)


def test_garbage_bytes_close_connection(raw, assert_alive):
    """[MQTT-3.1.0-1] / [MQTT-4.8.0-1]: random non-MQTT bytes as first packet -> close, broker unharmed."""
    r = raw(V311)
    r.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    pkts = r.wait_closed()
    assert pkts == []
    assert_alive()


def test_connection_closed_by_client_mid_packet(raw, assert_alive):
    """Abrupt client close in the middle of a packet does not harm the broker."""
    for _ in range(5):
        r = raw(V5)
        r.connect()
        r.send(publish_packet("conf/mid", b"q" * 1000, version=V5)[:300])
        r.abort()
    assert_alive(version=V5)
