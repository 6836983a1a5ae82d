"""What an operator meets on day one (issue 9): the connection log, errors that name the real
thing, TLS diagnostics, bans that reach live connections, plain logs. Each test starts its own
Millet (``millet_config``) and reads its log; clients are raw sockets, paho-mqtt and
mosquitto_pub / mosquitto_sub.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import _find_millet, free_port
from helpers import DISCONNECT, V311, V5, Client, unique, wait_until
from test_security import (HOST, RC_BANNED, mosquitto, passwd, pki, raw, raw_connack, run,  # noqa: F401
                           tls_section, write)

pytestmark = pytest.mark.millet_only("Millet's logs and configuration")


def start_fails(tmp_path: Path, config_text: str, *args: str) -> str:
    """Start Millet expecting it to refuse; return its stderr."""
    conf = write(tmp_path / "m.toml", config_text)
    r = run([_find_millet(), "--config", conf, "--data-dir", str(tmp_path / "d"),
             "--listen", f"{HOST}:{free_port()}", *args])
    assert r.returncode != 0, r
    return r.stderr.decode()


# ---------------------------------------------------------------------------
# The connection log
# ---------------------------------------------------------------------------


def test_connect_and_disconnect_are_logged_at_info_by_default(millet_config, tmp_path):
    """One line per connect, Mosquitto's shape `New client connected from IP:PORT as ID (p5, c1,
    k60, u'alice')` followed by the transport, and one per disconnect with its reason."""
    pub = mosquitto("mosquitto_pub")
    b = millet_config("")
    cid = unique("dev")
    r = run([pub, "-h", HOST, "-p", str(b.port), "-i", cid, "-u", "alice", "-V", "mqttv5", "-k", "45",
             "-t", "t", "-m", "x"])
    assert r.returncode == 0, r
    wait_until(lambda: f"Client {cid} disconnected" in b.log_text(), what="disconnect line")
    log = b.log_text()
    assert re.search(rf"INFO .*New client connected from 127\.0\.0\.1:\d+ as {cid} \(p5, c1, k45, u'alice'\) over tcp$",
                     log, re.M), log
    assert f"Client {cid} disconnected: client sent DISCONNECT" in log
    # a client that just goes away, over 3.1.1 without a username
    r3 = raw(b, V311)
    r3.connect("quiet-1", keepalive=30)
    r3.close()
    wait_until(lambda: "Client quiet-1 disconnected: connection closed by the client" in b.log_text(),
               what="peer close line")
    assert re.search(r"New client connected from 127\.0\.0\.1:\d+ as quiet-1 \(p4, c1, k30\) over tcp$", b.log_text(),
                     re.M)


def test_refused_authentications_name_the_username_and_client_id(millet_config, tmp_path):
    pw = str(tmp_path / "passwd")
    passwd(pw, "alice", "--password", "s3cret")
    b = millet_config(f'[security.auth.password_file]\npath = "{pw}"\n')
    assert raw_connack(b, V311, client_id="v3-dev", username="alice", password=b"wrong") == 4
    assert raw_connack(b, V5, client_id="v5-dev", username="mallory", password=b"x") == 0x86
    log = b.log_text()
    assert re.search(r'INFO .*authentication refused.*client_id=v3-dev.*username="?alice', log), log
    assert re.search(r'INFO .*authentication refused.*client_id=v5-dev.*username="?mallory', log), log


# ---------------------------------------------------------------------------
# Errors that name the real thing
# ---------------------------------------------------------------------------


def test_an_unknown_key_reads_naturally(tmp_path):
    err = start_fails(tmp_path, '[security.auth.jwtt]\nalgorithm = "HS256"\n')
    assert "unknown key `jwtt` in [security.auth]: did you mean `jwt`?" in err, err
    assert "default." not in err
    err = start_fails(tmp_path, '[security.tls]\ncert = "c"\nkey = "k"\ntls_listen = ["127.0.0.1:8883"]\n')
    assert "top-level keys go before the first [table]" in err, err


def test_a_missing_or_malformed_acl_file_is_named_once(tmp_path):
    missing = str(tmp_path / "nope.toml")
    err = start_fails(tmp_path, f'[security.acl]\nfile = "{missing}"\n')
    assert err.count(missing) == 1 and "No such file" in err, err
    bad = write(tmp_path / "acl.toml", "[[rules]]\npermission = 'maybe'\n")
    err = start_fails(tmp_path, f'[security.acl]\nfile = "{bad}"\n')
    assert err.count(bad) == 1, err


def test_a_key_that_does_not_match_the_certificate_names_both_files(tmp_path, pki):
    conf = (f'[security.tls]\ncert = "{pki["server.pem"]}"\nkey = "{pki["dev1.key"]}"\n')
    err = start_fails(tmp_path, conf, "--tls-listen", f"{HOST}:{free_port()}")
    assert pki["server.pem"] in err and pki["dev1.key"] in err, err


def test_an_invalid_log_filter_is_an_error(tmp_path):
    r = run([_find_millet(), "--log", "info,[[[", "--data-dir", str(tmp_path / "d"),
             "--listen", f"{HOST}:{free_port()}"])
    assert r.returncode == 2 and b"invalid --log" in r.stderr, r


def test_http_hook_failures_say_why(millet_config):
    # a port that is bound but not listening: connections to it are refused, and nobody
    # else can take it while the test runs
    with socket.socket() as held:
        held.bind((HOST, 0))
        dead = held.getsockname()[1]
        b = millet_config(f'[security.auth.http]\nurl = "http://{HOST}:{dead}/auth"\ntimeout_ms = 1000\n')
        assert raw_connack(b, V5, username="u", password=b"p") == 0x86
    wait_until(lambda: "HTTP auth hook failed" in b.log_text(), what="hook failure logged")
    line = next(l for l in b.log_text().splitlines() if "HTTP auth hook failed" in l)
    assert "cannot connect" in line and "Connection refused" in line, line


def test_a_non_mqtt_first_packet_is_logged_as_such(millet_config):
    b = millet_config("")
    with socket.create_connection((HOST, b.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100) == b""  # closed, nothing answered
    wait_until(lambda: "not MQTT: an HTTP request on the MQTT port" in b.log_text(), what="HTTP logged")
    assert b.alive()


def test_logs_are_plain_text_when_stderr_is_not_a_terminal(millet_config):
    b = millet_config("")
    raw_connack(b, V311)
    assert "\x1b[" not in b.log_text()


# ---------------------------------------------------------------------------
# TLS diagnostics
# ---------------------------------------------------------------------------


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def test_a_v1_client_certificate_is_logged_with_the_reason_once_a_minute(millet_config, tmp_path):
    """`openssl x509 -req` without an extensions file makes an X.509 v1 certificate: rustls
    refuses it (Mosquitto accepts it). The operator sees why, once per address per minute."""
    sub = mosquitto("mosquitto_sub")
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=Test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "v1.key", "-out", "v1.csr",
             "-subj", "/CN=dev-1", cwd=d)
    _openssl("x509", "-req", "-in", "v1.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "v1.pem", "-days", "2", cwd=d)  # no -extfile: version 1
    tls_port = free_port()
    b = millet_config(f'tls_listen = ["{HOST}:{tls_port}"]\n'
                      f'[security.tls]\ncert = "{d}/server.pem"\nkey = "{d}/server.key"\n'
                      f'ca = "{d}/ca.pem"\nrequire_client_cert = true\n')
    for _ in range(2):
        r = run([sub, "-h", HOST, "-p", str(tls_port), "--cafile", str(d / "ca.pem"), "--cert",
                 str(d / "v1.pem"), "--key", str(d / "v1.key"), "-t", "x", "-C", "1", "-W", "3"])
        assert r.returncode != 0
    wait_until(lambda: "client certificates must be v3" in b.log_text(), what="v1 certificate logged")
    lines = [l for l in b.log_text().splitlines() if "TLS handshake failed" in l]
    assert len(lines) == 1 and " INFO " in lines[0], lines  # once per address per minute
    assert "Illegal SNI" not in b.log_text()


# ---------------------------------------------------------------------------
# Bans reach live connections
# ---------------------------------------------------------------------------


def test_a_ban_added_at_run_time_disconnects_matching_live_clients(millet_config, tmp_path):
    bans = write(tmp_path / "bans", "")
    b = millet_config(f'[security.quota]\nbans_file = "{bans}"\n')
    v5 = raw(b, V5)
    v5.connect("doomed-5")
    v3 = raw(b, V311)
    v3.connect("doomed-3")
    # banned by username: the connection finds it in its session's details
    user = raw(b, V311)
    user.connect(unique("innocent-id"), username="mallory")
    other = Client(b, V5, client_id=unique("ok"))
    other.connect()
    try:
        Path(bans).write_text("client:doomed-5\nclient:doomed-3\nuser:mallory\n")
        b.proc.send_signal(signal.SIGHUP)
        seen = v5.wait_closed(timeout=10.0)
        # [MQTT-3.14.2.1]: 0x8A (Banned) is a CONNACK code; a DISCONNECT says 0x98
        # Administrative action (paho's v5 client cannot even parse 0x8A there).
        assert any(p.type == DISCONNECT and p.disconnect()[0] == 0x98 for p in seen), seen
        v3.wait_closed(timeout=10.0)
        user.wait_closed(timeout=10.0)
        assert raw_connack(b, V5, client_id="doomed-5") == RC_BANNED
        # negative: everyone else keeps their connection
        assert other.publish(unique("still/"), b"here", qos=1) in (0, 0x10)
    finally:
        other.close()
        v5.close()
        v3.close()
        user.close()
