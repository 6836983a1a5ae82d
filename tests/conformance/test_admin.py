"""The admin HTTP API and Prometheus /metrics over real sockets (Millet only).

One broker for the module, with an admin listener on a free port and an API
key made by `millet ctl key add`; MQTT clients are paho (helpers.Client).
The OpenAPI document the broker serves is checked against its own answers.
"""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import IS_MOSQUITTO, _find_millet, free_port, terminate
from helpers import HOST, V5, V311, Client, unique, wait_until

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="millet_only: Mosquitto has no admin API")


def start_millet(tmp, *args: str, wait_admin: bool = True, data_dir=None):
    """Start Millet with `args`; returns a namespace with host, port, admin, proc, log."""
    port, admin = free_port(), free_port()
    while admin == port:  # a port probed twice may come back twice
        admin = free_port()
    log_path = tmp / f"millet-{port}.log"
    data_dir = data_dir or tmp / f"data-{port}"
    cmd = [_find_millet(), "--listen", f"{HOST}:{port}", "--data-dir", str(data_dir),
           "--admin-listen", f"{HOST}:{admin}", "--sys-interval", "0", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    b = SimpleNamespace(host=HOST, port=port, admin=admin, proc=proc, log_path=log_path, data_dir=data_dir)

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"millet exited: {log_path.read_text(errors='replace')}")
        try:
            return http(b, "GET", "/readyz", key=None)[0] == 200
        except OSError:
            return False
    if wait_admin:
        wait_until(up, timeout=15, what="admin API ready")
    return b


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx comes back as itself (GET / -> 303 /dashboard)


_opener = urllib.request.build_opener(_NoRedirect)


def http(b, method: str, path: str, body=None, key: str | None = "default", raw: bool = False):
    """(status, parsed JSON or text, headers); redirects are not followed."""
    if key == "default":
        key = b.key
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://{b.host}:{b.admin}{path}", data=data, method=method, headers=headers)
    try:
        with _opener.open(req, timeout=10) as r:
            status, text, hdrs = r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        status, text, hdrs = e.code, e.read().decode(), e.headers
    if raw or not hdrs.get("Content-Type", "").startswith("application/json"):
        return status, text, hdrs
    return status, json.loads(text), hdrs


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    keys = tmp / "keys"
    r = subprocess.run([_find_millet(), "ctl", "key", "add", "tests", "--file", str(keys)],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("mlk_") and key not in keys.read_text()
    conf = tmp / "millet.toml"
    # Connections park after 200 ms of quiet (default 30 s), for the parked-kick test.
    conf.write_text(f'[limits]\npark_after_ms = 200\n[admin]\nkeys_file = "{keys}"\n')
    b = start_millet(tmp, "--config", str(conf))
    b.key = key
    yield b
    terminate(b.proc)


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_health_and_readiness_need_no_key(admin):
    s, body, _ = http(admin, "GET", "/healthz", key=None)
    assert (s, body) == (200, {"status": "ok"})
    s, body, _ = http(admin, "GET", "/readyz", key=None)
    assert s == 200 and body["status"] == "ready" and body["listeners"] is True and body["store"] == "ok"


@pytest.mark.parametrize("method,path", [("GET", "/api/v1/clients"), ("GET", "/metrics"),
                                         ("POST", "/api/v1/publish"), ("DELETE", "/api/v1/bans/client:x"),
                                         ("GET", "/api/v1/openapi.json")])
def test_everything_else_needs_a_valid_key(admin, method, path):
    for key in (None, "mlk_wrong", admin.key + "x", ""):
        s, body, h = http(admin, method, path, key=key, body={} if method == "POST" else None)
        assert s == 401, (key, s, body)
        assert body["error"] == "unauthorized" and body["message"], body
        assert h.get("WWW-Authenticate", "").startswith("Bearer")


def test_errors_are_json(admin):
    s, body, _ = http(admin, "GET", "/api/v1/nope")
    assert s == 404 and body["error"] == "not_found"
    s, body, _ = http(admin, "PUT", "/api/v1/clients")
    assert s == 405 and body["error"] == "method_not_allowed"
    s, body, _ = http(admin, "GET", "/api/v1/clients?limit=0")
    assert s == 400 and body["error"] == "bad_request"
    s, body, _ = http(admin, "GET", "/api/v1/clients?bogus=1")
    assert s == 400 and "bogus" in body["message"]
    s, body, _ = http(admin, "POST", "/api/v1/publish", body={"topic": "a", "qos": 3})
    assert s == 400 and "qos" in body["message"]


def test_generated_token_and_off_loopback_refusal(tmp_path):
    # no keys_file, no bearer_token: a token is generated, readable by the owner only
    b = start_millet(tmp_path)
    try:
        tok = (b.data_dir / "admin.token").read_text().strip()
        assert oct((b.data_dir / "admin.token").stat().st_mode & 0o777) == "0o600"
        b.key = tok
        assert http(b, "GET", "/api/v1/stats")[0] == 200
        assert http(b, "GET", "/api/v1/stats", key="nope")[0] == 401
    finally:
        terminate(b.proc)
    r = subprocess.run([_find_millet(), "--listen", f"{HOST}:{free_port()}", "--data-dir", str(tmp_path / "d2"),
                        "--admin-listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0
    assert "not a loopback address" in r.stderr and "millet ctl key add" in r.stderr, r.stderr


def test_list_inspect_and_kick_a_client(admin):
    cid = unique("adm-kick")
    c = Client(admin, V5, client_id=cid)
    try:
        c.connect(username="alice")
        s, body, _ = http(admin, "GET", f"/api/v1/clients?prefix={q(cid)}")
        assert s == 200 and [x["client_id"] for x in body["data"]] == [cid]
        x = body["data"][0]
        assert x["connected"] is True and x["username"] == "alice" and x["protocol"] == 5
        assert x["peer"].startswith("127.0.0.1:")
        assert http(admin, "GET", f"/api/v1/clients?prefix={q(cid)}&username=bob")[1]["data"] == []
        assert http(admin, "GET", f"/api/v1/clients?prefix={q(cid)}&username=alice")[1]["data"][0]["client_id"] == cid
        s, one, _ = http(admin, "GET", f"/api/v1/clients/{q(cid)}")
        assert s == 200 and one["client_id"] == cid and one["subscription_list"] == []
        s, body, _ = http(admin, "DELETE", f"/api/v1/clients/{q(cid)}")
        assert s == 200 and body == {"client_id": cid, "kicked": "connection"}
        rc, props = c.wait_disconnected()
        assert rc == 0x98, f"DISCONNECT reason {rc:#x}, expected 0x98 administrative action"
        # clean start, expiry 0: the session went with the connection
        wait_until(lambda: http(admin, "GET", f"/api/v1/clients/{q(cid)}")[0] == 404, what="session gone")
        s, body, _ = http(admin, "DELETE", f"/api/v1/clients/{q(cid)}")
        assert s == 404 and body["error"] == "not_found"
    finally:
        c.close()


def test_kicking_a_parked_connection(admin):
    # a quiet connection parks (gives up its task) after limits.park_after_ms (200 ms here)
    cid = unique("adm-park")
    c = Client(admin, V5, client_id=cid)
    try:
        c.connect()
        wait_until(lambda: metric(http(admin, "GET", "/metrics", raw=True)[1], "millet_connections_parked") >= 1,
                   timeout=5, what="the connection to park")
        assert http(admin, "DELETE", f"/api/v1/clients/{q(cid)}")[0] == 200
        rc, _ = c.wait_disconnected()
        assert rc == 0x98
    finally:
        c.close()


def test_kicking_a_v311_client_closes_it(admin):
    cid = unique("adm-kick3")
    c = Client(admin, V311, client_id=cid)
    try:
        c.connect()
        assert http(admin, "DELETE", f"/api/v1/clients/{q(cid)}")[0] == 200
        c.wait_disconnected()
    finally:
        c.close()


def test_paging(admin):
    prefix = unique("adm-page")
    cs = [Client(admin, V311, client_id=f"{prefix}-{i}") for i in range(3)]
    try:
        for c in cs:
            c.connect()
        s, p1, _ = http(admin, "GET", f"/api/v1/clients?prefix={q(prefix)}&limit=2")
        assert [x["client_id"] for x in p1["data"]] == [f"{prefix}-0", f"{prefix}-1"] and p1["next"] == f"{prefix}-1"
        s, p2, _ = http(admin, "GET", f"/api/v1/clients?prefix={q(prefix)}&limit=2&after={q(p1['next'])}")
        assert [x["client_id"] for x in p2["data"]] == [f"{prefix}-2"] and p2["next"] is None
    finally:
        for c in cs:
            c.close()


def test_subscribe_and_unsubscribe_on_a_clients_behalf(admin):
    cid = unique("adm-sub")
    topic = unique("adm/sub/t")
    c = Client(admin, V5, client_id=cid)
    pub = Client(admin, V311)
    try:
        c.connect()
        pub.connect()
        s, body, _ = http(admin, "POST", f"/api/v1/clients/{q(cid)}/subscriptions",
                          body={"filter": topic.rsplit("/", 1)[0] + "/+", "qos": 1})
        assert s == 201 and body["created"] is True
        s, subs, _ = http(admin, "GET", f"/api/v1/subscriptions?client_id={q(cid)}")
        assert [(x["filter"], x["qos"]) for x in subs["data"]] == [(topic.rsplit("/", 1)[0] + "/+", 1)]
        pub.publish(topic, b"via mqtt", qos=1)
        m = c.messages.wait_for(1)[0]
        assert (m.topic, m.payload, m.qos) == (topic, b"via mqtt", 1)
        # the filter in the path: slashes literal, + percent-encoded
        f = topic.rsplit("/", 1)[0] + "/" + q("+")
        s, body, _ = http(admin, "DELETE", f"/api/v1/clients/{q(cid)}/subscriptions/{f}")
        assert s == 200 and body["removed"] is True, body
        pub.publish(topic, b"after unsubscribe", qos=1)
        c.messages.assert_no_more(1)
        assert http(admin, "DELETE", f"/api/v1/clients/{q(cid)}/subscriptions/{f}")[0] == 404
        s, body, _ = http(admin, "POST", f"/api/v1/clients/{q(cid)}/subscriptions", body={"filter": "a/#/b"})
        assert s == 400
        s, body, _ = http(admin, "POST", "/api/v1/clients/no-such-client/subscriptions", body={"filter": "a"})
        assert s == 404
    finally:
        c.close()
        pub.close()


def test_admin_publish_reaches_subscribers(admin):
    topic = unique("adm/pub")
    c = Client(admin, V5)
    try:
        c.connect()
        c.subscribe(topic, 1)
        s, body, _ = http(admin, "POST", "/api/v1/publish", body={"topic": topic, "payload": "héllo", "qos": 1})
        assert s == 200 and body["sessions"] == 1
        raw = bytes(range(256))
        s, _, _ = http(admin, "POST", "/api/v1/publish",
                       body={"topic": topic, "payload": base64.b64encode(raw).decode(), "encoding": "base64"})
        assert s == 200
        got = c.messages.wait_for(2)
        assert [(m.payload, m.qos) for m in got] == [("héllo".encode(), 1), (raw, 0)]
        s, body, _ = http(admin, "POST", "/api/v1/publish", body={"topic": "a/+", "payload": "x"})
        assert s == 400 and body["error"] == "bad_request"
        s, body, _ = http(admin, "POST", "/api/v1/publish", body={"topic": "$SYS/x", "payload": "x"})
        assert s == 403 and body["error"] == "forbidden"
        s, body, _ = http(admin, "POST", "/api/v1/publish", body={"topic": "a", "payload": "%%", "encoding": "base64"})
        assert s == 400 and "base64" in body["message"]
    finally:
        c.close()


def test_admin_publish_reaches_mosquitto_sub(admin):
    if not shutil_which("mosquitto_sub"):
        pytest.skip("mosquitto_sub not installed")
    topic = unique("adm/mosq")
    cid = unique("adm-mosq")
    sub = subprocess.Popen(["mosquitto_sub", "-h", HOST, "-p", str(admin.port), "-i", cid, "-t", topic,
                            "-C", "1", "-W", "10"], stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: http(admin, "GET", f"/api/v1/subscriptions?client_id={q(cid)}")[0] == 200
                   and http(admin, "GET", f"/api/v1/subscriptions?client_id={q(cid)}")[1]["data"],
                   what="mosquitto_sub subscribed")
        assert http(admin, "POST", "/api/v1/publish", body={"topic": topic, "payload": "to mosquitto_sub"})[0] == 200
        out, _ = sub.communicate(timeout=10)
        assert out.strip() == "to mosquitto_sub"
    finally:
        if sub.poll() is None:
            sub.kill()


def shutil_which(name):
    import shutil
    return shutil.which(name)


def test_retained_list_and_delete(admin):
    base = unique("adm/ret")
    for i in range(3):
        assert http(admin, "POST", "/api/v1/publish",
                    body={"topic": f"{base}/{i}", "payload": f"r{i}", "retain": True, "qos": 1})[0] == 200
    s, body, _ = http(admin, "GET", f"/api/v1/retained?filter={q(base + '/#')}&limit=2")
    assert s == 200 and [(x["topic"], x["payload"]) for x in body["data"]] == [(f"{base}/0", "r0"), (f"{base}/1", "r1")]
    assert body["next"] == f"{base}/1"
    s, body, _ = http(admin, "GET", f"/api/v1/retained?filter={q(base + '/#')}&after={q(body['next'])}")
    assert [x["topic"] for x in body["data"]] == [f"{base}/2"] and body["next"] is None
    s, body, _ = http(admin, "DELETE", f"/api/v1/retained/{base}/1")
    assert s == 200 and body == {"topic": f"{base}/1", "deleted": True}
    assert http(admin, "DELETE", f"/api/v1/retained/{base}/1")[0] == 404
    c = Client(admin, V311)
    try:
        c.connect()
        c.subscribe(base + "/#", 0)
        got = c.messages.wait_for(2)
        c.messages.assert_no_more(2)
        assert sorted(m.topic for m in got) == [f"{base}/0", f"{base}/2"]
    finally:
        c.close()
    assert http(admin, "GET", "/api/v1/retained?filter=a/%23/b")[0] == 400


def test_bans_disconnect_refuse_and_lift(admin):
    cid = unique("adm-ban")
    # A banned v5 client is told DISCONNECT 0x98 (Administrative action): 0x8A (Banned) is a
    # CONNACK code only [MQTT-3.14.2.1]; the next CONNECT gets CONNACK 0x8A.
    c = Client(admin, V5, client_id=cid)
    try:
        c.connect()
        s, body, _ = http(admin, "POST", "/api/v1/bans", body={"target": f"client:{cid}", "duration": 60})
        assert s == 201 and body["target"] == f"client:{cid}"
        assert c.wait_disconnected()[0] == 0x98
        bans = http(admin, "GET", "/api/v1/bans")[1]["data"]
        mine = [b for b in bans if b["target"] == f"client:{cid}"]
        assert len(mine) == 1 and 0 < mine[0]["expires_in"] <= 60
        again = Client(admin, V5, client_id=cid)
        try:
            assert again.connect(expect_rc=None).rc == 0x8A
        finally:
            again.close()
        s, body, _ = http(admin, "DELETE", f"/api/v1/bans/client:{q(cid)}")
        assert s == 200 and body["removed"] is True
        assert http(admin, "DELETE", f"/api/v1/bans/client:{q(cid)}")[0] == 404
        back = Client(admin, V5, client_id=cid)
        try:
            back.connect()
        finally:
            back.close()
        assert http(admin, "POST", "/api/v1/bans", body={"target": "nonsense"})[0] == 400
        # a network, with a slash in the path
        assert http(admin, "POST", "/api/v1/bans", body={"target": "ip:192.0.2.0/24"})[0] == 201
        assert http(admin, "DELETE", "/api/v1/bans/ip:192.0.2.0/24")[0] == 200
    finally:
        c.close()


def test_metrics_move_with_traffic(admin):
    before = http(admin, "GET", "/metrics", raw=True)[1]
    assert "# TYPE millet_messages_received_total counter" in before
    topic = unique("adm/metrics")
    sub = Client(admin, V5)
    pub = Client(admin, V5)
    try:
        sub.connect()
        sub.subscribe(topic, 1)
        pub.connect()
        for i in range(5):
            pub.publish(topic, b"x" * 10, qos=1, retain=(i == 0))
        sub.messages.wait_for(5)
        banned = unique("adm-mban")
        assert http(admin, "POST", "/api/v1/bans", body={"target": f"client:{banned}", "duration": 30})[0] == 201
        b = Client(admin, V5, client_id=banned)
        assert b.connect(expect_rc=None).rc == 0x8A
        b.close()

        def moved():
            after = http(admin, "GET", "/metrics", raw=True)[1]
            return after if metric(after, "millet_messages_sent_total", '{qos="1"}') >= \
                metric(before, "millet_messages_sent_total", '{qos="1"}') + 5 else None
        after = wait_until(moved, what="sent counter to move")
        assert metric(after, "millet_messages_received_total", '{qos="1"}') >= \
            metric(before, "millet_messages_received_total", '{qos="1"}') + 5
        assert metric(after, "millet_payload_bytes_received_total", '{qos="1"}') >= \
            metric(before, "millet_payload_bytes_received_total", '{qos="1"}') + 50
        assert metric(after, "millet_connections") >= 2
        assert metric(after, "millet_subscriptions") >= 1
        assert metric(after, "millet_retained_messages") >= 1
        assert metric(after, "millet_auth_failures_total", '{reason="banned"}') >= \
            metric(before, "millet_auth_failures_total", '{reason="banned"}') + 1
        # the retained QoS 1 publish was stored: one more store round timed
        assert metric(after, "millet_store_write_seconds_count") > metric(before, "millet_store_write_seconds_count")
        assert metric(after, "millet_session_queue_depth_count") >= 2
        for name in ("millet_messages_dropped_total", "millet_bytes_sent_total", "millet_queued_messages",
                     "millet_memory_used_bytes", "millet_sessions"):
            assert f"\n{name}" in after, name
        assert not re.search(r'client_id=|' + re.escape(topic), after), "no client ids or topics in labels"
        # publish-to-deliver latency: one PUBLISH in 64 per worker thread is
        # timed, so 2,000 more deliveries observe some (any thread count < 31)
        for _ in range(2000):
            pub.publish(topic, b"y", qos=0)
        sub.messages.wait_for(5 + 2000)

        def observed():
            t = http(admin, "GET", "/metrics", raw=True)[1]
            return t if metric(t, "millet_deliver_latency_seconds_count") > \
                metric(before, "millet_deliver_latency_seconds_count") else None
        lat = wait_until(observed, what="deliver latency observations")
        assert "# TYPE millet_deliver_latency_seconds histogram" in lat
        assert metric(lat, "millet_deliver_latency_seconds_bucket", '{le="0.00005"}') <= \
            metric(lat, "millet_deliver_latency_seconds_bucket", '{le="5"}') <= \
            metric(lat, "millet_deliver_latency_seconds_bucket", '{le="+Inf"}') == \
            metric(lat, "millet_deliver_latency_seconds_count")
        assert metric(lat, "millet_deliver_latency_seconds_sum") > 0
        # every series the shipped Grafana dashboard queries exists
        dash = (Path(__file__).resolve().parents[2] / "docs" / "grafana-millet.json").read_text()
        for name in set(re.findall(r"millet_[a-z_]+", dash)):
            assert re.search(rf"^{name}[{{ ]", after, re.M), f"dashboard queries {name}, /metrics has none"
    finally:
        sub.close()
        pub.close()


def _hs256(secret: bytes, claims: dict) -> str:
    import hashlib
    import hmac

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_metrics_count_auth_failures_by_reason(tmp_path):
    """Real paho-mqtt clients fail authentication in each way the chain
    tells apart; /metrics counts each under its reason label."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    passwd = tmp_path / "passwd"
    r = subprocess.run([_find_millet(), "passwd", str(passwd), "alice", "--password", "s3cret"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    secret = b"metrics-test-secret-0123456789abcdef"
    conf = tmp_path / "millet.toml"
    conf.write_text(f'[admin]\nbearer_token = "metrics-test-token-0123456789"\n'
                    f'[security.auth.password_file]\npath = "{passwd}"\n'
                    f'[security.auth.jwt]\nalgorithm = "HS256"\nsecret = "{secret.decode()}"\nbind = "none"\n')
    b = start_millet(tmp_path, "--config", str(conf))
    b.key = "metrics-test-token-0123456789"
    try:
        def connect(username, password, client_id):
            """CONNACK reason code of a real paho v5 client (0: accepted)."""
            got = []
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
            if username is not None or password is not None:
                c.username_pw_set(username, password)
            c.on_connect = lambda cl, ud, flags, rc, props: got.append(rc.value)
            c.connect(b.host, b.port, keepalive=30)
            c.loop_start()
            try:
                wait_until(lambda: got, timeout=10, what=f"CONNACK for {client_id}")
            finally:
                c.disconnect()
                c.loop_stop()
            return got[0]

        def failures():
            text = http(b, "GET", "/metrics", raw=True)[1]
            reasons = ("bad_credentials", "not_authorized", "jwt_expired", "jwt_invalid", "banned")
            return {r: metric(text, "millet_auth_failures_total", f'{{reason="{r}"}}') for r in reasons}, text

        before, text = failures()
        assert "# TYPE millet_auth_failures_total counter" in text
        for r in ("quota", "timeout", "hook_error", "scram_failed", "other"):
            metric(text, "millet_auth_failures_total", f'{{reason="{r}"}}')
        now = int(time.time())
        assert connect("alice", "s3cret", unique("ok")) == 0
        assert connect("alice", "wrong", unique("bad")) == 0x86
        assert connect(None, None, unique("anon")) == 0x87
        assert connect("dev", _hs256(secret, {"exp": now - 3600}), unique("old")) == 0x86
        assert connect("dev", _hs256(b"another-secret", {"exp": now + 3600}), unique("forged")) == 0x86
        assert connect("dev", _hs256(secret, {"exp": now + 3600}), unique("jwt")) == 0
        banned = unique("adm-aban")
        assert http(b, "POST", "/api/v1/bans", body={"target": f"client:{banned}", "duration": 30})[0] == 201
        assert connect("alice", "s3cret", banned) == 0x8A

        after, text = failures()
        assert {r: after[r] - before[r] for r in after} == {
            "bad_credentials": 1, "not_authorized": 1, "jwt_expired": 1, "jwt_invalid": 1, "banned": 1}
        assert not re.search(r'client_id=|alice|dev"', text), "no client ids or user names in labels"
    finally:
        terminate(b.proc)


def _https(port: int, path: str, cafile=None, key=None):
    """(status, text, headers) of an HTTPS GET; cafile None: system roots only."""
    import ssl
    ctx = ssl.create_default_context(cafile=cafile)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(f"https://{HOST}:{port}{path}", headers=headers)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


@pytest.mark.parametrize("own_cert", [True, False], ids=["admin-cert", "security-tls-cert"])
def test_admin_api_over_https(tmp_path, own_cert):
    """[admin] tls: the API, /metrics and the dashboard over HTTPS (with the
    admin listener's own certificate, or [security.tls]'s), checked by a real
    HTTPS client trusting the test CA; plain HTTP and an untrusting client get
    nothing; `millet ctl --url https://... --ca` works."""
    import ssl
    from test_security import _ca, _issue, _pem_cert, _pem_key
    ca = _ca("Millet Admin Test CA")
    cert, key = _issue(ca, "localhost", True)
    (tmp_path / "ca.pem").write_bytes(_pem_cert(ca[0]))
    (tmp_path / "server.pem").write_bytes(_pem_cert(cert))
    (tmp_path / "server.key").write_bytes(_pem_key(key))
    token = "https-test-token-0123456789abcdef"
    if own_cert:
        conf = (f'[admin]\nbearer_token = "{token}"\ntls = true\n'
                f'tls_cert = "{tmp_path / "server.pem"}"\ntls_key = "{tmp_path / "server.key"}"\n')
        args = ["--config", str(tmp_path / "millet.toml")]
    else:
        conf = (f'tls_listen = ["{HOST}:{free_port()}"]\nwss_listen = ["{HOST}:{free_port()}"]\n'
                f'[admin]\nbearer_token = "{token}"\n'
                f'[security.tls]\ncert = "{tmp_path / "server.pem"}"\nkey = "{tmp_path / "server.key"}"\n')
        args = ["--config", str(tmp_path / "millet.toml"), "--admin-tls"]
    (tmp_path / "millet.toml").write_text(conf)
    b = start_millet(tmp_path, *args, "--no-ws", wait_admin=False)
    ca_file = str(tmp_path / "ca.pem")
    try:
        def up():
            if b.proc.poll() is not None:
                raise AssertionError(f"millet exited: {b.log_path.read_text(errors='replace')}")
            try:
                return _https(b.admin, "/readyz", ca_file)[0] == 200
            except OSError:
                return False
        wait_until(up, timeout=15, what="admin API ready over HTTPS")
        assert "admin API listening (HTTPS)" in b.log_path.read_text()
        s, text, _ = _https(b.admin, "/metrics", ca_file, key=token)
        assert s == 200 and "# TYPE millet_deliver_latency_seconds histogram" in text
        assert _https(b.admin, "/metrics", ca_file)[0] == 401
        s, text, h = _https(b.admin, "/dashboard", ca_file)
        assert s == 200 and h.get("Content-Type", "").startswith("text/html")
        # plain HTTP to the HTTPS port: no HTTP answer
        with pytest.raises((OSError, urllib.error.URLError, httpclient.HTTPException)):
            urllib.request.urlopen(f"http://{HOST}:{b.admin}/readyz", timeout=5).read()
        # a client that does not trust the CA refuses the certificate
        with pytest.raises(urllib.error.URLError) as e:
            _https(b.admin, "/readyz")
        assert isinstance(e.value.reason, ssl.SSLCertVerificationError), e.value
        # a silent client does not hold up the others
        import socket
        with socket.create_connection((HOST, b.admin)):
            assert _https(b.admin, "/readyz", ca_file)[0] == 200
        url = f"https://{HOST}:{b.admin}"
        r = subprocess.run([_find_millet(), "ctl", "--url", url, "--ca", ca_file, "--token", token,
                            "--json", "stats"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["node"]["version"]
        r = subprocess.run([_find_millet(), "ctl", "--url", url, "--token", token, "stats"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    finally:
        terminate(b.proc)


def test_admin_tls_needs_a_certificate(tmp_path):
    r = subprocess.run([_find_millet(), "--listen", f"{HOST}:{free_port()}", "--data-dir", str(tmp_path / "d"),
                        "--admin-listen", f"{HOST}:{free_port()}", "--no-ws", "--admin-tls"],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode != 0
    assert "admin.tls needs admin.tls_cert and admin.tls_key, or a [security.tls] section" in r.stderr + r.stdout


def test_stats_and_reload(admin):
    s, body, _ = http(admin, "GET", "/api/v1/stats")
    assert s == 200 and body["node"]["version"] and body["nodes"] == [body["node"]]
    s, body, _ = http(admin, "POST", "/api/v1/reload")
    assert s == 200 and body["reloaded"] is True and body["admin_keys"] == 1


# ---- the OpenAPI document against the real answers ----

def resolve(doc, schema):
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def check_schema(doc, schema, value, where="$"):
    schema = resolve(doc, schema)
    if value is None:
        assert schema.get("nullable"), f"{where}: null where the schema does not allow it"
        return
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
    elif t in types:
        assert isinstance(value, types[t]), f"{where}: {value!r} is not {t}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if t == "object":
        for r in schema.get("required", []):
            assert r in value, f"{where}: required field {r!r} missing from {sorted(value)}"
        for k, v in value.items():
            if k in schema.get("properties", {}):
                check_schema(doc, schema["properties"][k], v, f"{where}.{k}")
            elif schema.get("properties"):
                pytest.fail(f"{where}: field {k!r} is not in the document")
    if t == "array":
        for i, v in enumerate(value):
            check_schema(doc, schema["items"], v, f"{where}[{i}]")


def test_openapi_document_matches_the_answers(admin):
    s, doc, _ = http(admin, "GET", "/api/v1/openapi.json")
    assert s == 200 and doc["openapi"].startswith("3.")
    cid = unique("adm-oa")
    topic = unique("adm/oa")
    c = Client(admin, V5, client_id=cid)
    c.connect(username="oa")
    try:
        calls = [
            ("GET", "/healthz", None, None), ("GET", "/readyz", None, None), ("GET", "/metrics", None, None),
            ("GET", "/api/v1/openapi.json", None, None),
            ("GET", "/", None, None), ("GET", "/dashboard", None, None),
            ("GET", "/dashboard/{file}", "app.js", None), ("GET", "/dashboard/{file}", "style.css", None),
            ("GET", "/dashboard/{file}", "mqtt.min.js", None), ("GET", "/dashboard/{file}", "nope.js", None),
            ("GET", "/api/v1/clients", f"?prefix={q(cid)}", None), ("GET", "/api/v1/clients", "?limit=0", None),
            ("GET", "/api/v1/clients/{id}", q(cid), None), ("GET", "/api/v1/clients/{id}", "nobody", None),
            ("POST", "/api/v1/clients/{id}/subscriptions", q(cid), {"filter": topic, "qos": 1}),
            ("POST", "/api/v1/clients/{id}/subscriptions", q(cid), {"filter": topic, "qos": 0}),
            ("POST", "/api/v1/clients/{id}/subscriptions", q(cid), {"filter": "#/x"}),
            ("GET", "/api/v1/clients/{id}/subscriptions", q(cid), None),
            ("GET", "/api/v1/subscriptions", "", None),
            ("GET", "/api/v1/subscriptions", "?client_id=nobody", None),
            ("DELETE", "/api/v1/clients/{id}/subscriptions/{filter}", (q(cid), topic), None),
            ("DELETE", "/api/v1/clients/{id}/subscriptions/{filter}", (q(cid), topic), None),
            ("POST", "/api/v1/publish", None, {"topic": topic, "payload": "p", "retain": True, "qos": 1}),
            ("POST", "/api/v1/publish", None, {"topic": "$SYS/no", "payload": "p"}),
            ("POST", "/api/v1/publish", None, {"topic": "#"}),
            ("GET", "/api/v1/retained", f"?filter={q(topic)}", None),
            ("GET", "/api/v1/retained", "?filter=%23%2Fx", None),
            ("DELETE", "/api/v1/retained/{topic}", topic, None),
            ("DELETE", "/api/v1/retained/{topic}", topic, None),
            ("POST", "/api/v1/bans", None, {"target": f"user:{cid}", "duration": 100}),
            ("POST", "/api/v1/bans", None, {"target": "bad"}),
            ("GET", "/api/v1/bans", None, None),
            ("DELETE", "/api/v1/bans/{target}", f"user:{cid}", None),
            ("DELETE", "/api/v1/bans/{target}", f"user:{cid}", None),
            ("GET", "/api/v1/stats", None, None),
            ("POST", "/api/v1/reload", None, None),
            ("DELETE", "/api/v1/clients/{id}", q(cid), None), ("DELETE", "/api/v1/clients/{id}", "nobody", None),
        ]
        covered = set()
        for method, template, arg, body in calls:
            path = template
            if isinstance(arg, tuple):
                path = path.replace("{id}", arg[0]).replace("{filter}", arg[1])
            elif arg is not None and "{" in template:
                path = re.sub(r"\{[a-z]+\}", lambda _: arg, template)
            elif arg:
                path = template + arg
            status, answer, hdrs = http(admin, method, path, body=body)
            op = doc["paths"][template][method.lower()]
            covered.add((template, method.lower()))
            assert str(status) in op["responses"], f"{method} {path}: {status} not documented ({answer})"
            content = op["responses"][str(status)].get("content", {})
            if "application/json" in content:
                assert hdrs.get("Content-Type", "").startswith("application/json"), f"{method} {path}"
                check_schema(doc, content["application/json"]["schema"], answer, f"{method} {path} {status}")
            # the unauthenticated answer is documented too
            if op.get("security", doc["security"]):
                s401, a401, _ = http(admin, method, path, body=body, key=None)
                assert s401 == 401 and "401" in op["responses"], f"{method} {path}"
                check_schema(doc, op["responses"]["401"]["content"]["application/json"]["schema"], a401)
        documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
        assert documented == covered, f"documented but not exercised: {documented - covered}"
    finally:
        c.close()


def test_json_logs_have_a_line_per_connect_and_disconnect(tmp_path):
    b = start_millet(tmp_path, "--log-format", "json")
    try:
        b.key = (b.data_dir / "admin.token").read_text().strip()
        cid = unique("adm-log")
        c = Client(b, V5, client_id=cid)
        try:
            c.connect()
            assert http(b, "DELETE", f"/api/v1/clients/{q(cid)}")[0] == 200
            c.wait_disconnected()
        finally:
            c.close()

        def lines():
            out = []
            for line in b.log_path.read_text().splitlines():
                out.append(json.loads(line))  # every line is one JSON object
            return out
        wait_until(lambda: any("disconnected" in x["fields"].get("message", "") for x in lines()),
                   what="the disconnect line")
        mine = [x for x in lines() if cid in x["fields"].get("message", "")]
        connect = [x for x in mine if x["fields"]["message"].startswith("New client connected")]
        gone = [x for x in mine if "disconnected" in x["fields"]["message"]]
        assert len(connect) == 1 and connect[0]["level"] == "INFO" and "timestamp" in connect[0]
        assert len(gone) == 1 and gone[0]["fields"]["reason"] == "0x98" and gone[0]["fields"]["peer"].startswith("127.0.0.1:")
    finally:
        terminate(b.proc)


def test_bans_added_through_the_api_survive_a_restart(tmp_path):
    data = tmp_path / "data"
    b = start_millet(tmp_path, data_dir=data)
    try:
        b.key = (data / "admin.token").read_text().strip()
        assert http(b, "POST", "/api/v1/bans", body={"target": "client:kept", "duration": 3600})[0] == 201
        assert http(b, "POST", "/api/v1/bans", body={"target": "user:forever"})[0] == 201
        assert http(b, "POST", "/api/v1/bans", body={"target": "client:lifted"})[0] == 201
        assert http(b, "DELETE", "/api/v1/bans/client:lifted")[0] == 200
    finally:
        terminate(b.proc)
    b = start_millet(tmp_path, data_dir=data)
    try:
        b.key = (data / "admin.token").read_text().strip()
        bans = {x["target"]: x.get("expires_in") for x in http(b, "GET", "/api/v1/bans")[1]["data"]}
        assert set(bans) == {"client:kept", "user:forever"}, bans
        assert 3500 < bans["client:kept"] <= 3600 and bans["user:forever"] is None
        c = Client(b, V5, client_id="kept")
        try:
            assert c.connect(expect_rc=None).rc == 0x8A
        finally:
            c.close()
    finally:
        terminate(b.proc)
