#!/usr/bin/env python3
"""Offline-queue load (issue 11, item 2): SESSIONS offline persistent sessions on one topic,
each queue filled to MAX_QUEUED, then the publisher's acked QoS 1 rate.

  .venv/bin/python bench/offline_queue.py target/release/millet PORT SESSIONS MAX_QUEUED [millet flags...]
  e.g. ... 2000 1000 --durability none;  ... 300 2000 --durability sync
"""
import os, socket, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "conformance"))
from helpers import *
from dataclasses import dataclass
@dataclass
class B: host: str; port: int
binary, port, sessions, maxq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
extra = sys.argv[5:]
proc = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(tempfile.mkdtemp(prefix="offline-queue-"), "data"), "--max-queued", str(maxq)] + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
b = B("127.0.0.1", port)
for _ in range(100):
    try: socket.create_connection((b.host, port), timeout=0.2).close(); break
    except OSError: time.sleep(0.05)
def sess(cid, clean=False):
    r = RawClient(b, V311, timeout=60)
    r.send(connect_packet(V311, client_id=cid, clean=clean)); r.expect(CONNACK, timeout=60); return r
try:
    t = time.monotonic()
    for i in range(sessions):
        r = sess(f"off{i}"); r.send(subscribe_packet(1, [("m/t", 1)])); r.expect(SUBACK, timeout=60); r.send(disconnect_packet()); r.sock.close()
    print(f"{sessions} sessions in {time.monotonic()-t:.1f}s", flush=True)
    pub = sess("pub", True)
    t = time.monotonic(); pending = 0
    for i in range(maxq):
        pub.send(publish_packet("m/t", b"fill", qos=1, pid=i % 65535 + 1)); pending += 1
        if pending >= 64: pub.expect(PUBACK, timeout=600); pending -= 1
    for _ in range(pending): pub.expect(PUBACK, timeout=600)
    print(f"fill {maxq} in {time.monotonic()-t:.1f}s", flush=True)
    def rate(topic, secs=5.0, nmax=20000):
        t0 = time.monotonic(); n = 0
        while n < nmax and time.monotonic() - t0 < secs:
            pub.send(publish_packet(topic, b"x", qos=1, pid=n % 65535 + 1)); pub.expect(PUBACK, timeout=600); n += 1
        return n / (time.monotonic() - t0)
    base = rate("m/nobody"); loaded = rate("m/t")
    rss = [l for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS")][0].split()[1]
    print(f"one-at-a-time QoS 1: {base:.0f} msg/s to no subscriber, {loaded:.0f} msg/s into {sessions} full offline queues (max_queued {maxq}); broker RSS {int(rss)//1024} MiB", flush=True)
    t = time.monotonic(); r = sess("off0"); n = 0
    while n < maxq:
        p = r.expect(PUBLISH, timeout=60).publish(); r.send(ack_packet(PUBACK, p.pid)); n += 1
    print(f"reconnected session got {n} queued messages in {time.monotonic()-t:.2f}s", flush=True)
finally:
    proc.terminate(); proc.wait()
