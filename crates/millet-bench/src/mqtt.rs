//! Thin MQTT client layer over `mqttbytes` (v4 = MQTT 3.1.1, v5 = MQTT 5.0).
//!
//! The client loops themselves live in `run.rs` / `conn.rs`; this module only
//! knows how to encode the few packets a load generator sends, how to turn the
//! decoded packets of both protocol versions into one small enum, and how to do
//! the CONNECT / CONNACK handshake.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use mqttbytes::{v4, v5, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest packet we accept from the broker.
pub const MAX_PACKET: usize = 16 * 1024 * 1024;

/// MQTT protocol level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

impl Version {
    pub fn from_level(level: u8) -> Result<Self> {
        match level {
            4 | 3 => Ok(Version::V4),
            5 => Ok(Version::V5),
            other => bail!("unsupported MQTT version {other} (use 4 or 5)"),
        }
    }

    pub fn level(self) -> u8 {
        match self {
            Version::V4 => 4,
            Version::V5 => 5,
        }
    }
}

pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Incoming packet, protocol-version independent and reduced to what the
/// load generator needs.
#[derive(Debug)]
pub enum In {
    ConnAck {
        code: u8,
        session_present: bool,
    },
    Publish {
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    /// PUBACK; `ok` is false when a v5 broker returned a failure reason.
    PubAck {
        pkid: u16,
        ok: bool,
    },
    PubRec {
        pkid: u16,
        ok: bool,
    },
    PubRel(u16),
    PubComp(u16),
    SubAck {
        ok: bool,
    },
    PingResp,
    Disconnect,
    Other,
}

fn codec_err(e: mqttbytes::Error) -> anyhow::Error {
    anyhow!("MQTT decode error: {e:?}")
}

/// Extract the next complete packet from `buf`, or `None` if more bytes are needed.
pub fn read_packet(ver: Version, buf: &mut BytesMut) -> Result<Option<In>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let fh = match mqttbytes::check(buf.iter(), MAX_PACKET) {
        Ok(fh) => fh,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(codec_err(e)),
    };
    // DISCONNECT is decoded here: mqttbytes' v5 reader rejects the legal
    // zero-length form.
    if buf[0] >> 4 == 14 {
        let _ = buf.split_to(fh.frame_length());
        return Ok(Some(In::Disconnect));
    }
    let pkt = match ver {
        Version::V4 => match v4::read(buf, MAX_PACKET).map_err(codec_err)? {
            v4::Packet::ConnAck(c) => In::ConnAck {
                code: c.code as u8,
                session_present: c.session_present,
            },
            v4::Packet::Publish(p) => In::Publish {
                qos: p.qos as u8,
                pkid: p.pkid,
                payload: p.payload,
            },
            v4::Packet::PubAck(a) => In::PubAck {
                pkid: a.pkid,
                ok: true,
            },
            v4::Packet::PubRec(a) => In::PubRec {
                pkid: a.pkid,
                ok: true,
            },
            v4::Packet::PubRel(a) => In::PubRel(a.pkid),
            v4::Packet::PubComp(a) => In::PubComp(a.pkid),
            v4::Packet::SubAck(s) => In::SubAck {
                ok: s
                    .return_codes
                    .iter()
                    .all(|c| !matches!(c, v4::SubscribeReasonCode::Failure)),
            },
            v4::Packet::PingResp => In::PingResp,
            v4::Packet::Disconnect => In::Disconnect,
            _ => In::Other,
        },
        Version::V5 => match v5::read(buf, MAX_PACKET).map_err(codec_err)? {
            v5::Packet::ConnAck(c) => In::ConnAck {
                code: c.code as u8,
                session_present: c.session_present,
            },
            v5::Packet::Publish(p) => In::Publish {
                qos: p.qos as u8,
                pkid: p.pkid,
                payload: p.payload,
            },
            v5::Packet::PubAck(a) => In::PubAck {
                pkid: a.pkid,
                ok: (a.reason as u8) < 0x80,
            },
            v5::Packet::PubRec(a) => In::PubRec {
                pkid: a.pkid,
                ok: (a.reason as u8) < 0x80,
            },
            v5::Packet::PubRel(a) => In::PubRel(a.pkid),
            v5::Packet::PubComp(a) => In::PubComp(a.pkid),
            v5::Packet::SubAck(s) => In::SubAck {
                ok: s.return_codes.iter().all(|c| {
                    matches!(
                        c,
                        v5::SubscribeReasonCode::QoS0
                            | v5::SubscribeReasonCode::QoS1
                            | v5::SubscribeReasonCode::QoS2
                    )
                }),
            },
            v5::Packet::PingResp => In::PingResp,
            v5::Packet::Disconnect(_) => In::Disconnect,
            _ => In::Other,
        },
    };
    Ok(Some(pkt))
}

/// Options of a CONNECT packet.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub version: Version,
    pub keep_alive: u16,
    pub clean: bool,
    /// v5 only: session expiry interval (seconds) sent when `clean` is false.
    pub session_expiry: u32,
    /// v5 only: the Topic Alias Maximum announced (aliases the broker may use).
    pub topic_alias_max: Option<u16>,
}

pub fn encode_connect(opts: &ConnectOpts, client_id: &str, out: &mut BytesMut) -> Result<()> {
    match opts.version {
        Version::V4 => {
            let mut c = v4::Connect::new(client_id);
            c.keep_alive = opts.keep_alive;
            c.clean_session = opts.clean;
            c.write(out).map_err(codec_err)?;
        }
        Version::V5 => {
            let mut c = v5::Connect::new(client_id);
            c.keep_alive = opts.keep_alive;
            c.clean_session = opts.clean;
            if !opts.clean || opts.topic_alias_max.is_some() {
                c.properties = Some(v5::ConnectProperties {
                    session_expiry_interval: (!opts.clean).then_some(opts.session_expiry),
                    receive_maximum: None,
                    max_packet_size: None,
                    topic_alias_max: opts.topic_alias_max,
                    request_response_info: None,
                    request_problem_info: None,
                    user_properties: Vec::new(),
                    authentication_method: None,
                    authentication_data: None,
                });
            }
            c.write(out).map_err(codec_err)?;
        }
    }
    Ok(())
}

pub fn encode_subscribe(
    ver: Version,
    pkid: u16,
    filter: &str,
    q: u8,
    out: &mut BytesMut,
) -> Result<()> {
    match ver {
        Version::V4 => {
            let mut s = v4::Subscribe::new(filter, qos(q));
            s.pkid = pkid;
            s.write(out).map_err(codec_err)?;
        }
        Version::V5 => {
            let mut s = v5::Subscribe::new(filter, qos(q));
            s.pkid = pkid;
            s.write(out).map_err(codec_err)?;
        }
    }
    Ok(())
}

/// Encode a PUBLISH the generic (allocating) way; used for retained storms
/// and cleanups where every message has its own topic.
pub fn encode_publish(
    ver: Version,
    topic: &str,
    q: u8,
    retain: bool,
    pkid: u16,
    payload: Bytes,
    out: &mut BytesMut,
) -> Result<()> {
    match ver {
        Version::V4 => {
            let mut p = v4::Publish::from_bytes(topic, qos(q), payload);
            p.retain = retain;
            p.pkid = if q == 0 { 0 } else { pkid };
            p.write(out).map_err(codec_err)?;
        }
        Version::V5 => {
            let mut p = v5::Publish::from_bytes(topic, qos(q), payload);
            p.retain = retain;
            p.pkid = if q == 0 { 0 } else { pkid };
            p.write(out).map_err(codec_err)?;
        }
    }
    Ok(())
}

pub fn encode_puback(ver: Version, pkid: u16, out: &mut BytesMut) -> Result<()> {
    match ver {
        Version::V4 => v4::PubAck::new(pkid).write(out).map_err(codec_err)?,
        Version::V5 => v5::PubAck::new(pkid).write(out).map_err(codec_err)?,
    };
    Ok(())
}

pub fn encode_pubrec(ver: Version, pkid: u16, out: &mut BytesMut) -> Result<()> {
    match ver {
        Version::V4 => v4::PubRec::new(pkid).write(out).map_err(codec_err)?,
        Version::V5 => v5::PubRec::new(pkid).write(out).map_err(codec_err)?,
    };
    Ok(())
}

pub fn encode_pubrel(ver: Version, pkid: u16, out: &mut BytesMut) -> Result<()> {
    match ver {
        Version::V4 => v4::PubRel::new(pkid).write(out).map_err(codec_err)?,
        Version::V5 => v5::PubRel::new(pkid).write(out).map_err(codec_err)?,
    };
    Ok(())
}

pub fn encode_pubcomp(ver: Version, pkid: u16, out: &mut BytesMut) -> Result<()> {
    match ver {
        Version::V4 => v4::PubComp::new(pkid).write(out).map_err(codec_err)?,
        Version::V5 => v5::PubComp::new(pkid).write(out).map_err(codec_err)?,
    };
    Ok(())
}

pub fn encode_pingreq(ver: Version, out: &mut BytesMut) -> Result<()> {
    match ver {
        Version::V4 => v4::PingReq.write(out).map_err(codec_err)?,
        Version::V5 => v5::PingReq.write(out).map_err(codec_err)?,
    };
    Ok(())
}

pub fn encode_disconnect(ver: Version, out: &mut BytesMut) -> Result<()> {
    match ver {
        Version::V4 => v4::Disconnect.write(out).map_err(codec_err)?,
        Version::V5 => v5::Disconnect::new().write(out).map_err(codec_err)?,
    };
    Ok(())
}

/// Size of the fixed benchmark header at the start of every payload:
/// publisher id (u64 BE), sequence (u64 BE), send timestamp in ns (u64 BE).
pub const HEADER_LEN: usize = 24;

/// A pre-encoded PUBLISH frame for one (topic, qos, size): every message is a
/// copy of the frame with the packet id and the 24-byte payload header patched
/// in, so the hot path does no allocation and no re-encoding.
#[derive(Clone, Debug)]
pub struct PubTemplate {
    frame: Vec<u8>,
    pkid_off: Option<usize>,
    payload_off: usize,
}

impl PubTemplate {
    pub fn new(
        ver: Version,
        topic: &str,
        q: u8,
        retain: bool,
        payload_size: usize,
    ) -> Result<Self> {
        let size = payload_size.max(HEADER_LEN);
        let mut buf = BytesMut::with_capacity(size + topic.len() + 16);
        let payload = Bytes::from(vec![0u8; size]);
        encode_publish(ver, topic, q, retain, 1, payload, &mut buf)?;
        let frame = buf.to_vec();
        // Fixed header: 1 byte type/flags + 1..4 bytes remaining length.
        let mut fh = 1;
        while fh < frame.len() && frame[fh] & 0x80 != 0 {
            fh += 1;
        }
        fh += 1;
        let pkid_off = if q > 0 {
            Some(fh + 2 + topic.len())
        } else {
            None
        };
        let payload_off = frame.len() - size;
        Ok(PubTemplate {
            frame,
            pkid_off,
            payload_off,
        })
    }

    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    #[inline]
    pub fn write(&self, out: &mut BytesMut, pkid: u16, pub_id: u64, seq: u64, ts_ns: u64) {
        let start = out.len();
        out.extend_from_slice(&self.frame);
        let f = &mut out[start..];
        if let Some(off) = self.pkid_off {
            f[off..off + 2].copy_from_slice(&pkid.to_be_bytes());
        }
        let p = self.payload_off;
        f[p..p + 8].copy_from_slice(&pub_id.to_be_bytes());
        f[p + 8..p + 16].copy_from_slice(&seq.to_be_bytes());
        f[p + 16..p + 24].copy_from_slice(&ts_ns.to_be_bytes());
    }
}

/// Benchmark header decoded from a received payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub pub_id: u64,
    pub seq: u64,
    pub ts_ns: u64,
}

pub fn parse_header(payload: &[u8]) -> Option<Header> {
    if payload.len() < HEADER_LEN {
        return None;
    }
    let rd = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[i..i + 8]);
        u64::from_be_bytes(b)
    };
    Some(Header {
        pub_id: rd(0),
        seq: rd(8),
        ts_ns: rd(16),
    })
}

/// First port and size of the range the tool picks source ports from when it
/// binds a source address itself (Linux's default ephemeral range).
const PORT_LO: u32 = 32_768;
const PORT_SPAN: u32 = 60_999 - 32_768 + 1;

/// Next source port per source address (indexed by the last octet).
static NEXT_PORT: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];

fn next_port(ip: IpAddr) -> u16 {
    static START: OnceLock<u32> = OnceLock::new();
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id())
            .unwrap_or(0)
    });
    let slot = match ip {
        IpAddr::V4(v4) => usize::from(v4.octets()[3]),
        IpAddr::V6(v6) => usize::from(v6.octets()[15]),
    };
    let n = NEXT_PORT[slot].fetch_add(1, Ordering::Relaxed);
    (PORT_LO + start.wrapping_add(n) % PORT_SPAN) as u16
}

/// Open a TCP connection (optionally from a given local address).
///
/// With a source address the tool picks the port itself (round robin over the
/// ephemeral range, `SO_REUSEADDR`, the next port on a clash): `bind(ip:0)`
/// makes the kernel search for a port no socket holds, TIME_WAIT included,
/// which costs seconds of system time per thousand connections once tens of
/// thousands of ports are taken (bench/HISTORY.md, the 10k-connection case).
/// Only the 4-tuple must be unique, which `connect()` checks.
pub async fn tcp_connect(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    let new = || {
        if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    };
    let Some(ip) = bind else {
        let stream = new()?.connect(addr).await?;
        stream.set_nodelay(true)?;
        return Ok(stream);
    };
    let mut last = None;
    for _ in 0..64 {
        let sock = new()?;
        sock.set_reuseaddr(true)?;
        if let Err(e) = sock.bind(SocketAddr::new(ip, next_port(ip))) {
            last = Some(e);
            continue;
        }
        match sock.connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free source port")))
}

/// Result of a successful MQTT handshake.
pub struct Connected<S = TcpStream> {
    pub stream: S,
    /// Bytes received after the CONNACK (normally empty).
    pub rbuf: BytesMut,
    pub session_present: bool,
    /// MQTT over WebSocket: the framing of everything after the CONNACK.
    pub ws: Option<Box<WsFraming>>,
}

/// CONNECT / CONNACK over an already open stream (TCP or TLS).
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    opts: &ConnectOpts,
    client_id: &str,
    rbuf_cap: usize,
) -> Result<Connected<S>> {
    handshake_framed(stream, opts, client_id, rbuf_cap, None).await
}

/// CONNECT / CONNACK, in WebSocket frames when `ws` is given (the upgrade
/// already done).
async fn handshake_framed<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    opts: &ConnectOpts,
    client_id: &str,
    rbuf_cap: usize,
    mut ws: Option<Box<WsFraming>>,
) -> Result<Connected<S>> {
    let mut out = BytesMut::with_capacity(64 + client_id.len());
    encode_connect(opts, client_id, &mut out)?;
    match ws.as_mut() {
        Some(ws) => {
            ws.frame_packets(&mut out);
            stream.write_all(&ws.out).await?;
            ws.out.clear();
        }
        None => stream.write_all(&out).await?,
    }
    let mut rbuf = BytesMut::with_capacity(rbuf_cap.max(64));
    if let Some(ws) = ws.as_mut() {
        ws.deframe(&mut rbuf)?;
    }
    loop {
        if let Some(pkt) = read_packet(opts.version, &mut rbuf)? {
            return match pkt {
                In::ConnAck {
                    code: 0,
                    session_present,
                } => Ok(Connected {
                    stream,
                    rbuf,
                    session_present,
                    ws,
                }),
                In::ConnAck { code, .. } => Err(anyhow!("CONNACK refused, code {code}")),
                other => Err(anyhow!("expected CONNACK, got {other:?}")),
            };
        }
        let Some(ws) = ws.as_mut() else {
            if stream.read_buf(&mut rbuf).await? == 0 {
                bail!("connection closed before CONNACK");
            }
            continue;
        };
        if stream.read_buf(&mut ws.raw).await? == 0 {
            bail!("connection closed before CONNACK");
        }
        ws.deframe(&mut rbuf)?;
        if !ws.out.is_empty() {
            stream.write_all(&ws.out).await?;
            ws.out.clear();
        }
    }
}

/// TCP connect + CONNECT/CONNACK, all within `timeout`.
pub async fn mqtt_connect(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    opts: &ConnectOpts,
    client_id: &str,
    timeout: Duration,
    rbuf_cap: usize,
) -> Result<Connected> {
    let fut = async {
        let stream = tcp_connect(addr, bind)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        handshake(stream, opts, client_id, rbuf_cap).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("connect timed out after {timeout:?}"))?
}

/// TCP connect + WebSocket upgrade (`GET path`, sub-protocol `mqtt`) +
/// CONNECT/CONNACK in binary frames, all within `timeout`. The connection
/// then carries every MQTT packet in a binary frame of its own, masked, as
/// browser and MQTT.js clients send them ([`WsFraming`]).
pub async fn mqtt_connect_ws(
    addr: SocketAddr,
    path: &str,
    opts: &ConnectOpts,
    client_id: &str,
    timeout: Duration,
    rbuf_cap: usize,
) -> Result<Connected> {
    let fut = async {
        let mut stream = tcp_connect(addr, None)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        let mut ws = Box::new(WsFraming::new());
        ws.upgrade(&mut stream, addr, path).await?;
        handshake_framed(stream, opts, client_id, rbuf_cap, Some(ws)).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("connect timed out after {timeout:?}"))?
}

/// The client side of RFC 6455 framing for MQTT over WebSocket: MQTT
/// packets out as masked binary frames (one per packet), binary frames in
/// as the MQTT byte stream; pings answered, a close frame is an error.
pub struct WsFraming {
    /// Bytes from the socket not yet deframed.
    pub raw: BytesMut,
    /// Frames waiting to be written to the socket.
    pub out: BytesMut,
    /// xorshift state for the masking keys.
    seed: u32,
}

impl Default for WsFraming {
    fn default() -> Self {
        WsFraming::new()
    }
}

impl WsFraming {
    pub fn new() -> Self {
        static SEED: AtomicU32 = AtomicU32::new(0x9E37_79B9);
        WsFraming {
            raw: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(4096),
            seed: SEED.fetch_add(0x6D2B_79F5, Ordering::Relaxed) | 1,
        }
    }

    /// The HTTP upgrade: request, then the `101` answer (its
    /// `Sec-WebSocket-Accept` checked); bytes after it stay in `raw`.
    async fn upgrade(
        &mut self,
        stream: &mut TcpStream,
        addr: SocketAddr,
        path: &str,
    ) -> Result<()> {
        use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
        let key = generate_key();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let end = loop {
            if let Some(i) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.raw.len() > 16 * 1024 {
                bail!("WebSocket upgrade: answer headers too long");
            }
            if stream.read_buf(&mut self.raw).await? == 0 {
                bail!("WebSocket upgrade: connection closed");
            }
        };
        let head = self.raw.split_to(end);
        let head = String::from_utf8_lossy(&head);
        let mut lines = head.lines();
        let status = lines.next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("101") {
            bail!("WebSocket upgrade refused: {status}");
        }
        let want = derive_accept_key(key.as_bytes());
        let accepted = lines.filter_map(|l| l.split_once(':')).any(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
        });
        if !accepted {
            bail!("WebSocket upgrade: wrong or missing Sec-WebSocket-Accept");
        }
        Ok(())
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.seed;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.seed = x;
        x.to_ne_bytes()
    }

    /// Append one masked frame with `opcode` and `payload` to `out`.
    fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.next_mask();
        let n = payload.len();
        self.out.reserve(n + 14);
        self.out.extend_from_slice(&[0x80 | opcode]);
        if n < 126 {
            self.out.extend_from_slice(&[0x80 | n as u8]);
        } else if n <= usize::from(u16::MAX) {
            self.out.extend_from_slice(&[0x80 | 126]);
            self.out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.out.extend_from_slice(&[0x80 | 127]);
            self.out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&mask);
        let start = self.out.len();
        self.out.extend_from_slice(payload);
        for (i, b) in self.out[start..].iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }

    /// Move the MQTT packets in `mqtt` (complete, as encoded by this
    /// client) into binary frames, one per packet.
    pub fn frame_packets(&mut self, mqtt: &mut BytesMut) {
        while !mqtt.is_empty() {
            let n = packet_len(mqtt).unwrap_or(mqtt.len()).min(mqtt.len());
            let p = mqtt.split_to(n);
            self.frame(2, &p);
        }
    }

    /// Decode the complete frames in `raw`: data into `into`, pings
    /// answered (pongs in `out`).
    pub fn deframe(&mut self, into: &mut BytesMut) -> Result<()> {
        loop {
            let b = &self.raw[..];
            if b.len() < 2 {
                return Ok(());
            }
            let opcode = b[0] & 0x0F;
            let masked = b[1] & 0x80 != 0;
            let (len, mut at) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(l), 10)
                }
                126 | 127 => return Ok(()),
                l => (u64::from(l), 2),
            };
            if len > MAX_PACKET as u64 {
                bail!("WebSocket frame of {len} bytes");
            }
            let mut key = [0u8; 4];
            if masked {
                if b.len() < at + 4 {
                    return Ok(());
                }
                key.copy_from_slice(&b[at..at + 4]);
                at += 4;
            }
            let len = len as usize;
            if b.len() < at + len {
                return Ok(());
            }
            let _head = self.raw.split_to(at);
            let mut payload = self.raw.split_to(len);
            if masked {
                for (i, x) in payload.iter_mut().enumerate() {
                    *x ^= key[i % 4];
                }
            }
            match opcode {
                0 | 2 => into.extend_from_slice(&payload),
                9 => self.frame(10, &payload),
                10 => {}
                8 => bail!("WebSocket closed by the broker"),
                other => bail!("unexpected WebSocket opcode {other}"),
            }
        }
    }
}

/// Length of the MQTT packet at the start of `b` (fixed header included),
/// if its header is complete.
fn packet_len(b: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, byte) in b.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + i + 1 + len);
        }
    }
    None
}

/// A TLS client configuration trusting the CA certificates (PEM) in `ca_file`.
pub fn tls_connector(ca_file: &std::path::Path) -> Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?
    {
        let c = c.with_context(|| format!("parsing {}", ca_file.display()))?;
        roots.add(c).context("adding CA certificate")?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)))
}

/// TCP + TLS connect + CONNECT/CONNACK, all within `timeout`.
pub async fn mqtt_connect_tls(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    (tls, server_name): (&tokio_rustls::TlsConnector, &str),
    opts: &ConnectOpts,
    client_id: &str,
    timeout: Duration,
    rbuf_cap: usize,
) -> Result<Connected<tokio_rustls::client::TlsStream<TcpStream>>> {
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| anyhow!("TLS server name {server_name:?}: {e}"))?;
    let fut = async {
        let stream = tcp_connect(addr, bind)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        let stream = tls.connect(name, stream).await.context("TLS handshake")?;
        handshake(stream, opts, client_id, rbuf_cap).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("connect timed out after {timeout:?}"))?
}

/// MQTT topic filter matching (`$share/<group>/` stripped by the caller): the
/// broker's own definition.
pub use millet_codec::topic::topic_matches;

/// Split `$share/<group>/<filter>` into (Some(group), filter).
pub fn split_shared(filter: &str) -> (Option<&str>, &str) {
    if let Some(rest) = filter.strip_prefix("$share/") {
        if let Some((group, f)) = rest.split_once('/') {
            return (Some(group), f);
        }
    }
    (None, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_frames_round_trip() {
        let mut a = WsFraming::new();
        let mut mqtt = BytesMut::new();
        encode_disconnect(Version::V4, &mut mqtt).unwrap();
        encode_disconnect(Version::V4, &mut mqtt).unwrap();
        a.frame_packets(&mut mqtt);
        assert!(mqtt.is_empty());
        // two masked frames of 2 bytes each
        assert_eq!(a.out.len(), 2 * (2 + 4 + 2));
        // the broker's side: unmasked frames, one split in two reads, a ping
        let mut b = WsFraming::new();
        b.raw
            .extend_from_slice(&[0x82, 3, 1, 2, 3, 0x89, 1, 7, 0x82]);
        let mut got = BytesMut::new();
        b.deframe(&mut got).unwrap();
        assert_eq!(&got[..], &[1, 2, 3]);
        assert_eq!(b.out.len(), 2 + 4 + 1, "pong queued");
        b.raw.extend_from_slice(&[126, 0, 2, 9, 9]);
        b.deframe(&mut got).unwrap();
        assert_eq!(&got[..], &[1, 2, 3, 9, 9]);
        b.raw.extend_from_slice(&[0x88, 0]);
        assert!(b.deframe(&mut got).is_err());
        assert_eq!(packet_len(&[0x30, 0x80, 0x01]), Some(3 + 128));
        assert_eq!(packet_len(&[0x30, 0x80]), None);
    }

    #[test]
    fn template_roundtrip_v4_v5() -> Result<()> {
        for ver in [Version::V4, Version::V5] {
            for q in 0..=2u8 {
                let t = PubTemplate::new(ver, "bench/17", q, false, 100)?;
                let mut buf = BytesMut::new();
                t.write(&mut buf, 4242, 7, 99, 123_456);
                t.write(&mut buf, 4243, 7, 100, 123_457);
                for (pk, seq) in [(4242u16, 99u64), (4243, 100)] {
                    match read_packet(ver, &mut buf)? {
                        Some(In::Publish {
                            qos, pkid, payload, ..
                        }) => {
                            assert_eq!(qos, q);
                            assert_eq!(pkid, if q == 0 { 0 } else { pk });
                            assert_eq!(payload.len(), 100);
                            let h = parse_header(&payload).ok_or_else(|| anyhow!("header"))?;
                            assert_eq!(h.pub_id, 7);
                            assert_eq!(h.seq, seq);
                        }
                        other => bail!("unexpected {other:?}"),
                    }
                }
                assert!(buf.is_empty());
            }
        }
        Ok(())
    }

    #[test]
    fn long_topic_and_big_payload() -> Result<()> {
        let topic = "t/".repeat(100);
        let t = PubTemplate::new(Version::V4, &topic, 1, false, 70_000)?;
        let mut buf = BytesMut::new();
        t.write(&mut buf, 9, 1, 2, 3);
        match read_packet(Version::V4, &mut buf)? {
            Some(In::Publish { pkid, payload, .. }) => {
                assert_eq!(pkid, 9);
                assert_eq!(parse_header(&payload).map(|h| h.seq), Some(2));
            }
            other => bail!("unexpected {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn matching() {
        assert!(topic_matches("bench/#", "bench/1"));
        assert!(topic_matches("#", "bench/1/2"));
        assert!(topic_matches("bench/+", "bench/1"));
        assert!(!topic_matches("bench/+", "bench/1/2"));
        assert!(topic_matches("bench/1", "bench/1"));
        assert!(!topic_matches("bench/1", "bench/10"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert_eq!(split_shared("$share/g/bench/#"), (Some("g"), "bench/#"));
        assert_eq!(split_shared("bench/#"), (None, "bench/#"));
    }

    #[test]
    fn zero_length_disconnect() -> Result<()> {
        let mut buf = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert!(matches!(
            read_packet(Version::V5, &mut buf)?,
            Some(In::Disconnect)
        ));
        Ok(())
    }
}
