"""The NATS JetStream cluster that cluster mode stores its state in
(docs/CLUSTER.md), as scripts/cluster-up.sh starts it: three servers that
form one cluster, whose JetStream keeps an R3 stream writable with a server
down. The NATS engine is not built yet (issue 13); this checks the test
infrastructure its tests will stand on, on a fresh machine.
"""

import asyncio
import os
import signal
import subprocess
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = 24620  # NATS_PORT_BASE, away from cluster-up.sh's default


@pytest.fixture
def nats_cluster():
    if os.environ.get("MILLET_ENGINE__TEST_DELAY_MS"):
        pytest.skip("no Millet involved: run once, not again on the delaying engine")
    run = tempfile.mkdtemp(prefix="millet-nats-")
    env = dict(os.environ, NATS_PORT_BASE=str(BASE), MILLET_NODES="0")
    up = subprocess.run([os.path.join(REPO, "scripts", "cluster-up.sh"), run], env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr + up.stdout
    with open(os.path.join(run, "pids")) as f:
        pids = [int(p) for p in f.read().split()]
    yield [f"nats://127.0.0.1:{BASE + i}" for i in (1, 2, 3)], pids
    subprocess.run([os.path.join(REPO, "scripts", "cluster-down.sh"), run], timeout=60)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_three_nats_servers_keep_an_r3_stream_writable_with_one_down(nats_cluster):
    nats = pytest.importorskip("nats")
    urls, pids = nats_cluster

    async def run():
        nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=20)
        js = nc.jetstream(timeout=10)
        # Meta leader elected, three peers: an R3 stream can be created.
        for _ in range(100):
            try:
                await js.add_stream(name="PROBE", subjects=["probe.>"], num_replicas=3)
                break
            except Exception:  # no meta leader yet: retried, bounded
                await asyncio.sleep(0.1)
        # Replicas are listed once they have joined the stream's group.
        for _ in range(100):
            info = await js.stream_info("PROBE")
            if len(info.cluster.replicas or []) == 2:
                break
            await asyncio.sleep(0.1)
        assert info.config.num_replicas == 3
        assert len(info.cluster.replicas or []) == 2, "a leader and two replicas"
        ack = await js.publish("probe.a", b"1")
        assert ack.seq == 1
        # One server down (not the one we talk to necessarily): a majority
        # of the replicas remains, so writes are still acknowledged.
        os.kill(pids[2], signal.SIGKILL)
        ack, last_error = None, None
        deadline = time.monotonic() + 40
        while ack is None and time.monotonic() < deadline:
            try:
                # (An identifier: a retry of a write that was stored is not stored twice.)
                ack = await js.publish("probe.a", b"2", timeout=5, headers={"Nats-Msg-Id": "probe-2"})
            except Exception as e:  # leader moving, client reconnecting: retried, bounded
                last_error = e
                await asyncio.sleep(0.1)
        assert ack is not None, f"no write acknowledged within 40 s with one server down: {last_error!r}"
        assert ack.seq == 2
        await nc.close()

    asyncio.run(asyncio.wait_for(run(), 60))
