#!/usr/bin/env python3
"""Write the seed corpus of the `protocol` fuzz target (fuzz/corpus/protocol/seed-*).

Each seed is a sequence of operations (see fuzz_targets/protocol.rs):
  [i, len, bytes...]   connection i (0..2) sends `len` bytes
  [0xC0, n]            advance the clock n seconds
  [0xD8, n]            advance the clock n hours
  [0xE0 | i]           connection i's socket is gone (replaced by a new one)
  [0xF0 | i]           server shutdown on connection i
Run: python3 fuzz/gen-protocol-seeds.py
"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "protocol")


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x


def pkt(first, body):
    return bytes([first]) + varint(len(body)) + body


def props(*items):
    body = b"".join(items)
    return varint(len(body)) + body


def p_u16(pid, v):
    return bytes([pid]) + struct.pack(">H", v)


def p_u32(pid, v):
    return bytes([pid]) + struct.pack(">I", v)


def connect(v5, cid, clean=True, keep_alive=0, cprops=b"", will=None):
    flags = 0x02 if clean else 0
    payload = s(cid)
    if will:
        topic, msg, qos, wprops = will
        flags |= 0x04 | (qos << 3)
        if v5:
            payload += props(wprops)
        payload += s(topic) + s(msg)
    vh = s("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", keep_alive)
    if v5:
        vh += props(cprops)
    return pkt(0x10, vh + payload)


def subscribe(v5, pid, filt, qos):
    body = struct.pack(">H", pid) + (props() if v5 else b"") + s(filt) + bytes([qos])
    return pkt(0x82, body)


def unsubscribe(v5, pid, filt):
    return pkt(0xA2, struct.pack(">H", pid) + (props() if v5 else b"") + s(filt))


def publish(v5, topic, payload, qos=0, pid=None, retain=False, pprops=b""):
    body = s(topic)
    if qos:
        body += struct.pack(">H", pid)
    if v5:
        body += props(pprops)
    return pkt(0x30 | (qos << 1) | (1 if retain else 0), body + payload)


def ack(kind, pid):
    first = {"puback": 0x40, "pubrec": 0x50, "pubrel": 0x62, "pubcomp": 0x70}[kind]
    return pkt(first, struct.pack(">H", pid))


DISCONNECT = pkt(0xE0, b"")
PINGREQ = pkt(0xC0, b"")


def send(i, data):
    out = bytearray()
    while data:
        chunk, data = data[:255], data[255:]
        out += bytes([i, len(chunk)]) + chunk
    return bytes(out)


def clock(secs):
    return bytes([0xC0, secs])


def gone(i):
    return bytes([0xE0 | i])


def basic(v5):
    """Publisher 0, subscriber 1: QoS 0/1/2 both ways with every ack."""
    sub_props = p_u16(0x21, 10) + p_u16(0x22, 4) if v5 else b""  # receive max, alias max
    return b"".join([
        send(0, connect(v5, "pub")),
        send(1, connect(v5, "sub", cprops=sub_props)),
        send(1, subscribe(v5, 1, "t/#", 2)),
        send(0, publish(v5, "t/a", b"zero")),
        send(0, publish(v5, "t/a", b"one", 1, 1)),
        send(0, publish(v5, "t/b", b"two", 2, 2)),
        send(0, ack("pubrel", 2)),
        send(1, ack("puback", 1)),
        send(1, ack("pubrec", 2)),
        send(1, ack("pubcomp", 2)),
        send(1, PINGREQ),
        send(1, unsubscribe(v5, 3, "t/#")),
        send(0, DISCONNECT),
        send(1, DISCONNECT),
    ])


def resume(v5):
    """A persistent subscriber goes away, misses QoS 1/2, comes back, acks."""
    sub_props = p_u32(0x11, 600) if v5 else b""  # session expiry
    sub = connect(v5, "durable", clean=False, cprops=sub_props)
    return b"".join([
        send(1, sub),
        send(1, subscribe(v5, 7, "q/+", 2)),
        gone(1),
        send(0, connect(v5, "p", keep_alive=30)),
        send(0, publish(v5, "q/1", b"m1", 1, 10)),
        send(0, publish(v5, "q/2", b"m2", 2, 11)),
        send(0, ack("pubrel", 11)),
        send(0, publish(v5, "q/3", b"retained", 1, 12, retain=True)),
        clock(20),
        send(1, sub),
        send(1, ack("puback", 1)),
        send(1, ack("pubrec", 2)),
        gone(1),
        send(1, sub),
        send(1, ack("pubcomp", 2)),
        send(2, connect(v5, "late")),
        send(2, subscribe(v5, 1, "q/#", 1)),
        send(2, ack("puback", 1)),
        clock(200),  # keep-alive of connection 0 expires
        send(1, DISCONNECT),
    ])


def wills(v5):
    """A will (delayed in v5), a takeover, the keep-alive and session expiry."""
    wprops = p_u32(0x18, 5) if v5 else b""  # will delay
    return b"".join([
        send(2, connect(v5, "watch")),
        send(2, subscribe(v5, 1, "will/#", 1)),
        send(0, connect(v5, "dies", keep_alive=10, cprops=p_u32(0x11, 60) if v5 else b"",
                        will=("will/dies", b"bye", 1, wprops))),
        send(1, connect(v5, "dies", clean=False)),  # takeover
        gone(1),
        clock(10),
        send(2, ack("puback", 1)),
        clock(100),
        send(2, PINGREQ),
        bytes([0xD8, 2]),
        send(2, DISCONNECT),
    ])


def v5_extras():
    """v5 only: topic aliases in, message expiry, subscription options."""
    v5 = True
    alias_pub = publish(v5, "", b"via alias", 1, 5, pprops=p_u16(0x23, 1))
    return b"".join([
        send(1, connect(v5, "s", cprops=p_u16(0x22, 2) + p_u32(0x27, 64))),
        send(1, pkt(0x82, struct.pack(">H", 1) + props(bytes([0x0B, 3])) + s("a/#") + bytes([0x2D]))),
        send(0, connect(v5, "p")),
        send(0, publish(v5, "a/b", b"set alias", 1, 4, pprops=p_u16(0x23, 1))),
        send(0, alias_pub),
        send(0, publish(v5, "a/b", b"x" * 100, 0)),
        send(0, publish(v5, "a/c", b"expires", 1, 6, pprops=p_u32(0x02, 1))),
        send(1, ack("puback", 1)),
        send(1, ack("puback", 2)),
        clock(5),
        send(0, pkt(0xE0, bytes([0x04, 0]))),  # disconnect with will
        bytes([0xF1]),
    ])


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {
        "seed-basic-v311": basic(False),
        "seed-basic-v5": basic(True),
        "seed-resume-v311": resume(False),
        "seed-resume-v5": resume(True),
        "seed-wills-v311": wills(False),
        "seed-wills-v5": wills(True),
        "seed-extras-v5": v5_extras(),
        "seed-mixed": basic(False)[:40] + basic(True),
    }
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
