"""The admin web dashboard end to end in a real headless Chromium.

Millet runs with its admin listener and a WebSocket listener on free ports
and the generated ``DATA_DIR/admin.token``; ``tests/node/dashboard.js``
(playwright-core driving Debian's ``chromium``) logs in with that token,
finds a paho client in the clients table and kicks it, adds and lifts a
ban, and publishes and subscribes from the topic tester over
MQTT-over-WebSocket (MQTT.js served by the admin listener). Here, paho
checks the kicked client saw DISCONNECT 0x98 and a paho subscriber got
the tester's message. Screenshots go to the test's tmp dir (and to
``$MILLET_DASHBOARD_SHOTS`` when set, which is how ``docs/dashboard/``
was made).

Skipped (with the reason) when Node, ``tests/node/node_modules`` or
Chromium are missing; ``MILLET_REQUIRE_NODE=1`` (``scripts/test.sh``)
turns that into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import IS_MOSQUITTO, free_port, terminate
from helpers import HOST, V5, Client, unique
from test_admin import http, start_millet

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="millet_only: Mosquitto has no admin API")

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("MILLET_REQUIRE_NODE") == "1"


def _need(ok: bool, why: str):
    if not ok:
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def dash(tmp_path):
    ws = free_port()
    b = start_millet(tmp_path, "--ws-listen", f"{HOST}:{ws}")
    b.ws = ws
    b.key = (b.data_dir / "admin.token").read_text().strip()
    yield b
    terminate(b.proc)


def test_dashboard_in_headless_chromium(dash, tmp_path):
    _need(shutil.which("node") is not None, "node is not installed")
    _need((NODE_DIR / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in tests/node")
    _need(os.path.exists(CHROMIUM), "chromium is not installed")
    # the page and its scripts need no key; the API does
    s, text, hdrs = http(dash, "GET", "/dashboard", key=None)
    assert s == 200 and hdrs["Content-Type"].startswith("text/html") and "app.js" in text
    assert http(dash, "GET", "/api/v1/stats", key=None)[0] == 401

    cid = unique("dash-e2e")
    topic = unique("dash/e2e")
    victim = Client(dash, V5, client_id=cid)
    victim.connect()
    sub = Client(dash, V5, client_id=unique("dash-sub"))
    sub.connect()
    sub.subscribe(topic + "/#", qos=1)
    # a little steady traffic (in and out) for the overview's rates and chart
    load = Client(dash, V5, client_id=unique("dash-load"))
    load.connect()
    load_topic = unique("dash/load")
    load.subscribe(load_topic, qos=0)
    stop = threading.Event()

    def traffic():
        while not stop.wait(0.05):
            load.publish(load_topic, b"tick", qos=0, wait=False)
    ticker = threading.Thread(target=traffic, daemon=True)
    ticker.start()
    shots = tmp_path / "shots"
    shots.mkdir()
    try:
        r = subprocess.run(
            ["node", str(NODE_DIR / "dashboard.js"), f"http://{HOST}:{dash.admin}", dash.key, cid,
             f"ws://{HOST}:{dash.ws}/mqtt", topic, str(shots), CHROMIUM],
            capture_output=True, text=True, timeout=180, cwd=NODE_DIR)
        lines = r.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines else {}
        assert r.returncode == 0 and result.get("ok"), f"dashboard.js: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert result["steps"][-1] == "logged out", result
        # the kick reached the paho client as DISCONNECT 0x98 (administrative action)
        rc, _ = victim.wait_disconnected()
        assert rc == 0x98, f"DISCONNECT reason {rc:#x}"
        # the tester's publish reached a paho subscriber too
        got = sub.messages.wait_topic(topic + "/greeting")
        assert got[0].payload == b"hello from the dashboard" and got[0].qos == 1
        for name in ("overview", "clients", "tester"):
            png = shots / f"{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        if os.environ.get("MILLET_DASHBOARD_SHOTS"):
            for png in shots.glob("*.png"):
                shutil.copy(png, os.environ["MILLET_DASHBOARD_SHOTS"])
    finally:
        stop.set()
        ticker.join(timeout=5)
        for c in (victim, sub, load):
            c.close()
