"""PROXY protocol v1 and v2 on a listener named in ``proxy_protocol_listeners``:
raw sockets send the header a load balancer would, then MQTT; the client address
in the header must be what the admin API shows, what the log names and what bans
match. A connection without a header is closed."""

from __future__ import annotations

import ipaddress
import json
import re
import struct
import urllib.request

import pytest

from conftest import free_port
from helpers import CONNACK, V5, V311, RawClient, connect_packet, unique, wait_until
from test_security import pki, tls_section  # noqa: F401  (pki is a fixture)

pytestmark = pytest.mark.millet_only("Millet's PROXY protocol listeners")

TOKEN = "proxy-test-token-0123456789"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_broker(millet_config):
    admin = free_port()
    conf = (f'proxy_protocol_listeners = ["127.0.0.1:{{PORT}}"]\n'
            f'[admin]\nlisten = "127.0.0.1:{admin}"\nbearer_token = "{TOKEN}"\n')
    b = millet_config(conf)
    b.admin = admin
    return b


def api(b, method: str, path: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{b.admin}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read().decode() or "null")


def peers(b) -> dict:
    return {c["client_id"]: c.get("peer") for c in api(b, "GET", "/api/v1/clients?limit=1000")["data"]}


def v1(src: str, sport: int, dport: int) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if fam == "TCP6" else "127.0.0.1"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None, sport: int = 0, dport: int = 0, command: int = 1, tlvs: bytes = b"") -> bytes:
    if src is None:  # LOCAL, no addresses
        return V2_SIGNATURE + bytes([0x20 | command, 0x00]) + struct.pack(">H", len(tlvs)) + tlvs
    ip = ipaddress.ip_address(src)
    if ip.version == 4:
        fam, addrs = 0x11, ip.packed + ipaddress.ip_address("127.0.0.1").packed
    else:
        fam, addrs = 0x21, ip.packed + ipaddress.ip_address("::1").packed
    addrs += struct.pack(">HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack(">H", len(addrs)) + addrs


def connect_through(b, header: bytes, version=V311, expect_rc: int | None = 0) -> RawClient:
    c = RawClient(b, version)
    c.send(header)
    c.connect(unique("pp"), expect_rc=expect_rc)
    return c


def test_v1_and_v2_headers_give_the_client_address(millet_config):
    b = proxy_broker(millet_config)
    got = {}
    clients = []
    try:
        for name, header, version, expect in [
            ("v1-ipv4", v1("203.0.113.7", 40001, b.port), V311, "203.0.113.7:40001"),
            ("v1-ipv6", v1("2001:db8::7", 40002, b.port), V5, "[2001:db8::7]:40002"),
            # v2 with a TLV (PP2_TYPE_AUTHORITY) after the addresses, as AWS NLB sends
            ("v2-ipv4", v2("198.51.100.8", 40003, b.port, tlvs=b"\x02\x00\x04host"), V5,
             "198.51.100.8:40003"),
            ("v2-ipv6", v2("2001:db8::8", 40004, b.port), V311, "[2001:db8::8]:40004"),
        ]:
            c = connect_through(b, header, version)
            clients.append(c)
            got[c.client_id] = (name, expect)
        shown = peers(b)
        for cid, (name, expect) in got.items():
            assert shown.get(cid) == expect, (name, shown)
        log = b.log_text()
        assert "New client connected from 203.0.113.7:40001" in log, log
        # the line names the transport and where the address came from
        assert re.search(r"New client connected from 203\.0\.113\.7:40001 as \S+ \(p4[^)]*\) over tcp, "
                         r"address from the PROXY protocol header \(proxy 127\.0\.0\.1:\d+\)", log), log
        # the connection still works after the header: a round trip
        c = clients[0]
        topic = unique("pp/")
        c.subscribe([(topic, 0)])
        c.publish(topic, b"through the balancer")
        assert c.recv_publish().payload == b"through the balancer"
    finally:
        for c in clients:
            c.close()


def test_v2_local_keeps_the_connections_own_address(millet_config):
    b = proxy_broker(millet_config)
    c = connect_through(b, v2(None, command=0))
    try:
        local_port = c.sock.getsockname()[1]
        assert peers(b)[c.client_id] == f"127.0.0.1:{local_port}"
    finally:
        c.close()


@pytest.mark.parametrize("first,says", [
    (b"", "no PROXY protocol header"),  # MQTT straight away
    (b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol header"),
    (b"PROXY TCP4 not an address 1 2\r\n", "invalid PROXY protocol header: v1"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "invalid PROXY protocol header: v2 header of 65551 bytes"),
])
def test_a_connection_without_a_valid_header_is_closed(millet_config, first, says):
    b = proxy_broker(millet_config)
    r = RawClient(b, V311)
    try:
        r.send(first)
        r.send(connect_packet(V311, unique("nohdr")))
        seen = r.wait_closed()
        assert not any(p.type == CONNACK for p in seen), seen
    finally:
        r.close()
    wait_until(lambda: says in b.log_text(), what=f"log line {says!r}")
    # one line; the start-up probe (connect, close) is not logged at info
    assert b.log_text().count("connection closed (PROXY protocol listener") == 1, b.log_text()


def test_a_ban_matches_the_address_in_the_header(millet_config):
    b = proxy_broker(millet_config)
    api(b, "POST", "/api/v1/bans", {"target": "ip:203.0.113.9/32", "duration": 600})
    r = RawClient(b, V311)
    try:
        r.send(v1("203.0.113.9", 40010, b.port))
        r.send(connect_packet(V311, unique("banned")))
        seen = r.wait_closed()
        assert not any(p.type == CONNACK for p in seen), seen
    finally:
        r.close()
    # a neighbour is not banned, and the balancer's own address is not either
    c = connect_through(b, v1("203.0.113.10", 40011, b.port))
    c.close()


def test_a_header_before_the_tls_handshake(millet_config, pki):  # noqa: F811
    import itertools
    import socket

    from test_security import client_ctx

    tls_port = free_port()
    admin = free_port()
    conf = (f'[admin]\nlisten = "127.0.0.1:{admin}"\nbearer_token = "{TOKEN}"\n'
            + tls_section(pki))
    b = millet_config(conf, args=["--tls-listen", f"127.0.0.1:{tls_port}",
                                  "--proxy-protocol-listener", f"127.0.0.1:{tls_port}"])
    b.admin = admin

    def tls_up():
        try:
            socket.create_connection(("127.0.0.1", tls_port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_until(tls_up, what="the TLS listener")

    c = RawClient.__new__(RawClient)
    c.broker, c.version, c.buf, c.closed, c.pending = b, V5, bytearray(), False, []
    c._pid = itertools.count(1)
    raw = socket.create_connection(("127.0.0.1", tls_port), timeout=5)
    raw.sendall(v2("203.0.113.77", 40077, tls_port))
    c.sock = client_ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        c.connect(unique("pp-tls"))
        assert peers(b)[c.client_id] == "203.0.113.77:40077"
    finally:
        c.close()
    # the plain listener expects no header
    plain = RawClient(b, V311)
    plain.connect(unique("direct"))
    plain.close()
