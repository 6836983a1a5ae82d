"""Issue 11, short version of the overload suite in CI: ``millet-bench overload --quick``
(bench/overload.sh runs the full one against Millet and Mosquitto for BENCHMARKS.md).

Eight scenarios (stalled subscriber, offline-queue floods, topic aliases, big offline QoS 0,
retained flood with repeated SUBSCRIBE, pre-auth hogs), each a 2 s baseline and a 4 s attack,
measured by a probe connection (PINGREQ round trip and publish -> deliver p99) and five QoS 1
devices (msg/s under attack against baseline). The other overload tests assert each fix in
isolation; this one guards the probe's view across all of them at once.

The issue's targets (probe p99 < 50 ms, devices >= 80%, RSS within budget) are what the full
suite reports. As there, the attacker's client threads run at nice 19 (millet-bench's default
``--attacker-nice``: on a real deployment the attacker is another machine, and its client's own
CPU should not be taken from the devices' client). Here, on 2 shared cores with the test suite possibly running alongside, the
assertions are looser but still catch a broker that stops serving others:

* probe p99 (PING and publish -> deliver) < 500 ms in every scenario. Over 10 runs here
  (2 shared cores, other builds running) Millet's worst p99 was 176 ms (big-offline-qos0; 228 ms
  with a second suite running alongside), most scenarios 1-50 ms. The stalled subscriber on
  ``#`` used to cost the probe about 1 s (its own publishes match it, and back-pressure held
  it for up to 1 s once the stalled queue was full); since a reader that consumes nothing for
  20 ms no longer holds publishers, 1-4 ms. A broker that stops answering others shows the
  whole 4 s attack.
* the devices keep >= 10% of their baseline msg/s. Their ratio is noisy here (2 s against 4 s
  on cores shared with other work: Millet's lowest was 27%, the same scenario varying by 2x
  between runs), so the floor only catches a broker that stops serving them: the build before
  a280586 (the stalled-reader bug: publishers held for a subscriber that never reads) fails
  here with the devices at 0.4% of baseline in the stalled-subscriber scenario (its probe p99
  was ~1 s, like today's: the device floor is what catches it).
* cpu-heavy used to stall every other connection about 1 run in 3 (one client's 64 KiB read
  batch of QoS 0 publishes into offline sessions handled in one go); since a connection yields
  after 2 ms of packet handling (and QoS 0 is not queued offline), it is asserted like the rest.
* a scenario that misses a limit is run once more, alone, on the same broker, and fails only if
  it misses again (CI once saw offline-queues at a 464 ms p99 that 20 runs here kept at
  2-40 ms: one stall of the shared machine, not a broker that stops serving others).
* memory: no attack may reach 1 GiB (``--rss-abort-mib``, the default ``memory_budget``); the
  byte limits hold the offline-queue floods well below (about 420 MiB here, 200 sessions at
  their queue limits).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

# Known failures: reported as xfail (after every other scenario has been asserted) until fixed.
KNOWN: dict[str, str] = {}
PROBE_P99_MS = 500.0
MIN_THROUGHPUT_PCT = 10.0


def _bench_bin() -> str:
    env = os.environ.get("MILLET_BENCH_BIN")
    if env:
        return env
    cands = []
    if os.environ.get("MILLET_BIN"):
        cands.append(Path(os.environ["MILLET_BIN"]).with_name("millet-bench"))
    if os.environ.get("CARGO_TARGET_DIR"):
        cands.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "millet-bench")
    cands.append(REPO / "target" / "release" / "millet-bench")
    for c in cands:
        if c.exists():
            return str(c)
    pytest.fail("millet-bench not found: cargo build --release -p millet-bench, or set MILLET_BENCH_BIN")


def _run(b, tmp_path: Path, scenario: str = "all") -> tuple[list[dict], float]:
    out = tmp_path / f"overload-{scenario}.json"
    cmd = [_bench_bin(), "--host", b.host, "--port", str(b.port), "--label", "millet",
           "--json-out", str(out), "overload", "--quick", "--scenario", scenario,
           "--broker-pid", str(b.proc.pid), "--rss-abort-mib", "1024"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - t0
    assert p.returncode == 0, f"{cmd}\n{p.stderr[-4000:]}"
    assert b.alive(), f"broker died during the overload suite:\n{b.log_tail()}"
    return json.loads(out.read_text())["scenarios"], took


def _judge(s: dict) -> list[str]:
    """What is wrong with one scenario's result (empty: it held its limits)."""
    name, a = s["name"], s["attack"]
    ping, pub, tput = s["probe_ping_p99_ms"], s["probe_pub_p99_ms"], s["throughput_pct"]
    print(f"{name:20} ping p99 {ping} ms, pub->deliver p99 {pub} ms, devices {tput}% "
          f"RSS {s['rss_peak_mib']} MiB {s['notes']}")
    if s.get("error"):
        return [f"{name}: {s['error']}"]
    wrong = []
    limit = PROBE_P99_MS
    if a.get("aborted"):
        wrong.append(f"{name}: RSS reached the 1 GiB abort threshold ({a['aborted']})")
    if not a["probe"]["connected"] or a["probe"].get("error"):
        wrong.append(f"{name}: probe {a['probe'].get('error') or 'not connected'}")
    if ping is None or ping >= limit or pub is None or pub >= limit:
        wrong.append(f"{name}: probe p99 ping {ping} ms / pub {pub} ms (limit {limit:.0f} ms)")
    if tput is None or tput < MIN_THROUGHPUT_PCT:
        wrong.append(f"{name}: devices at {tput}% of baseline (min {MIN_THROUGHPUT_PCT:.0f}%)")
    return wrong


@pytest.mark.millet_only("thresholds chosen for Millet; bench/overload.sh compares with Mosquitto")
@pytest.mark.timeout(300)
def test_overload_suite_quick(broker_factory, tmp_path):
    b = broker_factory()
    scenarios, took = _run(b, tmp_path)
    print(f"overload --quick: {took:.0f} s")
    failures, known = [], []
    assert len(scenarios) == 8
    for s in scenarios:
        wrong = _judge(s)
        if wrong and s["name"] not in KNOWN and not s.get("error"):
            # One more run of that scenario alone: a single stall of the
            # shared CI machine (once, a 464 ms p99 in offline-queues, which
            # runs at 2-40 ms here) is not a broker that stops serving
            # others; a broker that does fails both runs.
            print(f"{s['name']}: missed its limits once, run again alone")
            again, _ = _run(b, tmp_path, s["name"])
            assert len(again) == 1
            retry = _judge(again[0])
            wrong = [f"{w} (and again: {'; '.join(retry)})" for w in wrong] if retry else []
        (known if s["name"] in KNOWN else failures).extend(wrong)
    assert not failures, "\n".join(failures)
    if known:
        names = sorted({k.split(":")[0] for k in known})
        pytest.xfail("; ".join(f"{n}: {KNOWN[n]}" for n in names) + "\n" + "\n".join(known))
