"""`millet ctl`: the admin API from the command line, against a real broker
(its generated admin.token, found through --data-dir), with paho clients.
Human tables by default, --json for scripts, and exit codes that mean
something: 0 done, 1 refused, 2 usage, 3 unreachable, 4 not authorized.
"""

from __future__ import annotations

import json
import subprocess
import threading

import pytest

from conftest import IS_MOSQUITTO, _find_millet, free_port, terminate
from helpers import V5, V311, Client, unique
from test_admin import start_millet

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="millet_only: Mosquitto has no admin API")


@pytest.fixture(scope="module")
def ctlb(tmp_path_factory):
    b = start_millet(tmp_path_factory.mktemp("ctl"), "--no-ws")
    yield b
    terminate(b.proc)


def ctl(b, *args, token_from_dir=True, timeout=30):
    cmd = [_find_millet(), "ctl", "--url", f"http://{b.host}:{b.admin}"]
    if token_from_dir:
        cmd += ["--data-dir", str(b.data_dir)]
    cmd += list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def test_clients_table_json_and_kick(ctlb):
    cid = unique("ctl-dev")
    c = Client(ctlb, V5, client_id=cid)
    try:
        c.connect()
        code, out, err = ctl(ctlb, "clients", "--prefix", cid)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["CLIENT_ID", "CONNECTED", "USERNAME"], out
        assert any(l.split()[0] == cid and l.split()[1] == "true" for l in lines[1:]), out
        code, out, err = ctl(ctlb, "--json", "client", cid)
        assert code == 0, err
        assert json.loads(out)["client_id"] == cid
        code, out, err = ctl(ctlb, "kick", cid)
        assert code == 0, err
        assert "kicked: connection" in out, out
        c.wait_disconnected()
        code, out, _ = ctl(ctlb, "--json", "clients", "--prefix", cid, "--connected", "true")
        assert json.loads(out)["data"] == []
    finally:
        c.close()
    # Unknown client: refused by the broker (404) → exit 1.
    code, _, err = ctl(ctlb, "kick", unique("nobody"))
    assert code == 1 and "404" in err, err


def test_subscribe_on_behalf_publish_and_watch(ctlb):
    cid = unique("ctl-sub")
    topic = unique("ctl/t")
    c = Client(ctlb, V311, client_id=cid, clean_session=False)
    try:
        c.connect()
        code, out, err = ctl(ctlb, "subscribe", cid, topic, "--qos", "1")
        assert code == 0, err
        code, out, err = ctl(ctlb, "subscriptions", cid)
        assert code == 0 and topic in out, out + err
        # `watch` is an MQTT subscriber of its own: started first, then a
        # publish through the API reaches both it and the client.
        watch = subprocess.Popen(
            [_find_millet(), "ctl", "--data-dir", str(ctlb.data_dir), "--json", "watch", topic,
             "--mqtt", f"{ctlb.host}:{ctlb.port}", "--count", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Publish until the watcher has subscribed (its SUBACK is not visible
        # here); each publish says how many sessions it reached.
        deadline = threading.Event()
        for _ in range(100):
            code, out, err = ctl(ctlb, "--json", "publish", topic, "héllo", "--qos", "1")
            assert code == 0, err
            if json.loads(out)["sessions"] >= 2:
                break
            deadline.wait(0.05)
        got, werr = watch.communicate(timeout=30)
        assert watch.returncode == 0, werr
        line = json.loads(got.splitlines()[0])
        assert line["topic"] == topic and line["payload"] == "héllo", got
        assert c.messages.wait_for(1)[-1].payload == "héllo".encode()
        code, _, err = ctl(ctlb, "unsubscribe", cid, topic)
        assert code == 0, err
    finally:
        c.close()


def test_retained_bans_stats_and_exit_codes(ctlb):
    topic = unique("ctl/ret")
    assert ctl(ctlb, "publish", topic, "kept", "--retain")[0] == 0
    code, out, err = ctl(ctlb, "retained")
    assert code == 0 and topic in out, out + err
    code, out, err = ctl(ctlb, "retained", "--delete", topic)
    assert code == 0, err
    target = f"client:{unique('ctl-banned')}"
    assert ctl(ctlb, "ban", target, "--for", "60")[0] == 0
    code, out, _ = ctl(ctlb, "bans")
    assert target in out, out
    assert ctl(ctlb, "unban", target)[0] == 0
    code, out, err = ctl(ctlb, "--json", "stats")
    assert code == 0 and "connections" in json.loads(out)["node"], out + err
    # A bad target: refused (400) → 1.
    assert ctl(ctlb, "ban", "nonsense")[0] == 1
    # Usage → 2; a wrong token → 4; nothing listening → 3.
    assert ctl(ctlb, "frobnicate")[0] == 2
    code, _, err = ctl(ctlb, "--token", "wrong-token-0123456789", "stats", token_from_dir=False)
    assert code == 4, err
    dead = free_port()
    r = subprocess.run([_find_millet(), "ctl", "--url", f"http://127.0.0.1:{dead}", "--token", "x", "stats"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stderr
