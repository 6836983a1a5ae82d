"""The credential tools `millet passwd FILE USER` and `millet scram FILE USER`, run as the real
binary: what they write authenticates real clients (mosquitto_pub -u/-P for the password file,
the SCRAM-SHA-256 exchange over MQTT 5 AUTH for the SCRAM file), they say what they did, and on a
terminal (driven through a pseudo-terminal) they prompt twice without echo and write nothing when
the two passwords differ."""

from __future__ import annotations

import os
import pty
import select
import signal
import termios
import time
from pathlib import Path

import pytest

from conftest import _find_millet
from helpers import HOST, TIMEOUT, V311, unique, wait_until
from test_security import RC_NOT_AUTHORIZED, mosquitto, raw_connack, run, scram_connect

pytestmark = pytest.mark.millet_only("Millet's credential tools")


def tool(*args, input=None):
    """Run `millet ARGS...` with standard input not a terminal; returns the CompletedProcess."""
    return run([_find_millet(), *map(str, args)], input=input)


def ok(*args, input=None) -> str:
    r = tool(*args, input=input)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def broker_with(millet_config, pw: Path, creds: Path):
    return millet_config(f'[security.auth]\nchain = ["password_file"]\n'
                         f'[security.auth.password_file]\npath = "{pw}"\n'
                         f'[security.auth.scram]\npath = "{creds}"\n')


def test_scram_tool_writes_credentials_that_authenticate(millet_config, tmp_path):
    creds, pw = tmp_path / "scram", tmp_path / "passwd"
    ok("passwd", pw, "alice", "--password", "s3cret")
    assert ok("scram", creds, "carol", "--password", "pa55word") == \
        f"millet scram: added user carol to {creds}\n"
    assert ok("scram", creds, "dave", "--iterations", "8192", input=b"d4ve\n") == \
        f"millet scram: added user dave to {creds}\n"
    text = creds.read_text()
    assert "pa55word" not in text and "d4ve" not in text
    assert "dave:SCRAM-SHA-256$8192:" in text and "carol:SCRAM-SHA-256$4096:" in text
    assert os.stat(creds).st_mode & 0o777 == 0o600
    b = broker_with(millet_config, pw, creds)
    for user, password in [("carol", "pa55word"), ("dave", "d4ve")]:
        r, rc, _ = scram_connect(b, user, password)  # verifies the server signature on success
        r.close()
        assert rc == 0, (user, rc)
    for user, password in [("carol", "d4ve"), ("nobody", "pa55word")]:
        r, rc, _ = scram_connect(b, user, password)
        r.close()
        assert rc == RC_NOT_AUTHORIZED, (user, rc)
    # delete + SIGHUP: carol is refused, dave still gets in
    assert ok("scram", creds, "carol", "--delete") == f"millet scram: deleted user carol from {creds}\n"
    b.proc.send_signal(signal.SIGHUP)

    def carol_refused():
        r, rc, _ = scram_connect(b, "carol", "pa55word")
        r.close()
        return rc == RC_NOT_AUTHORIZED

    wait_until(carol_refused, what="carol refused after the reload")
    r, rc, _ = scram_connect(b, "dave", "d4ve")
    r.close()
    assert rc == 0


def test_passwd_tool_with_mosquitto_clients(millet_config, tmp_path):
    pub = mosquitto("mosquitto_pub")
    pw, creds = tmp_path / "passwd", tmp_path / "scram"
    ok("scram", creds, "carol", "--password", "pa55word")
    assert ok("passwd", pw, "alice", "--password", "s3cret") == f"millet passwd: added user alice to {pw}\n"
    b = broker_with(millet_config, pw, creds)
    common = [pub, "-h", HOST, "-p", str(b.port), "-t", unique("tools/"), "-m", "x", "-V", "mqttv311"]
    assert run([*common, "-u", "alice", "-P", "s3cret"]).returncode == 0
    assert run([*common, "-u", "alice", "-P", "n3w"]).returncode != 0
    # a new password from standard input (not a terminal), then SIGHUP
    assert ok("passwd", pw, "alice", input=b"n3w\n") == \
        f"millet passwd: updated the password of user alice in {pw}\n"
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: run([*common, "-u", "alice", "-P", "n3w"]).returncode == 0,
               what="the new password accepted after the reload")
    assert run([*common, "-u", "alice", "-P", "s3cret"]).returncode != 0


def test_tool_errors_write_nothing(tmp_path):
    f = tmp_path / "f"
    for args, input, expect in [
        (["passwd", f, "alice"], b"\n", "empty password"),
        (["scram", f, "alice", "--iterations", "10", "--password", "x"], None, "at least 4096"),
        (["passwd", f, "al:ice", "--password", "x"], None, "invalid username"),
        (["passwd", f, "alice", "--iterations", "5000"], None, "unknown option --iterations"),
        (["scram", f, "alice", "--delete"], None, "cannot read"),
    ]:
        r = tool(*args, input=input)
        assert r.returncode == 2, (args, r)
        assert r.stderr.decode().startswith(f"millet {args[0]}: ") and expect in r.stderr.decode(), r.stderr
        assert not f.exists(), args
    help_text = tool("--help").stdout.decode()
    assert "millet passwd FILE USER" in help_text and "millet scram FILE USER" in help_text


# ---------------------------------------------------------------------------
# Interactive: a pseudo-terminal
# ---------------------------------------------------------------------------


class Pty:
    """`millet ARGS...` with a pseudo-terminal as its controlling terminal and standard streams."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                os.execv(_find_millet(), [_find_millet(), *map(str, args)])
            finally:
                os._exit(127)
        self.out = b""

    def _read(self, deadline: float) -> bool:
        """Read what is there; False at end of output."""
        r, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.out += data
        return bool(data)

    def expect(self, text: bytes, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while text not in self.out:
            assert time.monotonic() < deadline and self._read(deadline), \
                f"{text!r} not shown; terminal so far: {self.out!r}"

    def type_hidden(self, line: str, timeout: float = TIMEOUT):
        """Type `line` + Enter once the terminal no longer echoes (the prompt is printed before
        echo is turned off: typing earlier would be echoed by the terminal itself)."""
        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.fd)[3] & termios.ECHO:
            assert time.monotonic() < deadline, f"echo never turned off; terminal: {self.out!r}"
            self._read(min(deadline, time.monotonic() + 0.01))
        os.write(self.fd, line.encode() + b"\r")

    def finish(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            assert time.monotonic() < deadline, f"still running; terminal: {self.out!r}"
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, "did not exit"
            time.sleep(0.01)  # polling the exit of a process that closed its terminal


def interactive(args, first: str, second: str) -> tuple[int, bytes]:
    t = Pty(*args)
    t.expect(b"Password: ")
    t.type_hidden(first)
    t.expect(b"Confirm password: ")
    t.type_hidden(second)
    return t.finish(), t.out


@pytest.mark.parametrize("kind", ["passwd", "scram"])
def test_interactive_prompt_mismatch_writes_nothing(tmp_path, kind):
    f = tmp_path / kind
    code, out = interactive([kind, f, "alice"], "s3cret-one", "s3cret-two")
    assert code == 2, out
    assert b"do not match; nothing written" in out, out
    assert b"s3cret" not in out, f"password echoed: {out!r}"
    assert not f.exists()


def test_interactive_prompt_without_echo_then_authenticate(millet_config, tmp_path):
    pw, creds = tmp_path / "passwd", tmp_path / "scram"
    code, out = interactive(["passwd", pw, "alice"], "s3cret", "s3cret")
    assert code == 0, out
    assert b"s3cret" not in out, f"password echoed: {out!r}"
    assert f"millet passwd: added user alice to {pw}".encode() in out, out
    code, out = interactive(["scram", creds, "carol"], "pa55word", "pa55word")
    assert code == 0, out
    assert b"pa55word" not in out, f"password echoed: {out!r}"
    assert f"millet scram: added user carol to {creds}".encode() in out, out
    b = broker_with(millet_config, pw, creds)
    assert raw_connack(b, V311, username="alice", password=b"s3cret") == 0
    assert raw_connack(b, V311, username="alice", password=b"wrong") == 4
    r, rc, _ = scram_connect(b, "carol", "pa55word")
    r.close()
    assert rc == 0
