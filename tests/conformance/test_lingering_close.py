"""A server-initiated close must let the client read why (issue 10, item 1).

When the server closes a connection whose client is still sending, closing the socket with unread
bytes makes the kernel answer with RST; the client's next write then fails (EPIPE / ECONNRESET) and
a client library gives up before it reads the DISCONNECT or CONNACK that explains the close. The
server therefore closes in stages: flush, shut down its write half, read and discard what the client
still sends (bounded in time and bytes), then close ("lingering close").

[MQTT-3.14.4-1] / [MQTT-3.2.2-5]: the server sends DISCONNECT / a CONNACK with the reason code and
then closes the connection: the reason code is only worth sending if the client can read it.
"""

import socket
import threading
import time

import pytest

from helpers import (
    CONNACK, DISCONNECT, PUBREC, PUBREL, V311, V5, Client, ConnectionClosed, RawClient, ack_packet,
    connect_packet, publish_packet, unique, TIMEOUT,
)

TRIES = 5

TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # Linux tcpi_state values


def _tcp_state(sock) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def _wait_fin_without_reset(r: RawClient, attempt: int):
    """Wait, without reading, for the server's FIN; then a fixed window (0.5 s) in which a reset
    would arrive: it follows the FIN at once when the server closes with unread bytes."""
    deadline = time.monotonic() + TIMEOUT
    while _tcp_state(r.sock) not in (TCP_CLOSE_WAIT, TCP_CLOSE):
        assert time.monotonic() < deadline, "the server did not close"
        time.sleep(0.01)  # poll interval
    window = time.monotonic() + 0.5
    while time.monotonic() < window and _tcp_state(r.sock) != TCP_CLOSE:
        time.sleep(0.01)  # poll interval
    assert _tcp_state(r.sock) != TCP_CLOSE, f"try {attempt}: connection reset by the server"


@pytest.mark.millet_only(reason="mosquitto 2.0.11 has no incoming Receive Maximum check (see "
                                "test_server_receive_maximum_exceeded)")
def test_receive_maximum_exceeded_disconnect_reaches_a_paho_client(broker_factory, uid):
    """[MQTT-3.3.4-7] 5.0 4.9: a v5 client overrunning the server's Receive Maximum with QoS 2
    PUBLISHes, answering every PUBREC with PUBREL as paho does, gets DISCONNECT 0x93 in its
    on_disconnect callback, every time (it used to see a broken pipe: 0 of 5)."""
    b = broker_factory(receive_maximum=2)
    for attempt in range(TRIES):
        c = Client(b, V5)
        try:
            c.connect()
            # paho keeps up to 20 QoS 2 messages in flight (its default), ignoring the server's
            # Receive Maximum 2: the third incomplete one is the overrun.
            for i in range(20):
                c.c.publish(f"{uid}/rm", b"x" * 2000, qos=2)
            rc, _ = c.wait_disconnected()
            assert rc == 0x93, f"try {attempt}: on_disconnect reason {rc:#x}, expected 0x93"
        finally:
            c.close()


def _flood_after(r: RawClient, first: bytes, version, extra_packets: int = 200):
    """Send ``first`` and, without reading, many QoS 0 PUBLISHes behind it (in a thread, since the
    server may stop reading); returns the thread."""
    burst = b"".join(publish_packet("flood/x", b"y" * 1000, qos=0, version=version)
                     for _ in range(extra_packets))

    def run():
        r.send(first + burst)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


REFUSALS = {
    # name: (config text, extra args, client id, v5 reason code, 3.1.1 return code)
    "quota": ("", ["--max-connections", "0"], "refused", 0x97, 3),
    "banned": ('[security.quota]\nbans = ["client:banned-device"]\n', [], "banned-device", 0x8A, 5),
}


@pytest.mark.millet_only(reason="uses Millet's --max-connections flag and [security.quota] bans")
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
@pytest.mark.parametrize("version", [V311, V5])
def test_refused_connect_connack_is_readable_by_a_client_still_sending(millet_config, version, refusal):
    """[MQTT-3.2.2-5] / 3.2.2.3: a refused CONNECT (quota, ban) gets its CONNACK return code
    before the close, even when the client pipelined more packets behind the CONNECT: the server
    does not reset the connection (no RST within a fixed window after its FIN), so the client can
    still write and then read the CONNACK."""
    config, args, cid, rc5, rc3 = REFUSALS[refusal]
    b = millet_config(config, args=args)
    for attempt in range(TRIES):
        r = RawClient(b, version)
        try:
            t = _flood_after(r, connect_packet(version, cid), version)
            _wait_fin_without_reset(r, attempt)
            p = r.recv(TIMEOUT)
            assert p is not None and p.type == CONNACK, f"try {attempt}: expected CONNACK, got {p!r}"
            rc = p.connack().rc
            assert rc == (rc5 if version == V5 else rc3), f"try {attempt}: CONNACK {rc:#x}"
            t.join(TIMEOUT)
        finally:
            r.close()


@pytest.mark.millet_only(reason="mosquitto 2.0.11 has no incoming Receive Maximum check")
def test_disconnect_is_readable_by_a_raw_client_still_sending(broker_factory):
    """[MQTT-3.14.4-1]: after the server's DISCONNECT 0x93 a client that had more packets on the way
    can still write (its PUBREL, as paho would on reading a PUBREC) without a reset, and then read
    the DISCONNECT. Without a lingering close the unread bytes make the kernel reset the connection
    right after the server's FIN, and the client's write fails before it reads anything."""
    b = broker_factory(receive_maximum=2)
    for attempt in range(TRIES):
        r = RawClient(b, V5)
        try:
            r.connect()
            burst = b"".join(publish_packet("rm/x", b"q2", qos=2, pid=i, version=V5) for i in (1, 2, 3))
            burst += b"".join(publish_packet("flood/x", b"y" * 1000, qos=0, version=V5) for _ in range(300))
            t = threading.Thread(target=r.send, args=(burst,), daemon=True)
            t.start()
            _wait_fin_without_reset(r, attempt)
            r.sock.sendall(ack_packet(PUBREL, 1, version=V5))  # must not fail (EPIPE / ECONNRESET)
            seen = r.wait_closed()
            assert any(p.type == DISCONNECT and p.disconnect()[0] == 0x93 for p in seen), \
                f"try {attempt}: no DISCONNECT 0x93 before the close: {seen}"
            t.join(TIMEOUT)
        finally:
            r.close()


@pytest.mark.millet_only(reason="Millet's bound on the lingering close")
def test_lingering_close_is_bounded(broker_factory):
    """The lingering close does not keep a connection open for a client that never stops sending:
    the server closes it within its bound even though the client keeps writing."""
    b = broker_factory(receive_maximum=1)
    r = RawClient(b, V5)
    try:
        r.connect()
        r.send(b"".join(publish_packet("rm/x", b"q2", qos=2, pid=i, version=V5) for i in (1, 2)))
        stop = time.monotonic() + 15
        chunk = publish_packet("flood/x", b"z" * 4000, qos=0, version=V5)
        closed_at = None
        start = time.monotonic()
        r.sock.settimeout(0.05)
        while time.monotonic() < stop:
            try:
                r.sock.sendall(chunk * 4)
            except socket.timeout:
                pass
            except OSError:
                closed_at = time.monotonic()
                break
            try:
                r.sock.recv(65536)  # DISCONNECT, then EOF (the server shut down its write half)
            except socket.timeout:
                pass
            except OSError:
                closed_at = time.monotonic()
                break
        assert closed_at is not None, "connection still open after 15 s of lingering"
        assert closed_at - start < 10, f"lingering lasted {closed_at - start:.1f} s"
    finally:
        r.close()
