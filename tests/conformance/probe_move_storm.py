"""Probe (not part of the suite): one client id moving between nodes as
fast as it can, with a queue; what a bystander's QoS 1 round trips see."""
import threading
import time

from test_cluster import nats_urls, nodes, on, session_on  # noqa: F401
from helpers import V5, unique, wait_until


def test_probe(on):
    cid = unique("storm")
    t = unique("storm/t")
    sub, _ = session_on(on, 0, V5, cid)
    assert sub.subscribe(f"{t}/#", 1) == [1]
    sub.disconnect()
    pub = on(1, V5)
    pub.connect()
    for i in range(10000):
        pub.publish(f"{t}/a", b"q%d" % i, qos=1)
    # bystander on node 0: QoS 1 publish round trips
    by = on(0, V5)
    by.connect()
    lat, stop = [], threading.Event()

    def probe():
        while not stop.is_set():
            t0 = time.monotonic()
            by.publish(unique("by/x"), b"x", qos=1, timeout=30)
            lat.append(time.monotonic() - t0)
            time.sleep(0.01)

    th = threading.Thread(target=probe)
    th.start()
    time.sleep(1)
    base = sorted(lat)
    n0 = len(lat)
    t0 = time.monotonic()
    moves = 0
    for k in range(60):
        c, ack = session_on(on, k % 3, V5, cid)
        moves += ack.session_present
        c.close()
    took = time.monotonic() - t0
    time.sleep(0.5)
    stop.set()
    th.join()
    during = sorted(lat[n0:])
    q = lambda v, p: v[min(len(v) - 1, int(len(v) * p))] * 1000
    print(f"\nmoves {moves}/60 in {took:.2f}s; bystander before p50 {q(base,.5):.1f} p99 {q(base,.99):.1f} ms; "
          f"during p50 {q(during,.5):.1f} p99 {q(during,.99):.1f} max {during[-1]*1000:.1f} ms (n={len(during)})")
