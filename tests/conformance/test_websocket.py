"""MQTT over WebSocket with independent clients: MQTT.js on Node (ws, MQTT
3.1.1 and 5, and wss) and MQTT.js's browser bundle in a real headless
Chromium (Debian's ``chromium`` driven by ``playwright-core``).

The Node package is ``tests/node`` (``npm ci`` there; ``scripts/test.sh``
installs Node, npm and Chromium and sets ``MILLET_REQUIRE_NODE=1``, which
turns a missing piece into a failure instead of a skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port
from test_security import pki, tls_section  # noqa: F401  (pki is a fixture)

pytestmark = pytest.mark.millet_only("Millet's WebSocket listener")

HOST = "127.0.0.1"
NODE_DIR = Path(__file__).resolve().parent.parent / "node"
REQUIRED = os.environ.get("MILLET_REQUIRE_NODE") == "1"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _need(ok: bool, why: str):
    if not ok:
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)


def node(script: str, *args: str, timeout: float = 60.0) -> dict:
    _need(shutil.which("node") is not None, "node is not installed")
    _need((NODE_DIR / "node_modules" / "mqtt").is_dir(), "run `npm ci` in tests/node")
    r = subprocess.run(["node", str(NODE_DIR / script), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=NODE_DIR)
    assert r.returncode == 0, f"{script} {args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def ws_broker(millet_config, config_text: str = "", tls: bool = False):
    """A Millet with a ws listener (and a wss one with ``tls``) on free ports."""
    ws_port = free_port()
    args = ["--ws-listen", f"{HOST}:{ws_port}"]
    wss_port = None
    if tls:
        wss_port = free_port()
        args += ["--wss-listen", f"{HOST}:{wss_port}"]
    b = millet_config(config_text, tls=tls, args=args)
    b.ws_port, b.wss_port = ws_port, wss_port
    return b


EXPECTED = [{"payload": f"qos{q}", "qos": q} for q in (0, 1, 2)]


def _messages(result) -> list:
    return [{"payload": m["payload"], "qos": m["qos"]} for m in result["messages"]]


@pytest.mark.parametrize("version", [4, 5])
def test_mqttjs_over_websocket(millet_config, version):
    b = ws_broker(millet_config)
    r = node("ws_client.js", f"ws://{HOST}:{b.ws_port}/mqtt", str(version))
    assert r["ok"] and r["protocolVersion"] == version
    assert _messages(r) == EXPECTED
    assert "listening for MQTT over WebSocket (ws)" in b.log_text()


def test_mqttjs_over_secure_websocket(millet_config, pki):  # noqa: F811
    b = ws_broker(millet_config, tls_section(pki), tls=True)
    r = node("ws_client.js", f"wss://localhost:{b.wss_port}/mqtt", "5", pki["ca.pem"])
    assert r["ok"] and _messages(r) == EXPECTED
    assert "listening for MQTT over WebSocket (wss)" in b.log_text()


def test_mqttjs_to_a_wrong_path_is_refused(millet_config):
    b = ws_broker(millet_config)
    r = subprocess.run(["node", str(NODE_DIR / "ws_client.js"), f"ws://{HOST}:{b.ws_port}/nope", "4"],
                       capture_output=True, text=True, timeout=60, cwd=NODE_DIR) \
        if shutil.which("node") and (NODE_DIR / "node_modules" / "mqtt").is_dir() else None
    _need(r is not None, "node / tests/node/node_modules missing")
    assert r.returncode == 1 and "FAIL" in r.stderr, r
    assert "wrong path (404)" in b.log_text()


def test_websocket_clients_get_the_same_authentication(millet_config, tmp_path):
    pw = tmp_path / "passwd"
    r = subprocess.run([os.environ.get("MILLET_BIN") or _millet(), "passwd", str(pw), "alice",
                        "--password", "secret-pw"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    conf = f'[security.auth.password_file]\npath = "{pw}"\n'
    b = ws_broker(millet_config, conf)
    r = subprocess.run(["node", "-e", _AUTH_JS, f"ws://{HOST}:{b.ws_port}/mqtt"],
                       capture_output=True, text=True, timeout=60, cwd=NODE_DIR) \
        if shutil.which("node") and (NODE_DIR / "node_modules" / "mqtt").is_dir() else None
    _need(r is not None, "node / tests/node/node_modules missing")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert json.loads(r.stdout) == {"anonymous": "refused", "good": "connected", "bad": "refused"}


def _millet() -> str:
    from conftest import _find_millet
    return _find_millet()


_AUTH_JS = r"""
const mqtt = require('mqtt');
const url = process.argv[1];
const attempt = (opts) => new Promise((resolve) => {
  const c = mqtt.connect(url, { protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 5000, ...opts });
  c.on('connect', () => { c.end(true); resolve('connected'); });
  c.on('error', () => { c.end(true); resolve('refused'); });
});
(async () => {
  const out = {
    anonymous: await attempt({}),
    good: await attempt({ username: 'alice', password: 'secret-pw' }),
    bad: await attempt({ username: 'alice', password: 'wrong' }),
  };
  console.log(JSON.stringify(out));
})();
"""


def test_headless_chromium_page_over_websocket(millet_config):
    _need(os.path.exists(CHROMIUM), "chromium is not installed")
    _need((NODE_DIR / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in tests/node")
    b = ws_broker(millet_config)
    r = node("browser.js", f"ws://{HOST}:{b.ws_port}/mqtt", CHROMIUM, timeout=120)
    assert r["ok"], r
    assert _messages(r) == EXPECTED
    assert "HeadlessChrome" in r["userAgent"] or "Chrome" in r["userAgent"], r
    assert r["pageErrors"] == []
