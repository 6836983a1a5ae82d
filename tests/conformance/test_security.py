"""Security over real sockets: TLS (1.2 / 1.3, mTLS, certificate identity), the
authentication chain (password file + ``millet passwd``, device signatures, JWT, HTTP
hook, SCRAM-SHA-256 over AUTH), ACLs and their reload, bans, quotas, the default
posture, and hostile input (slowloris, SUBSCRIBE floods, deep / long topics, huge
property blocks, many maximum-size packets).

Each test starts its own Millet from a generated TOML file (``millet_config``); the
PKI (a CA, a server certificate for 127.0.0.1, client certificates and a rogue CA) is
generated at run time with ``cryptography``. ``mosquitto_pub`` / ``mosquitto_sub``
(Debian: mosquitto-clients) act as independent TLS clients.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import _find_millet, free_port
from helpers import (AUTH, CONNACK, DISCONNECT, P_AUTH_DATA, P_AUTH_METHOD, P_USER_PROPERTY,
                     PINGREQ_PACKET, PINGRESP, PUBACK, PUBREC, SUBACK, TIMEOUT, V311, V5, Client,
                     RawClient, _Reader, connect_packet, enc_props, packet, publish_packet,
                     subscribe_packet, unique, wait_until)

pytestmark = pytest.mark.millet_only("Millet's security configuration")

Target = namedtuple("Target", "host port")
HOST = "127.0.0.1"
# Not authorized / bad user name or password / banned / quota exceeded
RC_NOT_AUTHORIZED, RC_BAD_CREDENTIALS, RC_BANNED, RC_QUOTA = 0x87, 0x86, 0x8A, 0x97


# ---------------------------------------------------------------------------
# PKI
# ---------------------------------------------------------------------------


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _pem_cert(c) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _ca(cn: str):
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _issue(ca, cn: str, server: bool):
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        san = [x509.DNSName(f"{cn}.devices.test")]
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = _ca("Millet Test CA")
    rogue = _ca("Rogue CA")
    files = {}

    def write(name, data: bytes):
        p = d / name
        p.write_bytes(data)
        files[name] = str(p)

    write("ca.pem", _pem_cert(ca[0]))
    for name, issuer, cn, server in [("server", ca, "localhost", True), ("dev1", ca, "dev-1", False),
                                     ("rogue", rogue, "dev-1", False)]:
        c, k = _issue(issuer, cn, server)
        write(f"{name}.pem", _pem_cert(c))
        write(f"{name}.key", _pem_key(k))
    return files


def tls_section(pki, ca=False, require=False, identity_as="none") -> str:
    s = f'[security.tls]\ncert = "{pki["server.pem"]}"\nkey = "{pki["server.key"]}"\n'
    if ca:
        s += f'ca = "{pki["ca.pem"]}"\n'
    s += f'require_client_cert = {"true" if require else "false"}\nidentity_as = "{identity_as}"\n'
    return s


def client_ctx(pki, cert: str | None = None, version: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca.pem"])
    if version == "1.2":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if cert:
        ctx.load_cert_chain(pki[f"{cert}.pem"], pki[f"{cert}.key"])
    return ctx


class TlsRaw(RawClient):
    """RawClient over TLS (the handshake happens in the constructor)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, version=V311, timeout: float = TIMEOUT):
        self.broker = Target(HOST, port)
        self.version = version
        raw = socket.create_connection((HOST, port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=HOST)
        self.buf = bytearray()
        self.closed = False
        self._pid = itertools.count(1)
        self.pending = []

    def _fill(self, deadline: float) -> bool:
        try:
            return super()._fill(deadline)
        except ssl.SSLError:
            self.closed = True
            return False


def tls_refused(port: int, ctx: ssl.SSLContext, version=V311) -> bool:
    """True if no MQTT session can be opened: the handshake fails or the server closes
    (with TLS 1.3 a refused client certificate shows up only at the first read)."""
    try:
        c = TlsRaw(port, ctx, version)
    except (ssl.SSLError, OSError):
        return True
    try:
        c.send(connect_packet(version, unique("t")))
        try:
            p = c.recv()
        except (ssl.SSLError, OSError):
            return True
        return p is None
    finally:
        c.close()


def paho_tls(port: int, pki, version=V5, cert: str | None = None, **kw) -> Client:
    c = Client(Target(HOST, port), version, **kw)
    if cert:
        c.c.tls_set(ca_certs=pki["ca.pem"], certfile=pki[f"{cert}.pem"], keyfile=pki[f"{cert}.key"])
    else:
        c.c.tls_set(ca_certs=pki["ca.pem"])
    return c


@pytest.fixture
def closing():
    made = []

    def track(c):
        made.append(c)
        return c

    yield track
    for c in made:
        c.close()


def raw(broker, version=V311) -> RawClient:
    return RawClient(Target(broker.host, broker.port), version)


def raw_connack(broker, version=V311, client_id=None, **kw) -> int:
    """Open a raw connection, send CONNECT, return the CONNACK code (then close)."""
    r = raw(broker, version)
    try:
        return r.connect(client_id or unique("r"), expect_rc=None, **kw).rc
    finally:
        r.close()


def mosquitto(tool: str) -> str:
    exe = shutil.which(tool)
    if not exe:
        pytest.skip(f"{tool} not installed (Debian package mosquitto-clients)")
    return exe


def run(cmd, timeout=20.0, input=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_handshake_and_mqtt_over_tls(millet_config, pki, version):
    b = millet_config(tls_section(pki), tls=True)
    c = TlsRaw(b.tls_port, client_ctx(pki, version=version))
    try:
        assert c.sock.version() == f"TLSv{version}"
        c.connect()
        topic = unique("tls/")
        c.subscribe([(topic, 1)])
        c.publish(topic, b"over tls", qos=1)
        assert c.recv_publish().payload == b"over tls"
    finally:
        c.close()
    assert "listening for MQTT over TLS" in b.log_text()


def test_plain_tcp_client_to_the_tls_port_fails(millet_config, pki):
    b = millet_config(tls_section(pki), tls=True)
    r = RawClient(Target(HOST, b.tls_port), V311)
    try:
        r.send(connect_packet(V311, unique("plain")))
        try:
            seen = r.wait_closed()
        except ValueError:
            seen = []  # a TLS alert parsed as garbage
        assert not any(p.type == CONNACK for p in seen), seen
    finally:
        r.close()


@pytest.mark.parametrize("version", ["tlsv1.2", "tlsv1.3"])
def test_mosquitto_clients_over_tls(millet_config, pki, version):
    pub, sub = mosquitto("mosquitto_pub"), mosquitto("mosquitto_sub")
    b = millet_config(tls_section(pki), tls=True)
    topic = unique("mosq/tls/")
    common = ["-h", HOST, "-p", str(b.tls_port), "--cafile", pki["ca.pem"], "--tls-version", version]
    r = run([pub, *common, "-t", topic, "-m", "hello-tls", "-r", "-q", "1"])
    assert r.returncode == 0, r.stderr
    r = run([sub, *common, "-t", topic, "-C", "1", "-W", "10"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"hello-tls"
    # negative: with another trust anchor the server certificate is not trusted
    r = run([pub, "-h", HOST, "-p", str(b.tls_port), "--cafile", pki["dev1.pem"], "-t", topic, "-m", "x"])
    assert r.returncode != 0


def test_mtls_required_refuses_clients_without_a_valid_certificate(millet_config, pki):
    b = millet_config(tls_section(pki, ca=True, require=True), tls=True)
    assert tls_refused(b.tls_port, client_ctx(pki))  # no certificate
    assert tls_refused(b.tls_port, client_ctx(pki, cert="rogue"))  # untrusted issuer
    c = TlsRaw(b.tls_port, client_ctx(pki, cert="dev1"))
    try:
        assert c.connect().rc == 0
    finally:
        c.close()


def test_mtls_with_mosquitto_clients(millet_config, pki):
    pub = mosquitto("mosquitto_pub")
    b = millet_config(tls_section(pki, ca=True, require=True), tls=True)
    common = ["-h", HOST, "-p", str(b.tls_port), "--cafile", pki["ca.pem"], "-t", unique("m/"), "-m", "x"]
    r = run([pub, *common, "--cert", pki["dev1.pem"], "--key", pki["dev1.key"]])
    assert r.returncode == 0, r.stderr
    r = run([pub, *common])
    assert r.returncode != 0


def test_certificate_cn_as_username_drives_the_acl(millet_config, pki, tmp_path, closing):
    acl = write(tmp_path / "acl.toml", """
[[rules]]
permission = "allow"
action = "all"
topics = ["devices/%u/#"]
""")
    conf = (tls_section(pki, ca=True, require=False, identity_as="username")
            + f'[security.auth]\nchain = ["tls_cert"]\n[security.acl]\nfile = "{acl}"\n')
    b = millet_config(conf, tls=True)
    c = closing(paho_tls(b.tls_port, pki, cert="dev1"))
    c.connect()
    assert c.subscribe("devices/dev-1/#", 1) == [1]
    assert c.subscribe("devices/dev-2/#", 1) == [RC_NOT_AUTHORIZED]
    assert c.publish("devices/dev-1/temp", b"21", qos=1) in (0, 0x10)
    assert c.publish("devices/dev-2/temp", b"21", qos=1) == RC_NOT_AUTHORIZED
    assert c.messages.wait_topic("devices/dev-1/temp")[0].payload == b"21"
    # negative: a client without a certificate is not authenticated by tls_cert
    n = closing(paho_tls(b.tls_port, pki))
    assert n.connect(expect_rc=None).rc == RC_NOT_AUTHORIZED


# ---------------------------------------------------------------------------
# Password file and `millet passwd`
# ---------------------------------------------------------------------------


def passwd(path: str, user: str, *args, input=None):
    r = run([_find_millet(), "passwd", path, user, *args], input=input)
    assert r.returncode == 0, r.stderr
    return r


def password_broker(millet_config, tmp_path, extra="", **kw):
    pw = str(tmp_path / "passwd")
    passwd(pw, "alice", "--password", "s3cret")
    passwd(pw, "bob", input=b"hunter2\n")  # from standard input
    conf = f'[security.auth]\nchain = ["password_file"]\n[security.auth.password_file]\npath = "{pw}"\n' + extra
    return millet_config(conf, **kw), pw


def test_password_file_allow_and_refusals(millet_config, tmp_path, closing):
    b, pw = password_broker(millet_config, tmp_path)
    assert Path(pw).read_text().count("$argon2id$") == 2
    assert raw_connack(b, V311, username="alice", password=b"s3cret") == 0
    assert raw_connack(b, V311, username="bob", password=b"hunter2") == 0
    assert raw_connack(b, V311, username="alice", password=b"wrong") == 4
    assert raw_connack(b, V311, username="nobody", password=b"s3cret") == 4
    assert raw_connack(b, V311) == 5  # no credentials on an authenticated listener
    assert raw_connack(b, V5, username="alice", password=b"wrong") == RC_BAD_CREDENTIALS
    c = closing(Client(b, V5))
    c.c.username_pw_set("alice", "s3cret")
    c.connect()
    # `millet passwd --delete` + SIGHUP: bob is gone
    passwd(pw, "bob", "--delete")
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: raw_connack(b, V311, username="bob", password=b"hunter2") == 4,
               what="bob refused after the reload")
    assert b.alive()


def test_a_configured_password_file_is_enforced_without_a_chain(millet_config, tmp_path):
    """Issue 9, defect 1: `[security.auth.password_file]` without `chain = [...]` used to start
    "anonymous clients allowed" and accept a wrong password. The README's config, verbatim."""
    pub = mosquitto("mosquitto_pub")
    pw = str(tmp_path / "passwd")
    passwd(pw, "alice", "--password", "s3cret")
    b = millet_config(f'listen = ["127.0.0.1:{{PORT}}"]\n[security.auth.password_file]\npath = "{pw}"\n')
    assert "authentication required (chain: password_file)" in b.log_text()
    common = [pub, "-h", HOST, "-p", str(b.port), "-t", unique("pw/"), "-m", "x"]
    assert run([*common, "-u", "alice", "-P", "WRONG"]).returncode != 0
    assert run([*common]).returncode != 0  # anonymous
    assert run([*common, "-u", "alice", "-P", "s3cret"]).returncode == 0
    assert raw_connack(b, V5, username="alice", password=b"WRONG") == RC_BAD_CREDENTIALS
    assert raw_connack(b, V5) == RC_NOT_AUTHORIZED


def test_a_provider_left_out_of_the_chain_is_a_startup_error(tmp_path):
    pw = tmp_path / "passwd"
    pw.write_text("")
    conf = write(tmp_path / "m.toml", f'[security.auth]\nchain = ["jwt"]\n[security.auth.jwt]\n'
                                      f'algorithm = "HS256"\nsecret = "k"\n'
                                      f'[security.auth.password_file]\npath = "{pw}"\n')
    r = run([_find_millet(), "--config", conf, "--data-dir", str(tmp_path / "d"),
             "--listen", "127.0.0.1:0"])
    assert r.returncode != 0
    assert b'[security.auth.password_file] is configured but security.auth.chain does not list' in r.stderr


def test_scram_alone_makes_loopback_authenticated(millet_config, tmp_path):
    creds = write(tmp_path / "scram", scram_line("alice", "pw") + "\n")
    b = millet_config(f'[security.auth.scram]\npath = "{creds}"\n')
    assert raw_connack(b, V311) == 5
    assert raw_connack(b, V5) == RC_NOT_AUTHORIZED


def test_password_file_with_mosquitto_clients(millet_config, tmp_path):
    pub = mosquitto("mosquitto_pub")
    b, _ = password_broker(millet_config, tmp_path)
    common = [pub, "-h", HOST, "-p", str(b.port), "-t", unique("pw/"), "-m", "x", "-V", "mqttv311"]
    assert run([*common, "-u", "alice", "-P", "s3cret"]).returncode == 0
    assert run([*common, "-u", "alice", "-P", "nope"]).returncode != 0


# ---------------------------------------------------------------------------
# Device signatures, JWT, HTTP hook
# ---------------------------------------------------------------------------


def test_device_signature_allow_and_replay_refused(millet_config, tmp_path):
    secrets = write(tmp_path / "secrets.toml", '[devices]\n"sensor-42" = "s3cr3t"\n')
    b = millet_config(f'[security.auth]\nchain = ["signature"]\n[security.auth.signature]\n'
                      f'secrets = "{secrets}"\nwindow_secs = 60\n')

    def signed(client_id, ts_ms, secret="s3cr3t"):
        user = f"sensor-42|pk|{ts_ms}"
        content = f"clientId{client_id}deviceNamesensor-42productKeypktimestamp{ts_ms}"
        pw = hmac.new(secret.encode(), content.encode(), hashlib.sha256).hexdigest()
        return user, pw.encode()

    now_ms = int(time.time() * 1000)
    u, p = signed("sensor-42", now_ms)
    assert raw_connack(b, V311, client_id="sensor-42", username=u, password=p) == 0
    u, p = signed("sensor-42", now_ms - 3_600_000)  # an old (replayed) signature
    assert raw_connack(b, V311, client_id="sensor-42", username=u, password=p) == 4
    u, p = signed("sensor-42", now_ms, secret="wrong")
    assert raw_connack(b, V5, client_id="sensor-42", username=u, password=p) == RC_BAD_CREDENTIALS


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(secret: str, claims: dict) -> str:
    h = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    p = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64url(sig)}"


def test_jwt_allow_expired_and_claims(millet_config, closing):
    b = millet_config('[security.auth]\nchain = ["jwt"]\n[security.auth.jwt]\n'
                      'algorithm = "HS256"\nsecret = "jwt-secret"\n')
    now = int(time.time())
    token = jwt_hs256("jwt-secret", {"exp": now + 300, "sub": "device", "publish": ["jwt/%c/#"],
                                     "subscribe": ["jwt/#"]})
    cid = unique("j")
    c = closing(Client(b, V5, client_id=cid))
    c.c.username_pw_set("device", token)
    c.connect()
    assert c.subscribe("jwt/#", 1) == [1]
    assert c.subscribe("other/#", 1) == [RC_NOT_AUTHORIZED]
    assert c.publish(f"jwt/{cid}/t", b"mine", qos=1) == 0
    assert c.publish("jwt/someone-else/t", b"theirs", qos=1) == RC_NOT_AUTHORIZED
    c.messages.wait_topic(f"jwt/{cid}/t")
    c.messages.assert_no_more(1)
    expired = jwt_hs256("jwt-secret", {"exp": now - 600})
    assert raw_connack(b, V311, username="device", password=expired.encode()) == 4
    forged = jwt_hs256("not-the-secret", {"exp": now + 300})
    assert raw_connack(b, V5, username="device", password=forged.encode()) == RC_BAD_CREDENTIALS


@pytest.mark.parametrize("exp", [2**53, 2**63 - 1, 18446744073709551615])
def test_jwt_with_a_huge_exp_does_not_crash_the_connection(millet_config, closing, exp):
    """A validly signed token with an `exp` centuries ahead (up to u64::MAX) is accepted and the
    connection works: its deadline is computed with checked arithmetic and capped (it used to
    overflow `Instant + Duration` and panic the connection task before the CONNACK went out)."""
    b = millet_config('[security.auth]\nchain = ["jwt"]\n[security.auth.jwt]\n'
                      'algorithm = "HS256"\nsecret = "jwt-secret"\n')
    token = jwt_hs256("jwt-secret", {"exp": exp, "sub": "device"})  # sub: valid under any bind
    for version in (V311, V5):
        c = closing(Client(b, version))
        c.c.username_pw_set("device", token)
        c.connect()
        c.subscribe("huge/exp", 1)
        c.publish("huge/exp", b"ok", qos=1)
        assert c.messages.wait_topic("huge/exp")[0].payload == b"ok"
        c.disconnect()


def test_jwt_token_cannot_borrow_another_usernames_acl(millet_config, tmp_path, closing):
    """Issue 9, defect 2: the identity a token proves is the identity the ACL sees. A valid
    token for sensor-1 presented with username `ops` is refused (0x86 / 3.x: 4) instead of
    getting ops's rules; the same token under its own name is confined to its claims."""
    acl = write(tmp_path / "acl.toml", '[[rules]]\npermission = "allow"\naction = "all"\n'
                                       'username = "ops"\ntopics = ["admin/#"]\n')
    conf = (f'[security.acl]\nfile = "{acl}"\n[security.auth.jwt]\nalgorithm = "HS256"\n'
            'secret = "jwt-secret"\n')
    b = millet_config(conf)
    token = jwt_hs256("jwt-secret", {"exp": int(time.time()) + 300, "sub": "sensor-1",
                                     "publish": ["sensors/sensor-1/#"]}).encode()
    assert raw_connack(b, V5, username="ops", password=token) == RC_BAD_CREDENTIALS
    assert raw_connack(b, V311, username="ops", password=token) == 4
    assert "the token was issued for another identity" in b.log_text()
    # negative: under its own name the token works, within its claims only
    c = closing(Client(b, V5, client_id=unique("s1")))
    c.c.username_pw_set("sensor-1", token.decode())
    c.connect()
    assert c.publish("sensors/sensor-1/t", b"ok", qos=1) in (0, 0x10)  # 0x10: no subscribers
    assert c.publish("admin/x", b"no", qos=1) == RC_NOT_AUTHORIZED
    # the unbound mode is an explicit, warned-about choice
    u = millet_config(conf + 'bind = "none"\n')
    assert 'bind = "none"' in u.log_text() and "WARN" in u.log_text()
    o = closing(Client(u, V5, client_id=unique("ops")))
    o.c.username_pw_set("ops", token.decode())
    o.connect()
    assert o.publish("admin/x", b"as documented", qos=1) in (0, 0x10)


def test_jwt_expiry_closes_the_connection(millet_config):
    """A connection authenticated by a JWT is closed (v5 DISCONNECT 0x87) when the token's exp
    (plus the leeway) passes; one whose token is still valid stays."""
    b = millet_config('[security.auth]\nchain = ["jwt"]\n[security.auth.jwt]\n'
                      'algorithm = "HS256"\nsecret = "jwt-secret"\nleeway_secs = 0\n')
    now = int(time.time())
    short = raw(b, V5)
    long = raw(b, V5)
    try:
        short.connect(username="device", password=jwt_hs256("jwt-secret", {"exp": now + 2, "sub": "device"}).encode())
        long.connect(username="device", password=jwt_hs256("jwt-secret", {"exp": now + 600, "sub": "device"}).encode())
        seen = short.wait_closed(timeout=10.0)
        assert any(p.type == DISCONNECT and p.disconnect()[0] == RC_NOT_AUTHORIZED for p in seen), seen
        # negative: the long-lived token's connection is still served
        long.send(PINGREQ_PACKET)
        long.expect(PINGRESP)
    finally:
        short.close()
        long.close()


def _json_reply(handler, obj) -> None:
    out = json.dumps(obj).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(out)))
    handler.end_headers()
    handler.wfile.write(out)


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        ok = body.get("password") == "letmein"
        _json_reply(self, {"result": "allow", "publish": ["hook/#"]} if ok else {"result": "deny"})

    def log_message(self, *a):
        pass


def test_http_hook_allow_deny_and_fail_closed(millet_config, closing):
    srv = http.server.ThreadingHTTPServer((HOST, 0), _Hook)
    srv.requests = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://{HOST}:{srv.server_address[1]}/auth"
        b = millet_config(f'[security.auth]\nchain = ["http"]\n[security.auth.http]\nurl = "{url}"\n'
                          'timeout_ms = 1000\ncache_ttl_secs = 0\n')
        c = closing(Client(b, V5))
        c.c.username_pw_set("u1", "letmein")
        c.connect()
        assert c.publish("hook/a", b"x", qos=1) in (0, 0x10)
        assert c.publish("elsewhere", b"x", qos=1) == RC_NOT_AUTHORIZED
        assert raw_connack(b, V311, username="u1", password=b"wrong") == 4
        assert any(r["username"] == "u1" and r["protocol"] == 5 for r in srv.requests)
    finally:
        srv.shutdown()
        srv.server_close()
    # the hook is down: fail closed
    assert raw_connack(b, V311, username="u1", password=b"letmein") == 4
    assert raw_connack(b, V5, username="u1", password=b"letmein") == RC_BAD_CREDENTIALS


class _Authz(http.server.BaseHTTPRequestHandler):
    """An HTTP authorization service: allow under ok/, deny under no/,
    ignore (the local ACL decides) elsewhere; slow/ answers after 300 ms."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        topic = body["topic"]
        if "slow/" in topic:
            time.sleep(0.3)
        result = "allow" if "ok/" in topic else "deny" if "no/" in topic else "ignore"
        _json_reply(self, {"result": result})

    def log_message(self, *a):
        pass


def test_http_authorization_hook(millet_config, tmp_path, closing):
    """[security.acl.http]: every PUBLISH, SUBSCRIBE filter and will topic is
    asked of an HTTP service (answers cached); the connection waits for the
    answer with its later packets held in order; `ignore` falls back to the
    ACL file; a service that is down denies (fail closed)."""
    srv = http.server.ThreadingHTTPServer((HOST, 0), _Authz)
    srv.requests = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    acl = write(tmp_path / "acl.toml", '[[rules]]\npermission = "allow"\naction = "publish"\ntopics = ["local/#"]\n'
                '[[rules]]\npermission = "allow"\naction = "subscribe"\ntopics = ["#"]\n')
    url = f"http://{HOST}:{srv.server_address[1]}/authz"
    try:
        b = millet_config(f'[security.acl]\nfile = "{acl}"\n[security.acl.http]\nurl = "{url}"\n'
                          'timeout_ms = 1000\ncache_ttl_secs = 60\n')
        w = closing(Client(b, V5, client_id="authz-watcher"))
        w.connect()
        # subscribe: ok/ allowed by the service, no/ denied, x/ ignored -> ACL allows
        assert w.subscribe("ok/#", 1) == [1]
        assert w.subscribe("no/#", 1) == [RC_NOT_AUTHORIZED]
        assert w.subscribe("local/#", 1) == [1]
        assert w.subscribe("other/#", 1) == [1]
        p = closing(Client(b, V5, client_id="authz-dev"))
        p.connect(username="dev")
        assert p.publish("ok/a", b"1", qos=1) == 0
        assert p.publish("no/a", b"2", qos=1) == RC_NOT_AUTHORIZED
        assert p.publish("local/a", b"3", qos=1) == 0  # ignore -> the ACL file allows
        assert p.publish("other/a", b"4", qos=1) == RC_NOT_AUTHORIZED  # ignore -> the ACL denies
        got = w.messages.wait_for(2)
        assert [(m.topic, m.payload) for m in got] == [("ok/a", b"1"), ("local/a", b"3")]
        asked = [(r["access"], r["topic"], r["client_id"], r["username"]) for r in srv.requests]
        assert ("publish", "ok/a", "authz-dev", "dev") in asked
        assert ("subscribe", "no/#", "authz-watcher", None) in asked
        # cached: the same publish again does not ask
        n = len(srv.requests)
        assert p.publish("ok/a", b"5", qos=1) == 0
        assert len(srv.requests) == n
        # a slow answer holds the client's later publishes behind it, in order
        slow = [b"s0", b"s1", b"s2"]
        for i, payload in enumerate(slow):
            p.publish("ok/slow/0" if i == 0 else f"ok/b{i}", payload, qos=0, wait=False)
        got = w.messages.wait_for(3, pred=lambda m: m.payload in slow)
        assert [m.payload for m in got] == slow
        # a will topic the service denies refuses the CONNECT
        d = closing(Client(b, V5, client_id="authz-will"))
        assert d.connect(will={"topic": "no/will", "payload": b"x"}, expect_rc=None).rc == RC_NOT_AUTHORIZED
    finally:
        srv.shutdown()
        srv.server_close()
    # the service is down: what is not cached is denied
    q = closing(Client(b, V5, client_id="authz-after"))
    q.connect(username="dev")
    assert q.publish("ok/new", b"x", qos=1) == RC_NOT_AUTHORIZED


# ---------------------------------------------------------------------------
# ACL
# ---------------------------------------------------------------------------

ACL_RULES = """
[[rules]]
permission = "allow"
action = "subscribe"
client_id = "watcher"
topics = ["#"]

[[rules]]
permission = "deny"
action = "publish"
topics = ["up/%c/secret"]

[[rules]]
permission = "allow"
action = "publish"
topics = ["up/%c/#"]

[[rules]]
permission = "allow"
action = "subscribe"
topics = ["{SUB}/#"]
"""


def acl_broker(millet_config, tmp_path, sub="down", extra=""):
    acl = write(tmp_path / "acl.toml", ACL_RULES.replace("{SUB}", sub))
    return millet_config(f'[security.acl]\nfile = "{acl}"\n' + extra), acl


def test_acl_publish_deny(millet_config, tmp_path, closing):
    b, _ = acl_broker(millet_config, tmp_path)
    w = closing(Client(b, V5, client_id="watcher"))
    w.connect()
    assert w.subscribe("#", 1) == [1]
    p = closing(Client(b, V5, client_id="dev5"))
    p.connect()
    assert p.publish("up/dev5/t", b"ok", qos=1) == 0
    assert p.publish("up/other/t", b"no", qos=1) == RC_NOT_AUTHORIZED
    p.publish("up/other/t", b"no", qos=0)
    r = closing(raw(b, V5))
    r.connect("dev5b")
    r.send(publish_packet("up/dev5b/secret", b"no", qos=2, pid=5, version=V5))  # deny rule first
    assert r.expect(PUBREC).ack()[:2] == (5, RC_NOT_AUTHORIZED)
    # 3.1.1 (v3_deny_action = drop): acknowledged, dropped, still connected
    p3 = closing(Client(b, V311, client_id="dev3"))
    p3.connect()
    p3.publish("up/other/t", b"no", qos=1)
    p3.publish("up/other/t", b"no", qos=2)
    assert p3.publish("up/dev3/t", b"ok3", qos=1) == 0
    w.messages.wait_for(2)
    got = w.messages.assert_no_more(2)
    assert sorted(m.payload for m in got) == [b"ok", b"ok3"]


def test_acl_v3_deny_action_disconnect(millet_config, tmp_path):
    b, _ = acl_broker(millet_config, tmp_path, extra='v3_deny_action = "disconnect"\n')
    r = raw(b, V311)
    try:
        r.connect("dev3")
        r.send(publish_packet("up/other/t", b"x", qos=1, pid=1))
        assert not any(p.type == PUBACK for p in r.wait_closed())
    finally:
        r.close()


def test_acl_subscribe_deny_v5_and_v3(millet_config, tmp_path, closing):
    b, _ = acl_broker(millet_config, tmp_path)
    r5 = closing(raw(b, V5))
    r5.connect("s5")
    assert r5.subscribe([("down/x", 1), ("up/#", 1), ("$share/g/down/y", 0)]) == [1, RC_NOT_AUTHORIZED, 0]
    r3 = closing(raw(b, V311))
    r3.connect("s3")
    assert r3.subscribe([("down/x", 1), ("secret/#", 0)]) == [1, 0x80]


def test_acl_reload_on_sighup_and_on_file_change(millet_config, tmp_path):
    b, acl = acl_broker(millet_config, tmp_path, sub="down")

    def code(f):
        r = raw(b, V5)
        try:
            r.connect()
            return r.subscribe([(f, 0)])[0]
        finally:
            r.close()

    assert code("b/x") == RC_NOT_AUTHORIZED
    Path(acl).write_text(ACL_RULES.replace("{SUB}", "b"))
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: code("b/x") == 0, what="rules reloaded on SIGHUP")
    assert code("down/x") == RC_NOT_AUTHORIZED
    # one line saying what was reloaded, not a cascade [issue 9, item 9]
    # (the file poller may also have seen the change first: then two such lines, each one line)
    wait_until(lambda: f"security reload (SIGHUP): acl {acl} (" in b.log_text(), what="SIGHUP reload logged")
    reloads = [l for l in b.log_text().splitlines() if "reload" in l.lower()]
    assert 1 <= len(reloads) <= 2 and all("security reload (" in l for l in reloads), reloads
    # file change alone (polled): only the changed part is reloaded
    Path(acl).write_text(ACL_RULES.replace("{SUB}", "ccc"))
    wait_until(lambda: code("ccc/x") == 0, what="rules reloaded on file change")
    wait_until(lambda: "security reload (files changed): acl" in b.log_text(), what="file-change reload logged")
    # a broken file keeps the rules in force; the error names the file once
    Path(acl).write_text("[[rules]]\npermission = 'maybe'\n")
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in b.log_text(), what="reload failure logged")
    failed = [l for l in b.log_text().splitlines() if "reload failed" in l]
    assert all(l.count(acl) == 1 for l in failed), failed
    assert code("ccc/x") == 0


# ---------------------------------------------------------------------------
# Bans and quotas
# ---------------------------------------------------------------------------


def test_bans_by_client_id_username_and_address(millet_config):
    b = millet_config('[security.quota]\nbans = ["client:evil-1", "user:mallory"]\n')
    assert raw_connack(b, V5, client_id="evil-1") == RC_BANNED
    assert raw_connack(b, V311, client_id="evil-1") == 5
    assert raw_connack(b, V5, username="mallory") == RC_BANNED
    assert raw_connack(b, V5, client_id="good-1") == 0  # negative
    ip = millet_config('[security.quota]\nbans = ["ip:127.0.0.0/8"]\n')
    r = raw(ip, V311)
    try:
        r.send(connect_packet(V311, "anyone"))
        assert not any(p.type == CONNACK for p in r.wait_closed())
    finally:
        r.close()


def test_message_rate_limit_disconnects_with_0x96(millet_config):
    b = millet_config('[security.quota]\nmessages_per_sec = 5.0\nmessages_burst = 5.0\n')
    r = raw(b, V5)
    try:
        r.connect()
        # one write, so the server has read everything when it closes (no RST)
        r.send(b"".join(publish_packet("rate/t", b"x", version=V5) for _ in range(8)))
        seen = r.wait_closed()
        assert any(p.type == DISCONNECT and p.disconnect()[0] == 0x96 for p in seen), seen
    finally:
        r.close()
    # negative: a client within its rate stays connected
    ok = raw(b, V5)
    try:
        ok.connect()
        for _ in range(3):
            ok.publish("rate/t", b"x", qos=1)
        ok.assert_silent()
    finally:
        ok.close()


def test_byte_rate_limit_disconnects_with_0x96(millet_config):
    """[security.quota] bytes_per_sec: topic + payload bytes per second per client."""
    b = millet_config('[security.quota]\nbytes_per_sec = 200.0\nbytes_burst = 200.0\n')
    r = raw(b, V5)
    try:
        r.connect()
        # 3 x (3 + 90) bytes > the 200-byte burst; one write, so the server
        # has read everything when it closes (no RST)
        r.send(b"".join(publish_packet("b/t", b"x" * 90, version=V5) for _ in range(3)))
        seen = r.wait_closed()
        assert any(p.type == DISCONNECT and p.disconnect()[0] == 0x96 for p in seen), seen
    finally:
        r.close()
    # negative: small messages within the budget keep the connection
    ok = raw(b, V5)
    try:
        ok.connect()
        for _ in range(3):
            ok.publish("b/t", b"x" * 10, qos=1)
        ok.assert_silent()
    finally:
        ok.close()


def _connack_or_closed(broker, version=V5):
    """The CONNACK code, or None when the server closed without one."""
    r = raw(broker, version)
    try:
        r.send(connect_packet(version, unique("cr")))
        got = r.recv(timeout=5.0)
        return got.connack().rc if got is not None and got.type == CONNACK else None
    except (ConnectionError, OSError):
        return None
    finally:
        r.close()


def test_connection_rate_limit_per_listener(millet_config):
    """[security.quota] connections_per_sec: connections beyond the listener's rate are closed
    at accept, before any CONNACK; the rate refills."""
    b = millet_config('[security.quota]\nconnections_per_sec = 1.0\nconnections_burst = 2.0\n')
    results = [_connack_or_closed(b) for _ in range(6)]
    accepted = [r for r in results if r == 0]
    refused = [r for r in results if r is None]
    # at most the burst (2; the fixture's readiness probe may have used one token) plus one
    # token refilled while the six were made
    assert 1 <= len(accepted) <= 3, results
    assert len(refused) >= 3, results
    # negative: once the bucket refills, a connection is accepted again
    wait_until(lambda: _connack_or_closed(b) == 0, timeout=10.0, interval=0.3,
               what="a connection accepted after the rate refilled")


def test_max_connections_per_username(millet_config, tmp_path):
    b, _ = password_broker(millet_config, tmp_path, extra="[security.quota]\nmax_connections_per_user = 1\n")
    first = raw(b, V5)
    try:
        first.connect(username="alice", password=b"s3cret")
        assert raw_connack(b, V5, username="alice", password=b"s3cret") == RC_QUOTA
        assert raw_connack(b, V311, username="alice", password=b"s3cret") == 5
        assert raw_connack(b, V5, username="bob", password=b"hunter2") == 0  # another user
    finally:
        first.disconnect()
        first.close()
    wait_until(lambda: raw_connack(b, V5, username="alice", password=b"s3cret") == 0,
               what="alice's permit released")


# ---------------------------------------------------------------------------
# SCRAM-SHA-256 over AUTH
# ---------------------------------------------------------------------------


def _hmac(k, m):
    return hmac.new(k, m, hashlib.sha256).digest()


def scram_line(user, password, iterations=4096):
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    ck = _hmac(salted, b"Client Key")
    b64 = lambda x: base64.b64encode(x).decode()  # noqa: E731
    return (f"{user}:SCRAM-SHA-256${iterations}:{b64(salt)}$"
            f"{b64(hashlib.sha256(ck).digest())}:{b64(_hmac(salted, b'Server Key'))}\n")


class Scram:
    def __init__(self, user, password):
        self.user, self.password = user, password
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.bare = f"n={user},r={self.nonce}"

    def first(self) -> bytes:
        return f"n,,{self.bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce)
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), base64.b64decode(attrs["s"]),
                                     int(attrs["i"]))
        ck = _hmac(salted, b"Client Key")
        without_proof = f"c=biws,r={attrs['r']}"
        auth_msg = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        sig = _hmac(hashlib.sha256(ck).digest(), auth_msg)
        self.server_sig = _hmac(_hmac(salted, b"Server Key"), auth_msg)
        proof = bytes(a ^ b for a, b in zip(ck, sig))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> bool:
        return server_final.decode() == "v=" + base64.b64encode(self.server_sig).decode()


def auth_packet(rc: int, data: bytes) -> bytes:
    return packet(AUTH, 0, bytes([rc]) + enc_props({P_AUTH_METHOD: "SCRAM-SHA-256", P_AUTH_DATA: data}))


def read_auth(p) -> tuple[int, dict]:
    r = _Reader(p.body)
    rc = r.byte()
    return rc, r.props()


def scram_connect(b, user, password, client_id=None):
    """Run the SCRAM exchange on a new raw v5 connection; returns (client, CONNACK rc, scram)."""
    r = raw(b, V5)
    s = Scram(user, password)
    r.send(connect_packet(V5, client_id or unique("s"), properties={
        P_AUTH_METHOD: "SCRAM-SHA-256", P_AUTH_DATA: s.first()}))
    p = r.recv()
    assert p is not None and p.type == AUTH, p
    rc, pr = read_auth(p)
    assert rc == 0x18
    r.send(auth_packet(0x18, s.final(pr[P_AUTH_DATA])))
    ack = r.expect(CONNACK).connack()
    if ack.rc == 0:
        assert s.verify(ack.props[P_AUTH_DATA])
    return r, ack.rc, s


def test_scram_sha256_enhanced_auth_and_reauthentication(millet_config, tmp_path):
    creds = write(tmp_path / "scram", scram_line("carol", "pa55word") + scram_line("dave", "d4ve"))
    pw = tmp_path / "passwd"
    passwd(str(pw), "alice", "--password", "s3cret")
    # an authenticated listener: SCRAM is an accepted way in, besides the chain
    admin, token = free_port(), "scram-test-token-0123456789abcdef"
    b = millet_config(f'[security.auth]\nchain = ["password_file"]\n[security.auth.password_file]\n'
                      f'path = "{pw}"\n[security.auth.scram]\npath = "{creds}"\n'
                      f'[admin]\nbearer_token = "{token}"\n', args=["--admin-listen", f"{HOST}:{admin}"])
    r, rc, _ = scram_connect(b, "carol", "pa55word")
    try:
        assert rc == 0
        # re-authentication: AUTH 0x19 ... AUTH 0x00
        s = Scram("carol", "pa55word")
        r.send(auth_packet(0x19, s.first()))
        rc, pr = read_auth(r.expect(AUTH))
        assert rc == 0x18
        r.send(auth_packet(0x18, s.final(pr[P_AUTH_DATA])))
        rc, pr = read_auth(r.expect(AUTH))
        assert rc == 0 and s.verify(pr[P_AUTH_DATA])
        r.send(PINGREQ_PACKET)
        r.expect(PINGRESP)
        # failed re-authentication: DISCONNECT 0x87
        bad = Scram("carol", "wrong")
        r.send(auth_packet(0x19, bad.first()))
        _, pr = read_auth(r.expect(AUTH))
        r.send(auth_packet(0x18, bad.final(pr[P_AUTH_DATA])))
        seen = r.wait_closed()
        assert any(p.type == DISCONNECT and p.disconnect()[0] == RC_NOT_AUTHORIZED for p in seen), seen
    finally:
        r.close()
    # re-authentication as another (valid) user: refused, the identity is fixed at CONNECT
    r, rc, _ = scram_connect(b, "carol", "pa55word")
    try:
        assert rc == 0
        other = Scram("dave", "d4ve")
        r.send(auth_packet(0x19, other.first()))
        seen = r.wait_closed()
        assert any(p.type == DISCONNECT and p.disconnect()[0] == RC_NOT_AUTHORIZED for p in seen), seen
    finally:
        r.close()
    r, rc, _ = scram_connect(b, "dave", "d4ve")  # negative: dave himself gets in
    r.close()
    assert rc == 0
    for user, password in [("carol", "wrong"), ("nobody", "pa55word")]:
        r, rc, _ = scram_connect(b, user, password)
        r.close()
        assert rc == RC_NOT_AUTHORIZED
    # an unknown method: 0x8C
    assert raw_connack(b, V5, properties={P_AUTH_METHOD: "PLAIN-NOPE", P_AUTH_DATA: b"x"}) == 0x8C
    # /metrics counts the failed exchanges (the two refused CONNECTs) and the unknown method
    import urllib.request
    req = urllib.request.Request(f"http://{HOST}:{admin}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    assert 'millet_auth_failures_total{reason="scram_failed"} 2\n' in text, text
    assert 'millet_auth_failures_total{reason="other"} 1\n' in text, text


# ---------------------------------------------------------------------------
# Posture
# ---------------------------------------------------------------------------


def test_default_posture_is_loopback_anonymous(millet_config):
    b = millet_config("")
    assert raw_connack(b, V311) == 0
    assert "anonymous clients allowed (loopback, no authentication configured)" in b.log_text()


def test_non_loopback_listener_requires_authentication(millet_config):
    b = millet_config("", listen="0.0.0.0:{port}")
    assert raw_connack(b, V311) == 5
    assert raw_connack(b, V5) == RC_NOT_AUTHORIZED
    assert "authentication required but no provider is configured" in b.log_text()
    # explicitly marked anonymous
    a = millet_config('[security.auth]\nanonymous_listeners = ["0.0.0.0:{PORT}"]\n', listen="0.0.0.0:{port}")
    assert raw_connack(a, V311) == 0
    assert "explicitly marked anonymous" in a.log_text()


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------


def _closed_within(sock: socket.socket, limit: float) -> float:
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    except socket.timeout:
        raise AssertionError(f"connection still open after {limit}s") from None
    return time.monotonic() - start


def test_slowloris_connections_are_closed_after_the_connect_timeout(millet_config, pki):
    b = millet_config(tls_section(pki), tls=True, args=["--connect-timeout", "1"])
    silent = socket.create_connection((HOST, b.port))
    half = socket.create_connection((HOST, b.port))
    half.sendall(connect_packet(V311, "slow")[:7])
    tls_silent = socket.create_connection((HOST, b.tls_port))
    try:
        for s in (silent, half, tls_silent):
            took = _closed_within(s, 6.0)
            assert took < 6.0
        # negative: a client that completes its CONNECT stays
        r = raw(b, V311)
        r.connect(keepalive=60)
        r.assert_silent(1.5)
        r.close()
    finally:
        for s in (silent, half, tls_silent):
            s.close()


@pytest.mark.parametrize("version", [V5, V311])
def test_subscribe_flood_is_bounded_by_max_subscriptions(millet_config, version):
    b = millet_config("", args=["--max-subscriptions", "1000"])
    r = raw(b, version)
    try:
        r.connect()
        filters = [(f"flood/{i}/+", 0) for i in range(5000)]
        pid = 9
        r.send(subscribe_packet(pid, filters, version))
        got_pid, codes, _ = r.expect(SUBACK, timeout=15).suback()
        assert got_pid == pid and len(codes) == 5000
        assert codes[:1000] == [0] * 1000
        assert set(codes[1000:]) == {RC_QUOTA if version == V5 else 0x80}
        r.publish("flood/3/x", b"still-here", qos=0)
        assert r.recv_publish().payload == b"still-here"
    finally:
        r.close()


def test_deep_and_long_topics_are_refused(millet_config):
    """The topic limits stay configurable ([limits] max_topic_length / max_topic_levels; the
    defaults, 65,535 bytes and 128 levels, are in test_compat.py)."""
    b = millet_config("[limits]\nmax_topic_length = 1024\nmax_topic_levels = 32\n")
    r = raw(b, V5)
    try:
        r.connect()
        deep = "/".join(["l"] * 40)
        long = "t/" + "x" * 2000
        for t in (deep, long):
            pid = r.next_pid()
            r.send(publish_packet(t, b"x", qos=1, pid=pid, version=V5))
            got_pid, rc, _ = r.expect(PUBACK).ack()
            assert got_pid == pid and rc == 0x90
        codes = r.subscribe([(deep, 0), (long, 0), ("ok/+", 0)])
        assert codes[0] >= 0x80 and codes[1] >= 0x80 and codes[2] == 0
    finally:
        r.close()


def test_huge_property_counts_are_bounded_by_the_maximum_packet_size(millet_config):
    b = millet_config("", args=["--max-packet-size", "65536"])
    r = raw(b, V5)
    try:
        r.connect()
        many = {P_USER_PROPERTY: [("k", "v")] * 3000}  # ~21 KB: accepted
        r.send(publish_packet("props/ok", b"x", qos=1, pid=1, version=V5, properties=many))
        assert r.expect(PUBACK).ack()[0] == 1
        huge = {P_USER_PROPERTY: [("k", "v")] * 20000}  # ~140 KB: too large
        r.send(publish_packet("props/huge", b"x", qos=1, pid=2, version=V5, properties=huge))
        seen = r.wait_closed()
        assert any(p.type == DISCONNECT and p.disconnect()[0] == 0x95 for p in seen), seen
    finally:
        r.close()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_many_clients_sending_maximum_size_packets_at_once(millet_config):
    max_size = 256 * 1024
    b = millet_config("", args=["--max-packet-size", str(max_size)])
    n = 40
    clients = []
    try:
        for _ in range(n):
            r = raw(b, V311)
            r.connect()
            clients.append(r)
        body = b"x" * (max_size - 64)
        frames = [publish_packet("big/t", body, qos=1, pid=1) for _ in clients]
        threads = [threading.Thread(target=c.send, args=(f,)) for c, f in zip(clients, frames)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        for c in clients:
            assert c.expect(PUBACK, timeout=15).ack()[0] == 1
        rss = _rss_kb(b.proc.pid)
        # 40 x 256 KB in flight at once: a few MB of buffers, far from unbounded
        assert 0 < rss < 256 * 1024, f"broker RSS {rss} kB"
        # one byte over the limit: DISCONNECT 0x95 (packet too large) is not even possible in
        # 3.1.1, the connection is closed
        over = publish_packet("big/t", b"x" * max_size, qos=0)
        clients[0].send(over)
        clients[0].wait_closed()
    finally:
        for c in clients:
            c.close()
    assert b.alive()
    r = raw(b, V311)
    r.connect()
    r.close()


def test_ban_file_changes_at_run_time_with_expiry(millet_config, tmp_path):
    bans = write(tmp_path / "bans", "# target [seconds]\nclient:later-banned 3600\n")
    b = millet_config(f'[security.quota]\nbans_file = "{bans}"\n')
    assert raw_connack(b, V5, client_id="later-banned") == RC_BANNED
    assert raw_connack(b, V5, client_id="dev-7") == 0
    Path(bans).write_text("client:dev-7 2\n")  # banned for two seconds; later-banned lifted
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: raw_connack(b, V5, client_id="dev-7") == RC_BANNED, what="ban applied")
    assert raw_connack(b, V5, client_id="later-banned") == 0
    wait_until(lambda: raw_connack(b, V5, client_id="dev-7") == 0, timeout=6, what="ban expired")
