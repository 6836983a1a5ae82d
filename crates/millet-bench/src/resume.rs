//! `resume`: how long a persistent session with N queued QoS 1 messages
//! takes to come back.
//!
//! 1. A subscriber with a persistent session (3.1.1 `clean_session=0`; 5.0
//!    Session Expiry Interval 3600) subscribes to `bench/resume/#` at QoS 1
//!    on `--sub-port`, waits for the SUBACK and leaves with a DISCONNECT.
//! 2. A publisher on `--pub-port` sends `--count` QoS 1 messages with a
//!    window of `--inflight`, waits for every PUBACK and leaves; then
//!    `--settle` passes (the brokers finish routing what they acknowledged).
//! 3. The subscriber reconnects with the same client id (`clean_session=0`)
//!    to `--resume-port`: the clock starts just before the TCP connect; the
//!    CONNACK gives `connack_ms` (and must say session present), and the last
//!    of the N distinct messages (by the sequence number in the payload
//!    header) gives `resume_ms`. Each QoS 1 PUBLISH is acknowledged as it
//!    arrives.
//!
//! The three ports may be different nodes of a cluster: the session then
//! moves from the node it was created on to the one it resumes on. At the end
//! the session is removed (a clean-session connect).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, BytesMut};
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mqtt::{self, ConnectOpts, In, Version};
use crate::stats::{now_ns, Bitset};

/// The resumed session's subscription.
pub const FILTER: &str = "bench/resume/#";
/// Session Expiry Interval asked for by MQTT 5 (seconds).
const SESSION_EXPIRY: u32 = 3600;
/// Read buffer size of the connections.
const RBUF: usize = 64 * 1024;

#[derive(Args, Debug, Clone)]
pub struct ResumeArgs {
    /// Messages queued for the offline session.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub count: u64,
    /// Payload size in bytes (minimum 24: publisher id, sequence, timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Publisher's window of unacknowledged QoS 1 messages.
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// MQTT protocol version: 4 (3.1.1) or 5 (5.0).
    #[arg(long = "version", visible_alias = "mqtt-version", default_value_t = 4)]
    pub mqtt_version: u8,
    /// Publish topic, under `bench/resume/` (`%i` = the message's sequence
    /// number: one topic per message).
    #[arg(short = 't', long, default_value = "bench/resume/q")]
    pub topic: String,
    /// Port of the subscriber's first connection (default: --port).
    #[arg(long)]
    pub sub_port: Option<u16>,
    /// Port of the publisher (default: --port).
    #[arg(long)]
    pub pub_port: Option<u16>,
    /// Port the subscriber resumes its session on (default: --port).
    #[arg(long)]
    pub resume_port: Option<u16>,
    /// Pause between the last PUBACK and the resume.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub settle: f64,
    /// Bound of the resume (from its TCP connect to the last message), and
    /// of the publishing phase.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    pub timeout: f64,
    /// Timeout for TCP connect + CONNACK, and for the SUBACK.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub connect_timeout: f64,
    /// Keep-alive in seconds.
    #[arg(long, default_value_t = 300)]
    pub keepalive: u16,
    /// The subscriber's client id (default: mb-resume-<run id>, unique).
    #[arg(long)]
    pub client_id: Option<String>,
}

/// A resume run, resolved from the command line.
#[derive(Clone, Debug, Serialize)]
pub struct ResumeCfg {
    pub host: String,
    pub sub_port: u16,
    pub pub_port: u16,
    pub resume_port: u16,
    #[serde(skip)]
    pub sub_addr: SocketAddr,
    #[serde(skip)]
    pub pub_addr: SocketAddr,
    #[serde(skip)]
    pub resume_addr: SocketAddr,
    #[serde(skip)]
    pub version: Version,
    pub mqtt_version: u8,
    pub count: u64,
    pub payload_size: usize,
    pub inflight: usize,
    pub topic: String,
    pub filter: String,
    pub client_id: String,
    /// MQTT 5: the Session Expiry Interval asked for.
    pub session_expiry: Option<u32>,
    pub keepalive: u16,
    pub settle_s: f64,
    pub timeout_s: f64,
    pub connect_timeout_s: f64,
    /// Run id, in the upper half of the payload's publisher id.
    #[serde(skip)]
    pub nonce: u32,
}

impl ResumeCfg {
    pub fn new(addr: SocketAddr, a: &ResumeArgs, nonce: u32) -> Result<Self> {
        let version = Version::from_level(a.mqtt_version)?;
        if a.count == 0 || a.count > 10_000_000 {
            bail!("--count must be 1..=10000000");
        }
        if a.inflight == 0 || a.inflight > 60_000 {
            bail!("--inflight must be 1..=60000");
        }
        if !mqtt::topic_matches(FILTER, &a.topic.replace("%i", "0")) || a.topic.contains(['+', '#'])
        {
            bail!("--topic {:?} is not a topic under {FILTER}", a.topic);
        }
        let at = |p: Option<u16>| SocketAddr::new(addr.ip(), p.unwrap_or(addr.port()));
        let (sub_addr, pub_addr, resume_addr) = (at(a.sub_port), at(a.pub_port), at(a.resume_port));
        Ok(ResumeCfg {
            host: addr.ip().to_string(),
            sub_port: sub_addr.port(),
            pub_port: pub_addr.port(),
            resume_port: resume_addr.port(),
            sub_addr,
            pub_addr,
            resume_addr,
            version,
            mqtt_version: version.level(),
            count: a.count,
            payload_size: a.size.max(mqtt::HEADER_LEN),
            inflight: a.inflight,
            topic: a.topic.clone(),
            filter: FILTER.into(),
            client_id: a
                .client_id
                .clone()
                .unwrap_or_else(|| format!("mb-resume-{nonce:08x}")),
            session_expiry: (version == Version::V5).then_some(SESSION_EXPIRY),
            keepalive: a.keepalive,
            settle_s: a.settle,
            timeout_s: a.timeout.max(0.1),
            connect_timeout_s: a.connect_timeout.max(0.1),
            nonce,
        })
    }

    fn opts(&self, clean: bool) -> ConnectOpts {
        ConnectOpts {
            version: self.version,
            keep_alive: self.keepalive,
            clean,
            session_expiry: SESSION_EXPIRY,
            topic_alias_max: None,
        }
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_s)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }

    /// Upper bound of a whole run.
    pub fn bound(&self) -> Duration {
        Duration::from_secs_f64(
            2.0 * self.timeout_s + self.settle_s + 6.0 * self.connect_timeout_s + 30.0,
        )
    }
}

/// The publishing phase.
#[derive(Debug, Default, Serialize)]
pub struct PublishStats {
    pub sent: u64,
    pub acked: u64,
    /// MQTT 5 PUBACKs with a failure reason code.
    pub rejected: u64,
    /// First PUBLISH to last PUBACK.
    pub time_s: f64,
    pub ack_rate: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct ResumeResult {
    pub tool: &'static str,
    pub label: Option<String>,
    pub case: Option<String>,
    pub command: String,
    pub broker: String,
    pub config: Option<ResumeCfg>,
    pub publish: PublishStats,
    /// Session Present of the resuming CONNACK (0 = the session was lost).
    pub session_present: bool,
    /// Just before the TCP connect to the CONNACK.
    pub connack_ms: Option<f64>,
    /// Just before the TCP connect to the first queued message.
    pub first_msg_ms: Option<f64>,
    /// Just before the TCP connect to the last of the N distinct messages.
    pub resume_ms: Option<f64>,
    /// CONNACK to the last message.
    pub drain_ms: Option<f64>,
    /// Distinct messages per second from the CONNACK to the last one.
    pub msgs_per_s: Option<f64>,
    /// PUBLISH packets received on the resumed connection.
    pub received: u64,
    /// Distinct messages of this run among them.
    pub unique: u64,
    pub duplicates: u64,
    /// Messages without this run's payload header.
    pub foreign: u64,
    pub errors: Vec<String>,
    pub wall_time_s: f64,
}

impl ResumeResult {
    /// Whether the run did what it measures: session present, all delivered.
    pub fn ok(&self) -> bool {
        let n = self.config.as_ref().map_or(0, |c| c.count);
        self.session_present && self.unique == n && self.errors.is_empty()
    }
}

/// TCP connect + CONNECT/CONNACK.
async fn connect(
    cfg: &ResumeCfg,
    addr: SocketAddr,
    id: &str,
    clean: bool,
) -> Result<mqtt::Connected> {
    mqtt::mqtt_connect(
        addr,
        None,
        &cfg.opts(clean),
        id,
        cfg.connect_timeout(),
        RBUF,
    )
    .await
    .with_context(|| format!("connecting {id} to {addr}"))
}

/// Read more bytes into `rbuf`, by `deadline`.
async fn read_more(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    deadline: tokio::time::Instant,
    what: &str,
) -> Result<()> {
    if rbuf.capacity() - rbuf.len() < RBUF / 4 {
        rbuf.reserve(RBUF);
    }
    match tokio::time::timeout_at(deadline, stream.read_buf(rbuf)).await {
        Err(_) => bail!("timed out waiting for {what}"),
        Ok(Ok(0)) => bail!("connection closed by the broker while waiting for {what}"),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::from(e).context(format!("reading ({what})"))),
    }
}

/// DISCONNECT, then wait (at most 2 s) for the broker to close the
/// connection, so that the session is offline before the next step.
async fn disconnect(ver: Version, stream: &mut TcpStream) -> Result<()> {
    let mut w = BytesMut::with_capacity(8);
    mqtt::encode_disconnect(ver, &mut w)?;
    stream.write_all(&w).await?;
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut sink = BytesMut::with_capacity(4096);
    loop {
        sink.clear();
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Step 1: the persistent session and its subscription.
async fn subscribe(cfg: &ResumeCfg) -> Result<()> {
    let c = connect(cfg, cfg.sub_addr, &cfg.client_id, false).await?;
    let (mut stream, mut rbuf) = (c.stream, c.rbuf);
    let mut w = BytesMut::with_capacity(64);
    mqtt::encode_subscribe(cfg.version, 1, &cfg.filter, 1, &mut w)?;
    stream.write_all(&w).await?;
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout();
    loop {
        while let Some(p) = mqtt::read_packet(cfg.version, &mut rbuf)? {
            match p {
                In::SubAck { ok: true } => return disconnect(cfg.version, &mut stream).await,
                In::SubAck { ok: false } => bail!("SUBSCRIBE to {} refused", cfg.filter),
                In::Disconnect => bail!("broker sent DISCONNECT before the SUBACK"),
                _ => {}
            }
        }
        read_more(&mut stream, &mut rbuf, deadline, "the SUBACK").await?;
    }
}

/// Step 2: N QoS 1 messages, at most `inflight` unacknowledged.
async fn publish(cfg: &ResumeCfg, st: &mut PublishStats) -> Result<()> {
    let id = format!("{}-pub", cfg.client_id);
    let c = connect(cfg, cfg.pub_addr, &id, true).await?;
    let (mut stream, mut rbuf) = (c.stream, c.rbuf);
    let pub_id = u64::from(cfg.nonce) << 32;
    let one_topic = !cfg.topic.contains("%i");
    let mut pending = vec![false; usize::from(u16::MAX) + 1];
    let mut outstanding = 0usize;
    let mut wbuf = BytesMut::with_capacity(cfg.inflight * (cfg.payload_size + 64));
    let deadline = tokio::time::Instant::now() + cfg.timeout();
    let t0 = Instant::now();
    while st.acked + st.rejected < cfg.count {
        while st.sent < cfg.count && outstanding < cfg.inflight {
            let seq = st.sent;
            let pkid = (seq % u64::from(u16::MAX)) as u16 + 1;
            let mut payload = BytesMut::with_capacity(cfg.payload_size);
            payload.put_u64(pub_id);
            payload.put_u64(seq);
            payload.put_u64(now_ns());
            payload.resize(cfg.payload_size, 0);
            let topic = if one_topic {
                std::borrow::Cow::Borrowed(cfg.topic.as_str())
            } else {
                std::borrow::Cow::Owned(cfg.topic.replace("%i", &seq.to_string()))
            };
            mqtt::encode_publish(
                cfg.version,
                &topic,
                1,
                false,
                pkid,
                payload.freeze(),
                &mut wbuf,
            )?;
            pending[usize::from(pkid)] = true;
            outstanding += 1;
            st.sent += 1;
        }
        if !wbuf.is_empty() {
            tokio::time::timeout_at(deadline, stream.write_all(&wbuf))
                .await
                .map_err(|_| anyhow!("publishing timed out"))??;
            wbuf.clear();
        }
        let what = "PUBACKs";
        read_more(&mut stream, &mut rbuf, deadline, what).await?;
        while let Some(p) = mqtt::read_packet(cfg.version, &mut rbuf)? {
            match p {
                In::PubAck { pkid, ok } if pending[usize::from(pkid)] => {
                    pending[usize::from(pkid)] = false;
                    outstanding -= 1;
                    if ok {
                        st.acked += 1;
                    } else {
                        st.rejected += 1;
                    }
                }
                In::Disconnect => bail!("broker sent DISCONNECT to the publisher"),
                _ => {}
            }
        }
    }
    st.time_s = t0.elapsed().as_secs_f64();
    st.ack_rate = st.acked as f64 / st.time_s.max(1e-9);
    disconnect(cfg.version, &mut stream).await?;
    if st.rejected > 0 {
        bail!(
            "{} of {} PUBLISH refused by the broker",
            st.rejected,
            st.sent
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Step 3: resume the session and drain its queue.
async fn resume(cfg: &ResumeCfg, r: &mut ResumeResult) -> Result<()> {
    let t0 = Instant::now();
    let c = connect(cfg, cfg.resume_addr, &cfg.client_id, false).await?;
    let t_connack = Instant::now();
    r.connack_ms = Some(ms(t_connack - t0));
    r.session_present = c.session_present;
    // Without the session nothing is queued: look briefly for strays.
    let deadline = if c.session_present {
        t0 + cfg.timeout()
    } else {
        r.errors.push(format!(
            "CONNACK on {} said session present 0: the session (and its {} queued messages) \
             was not resumed",
            cfg.resume_addr, cfg.count
        ));
        t_connack + cfg.timeout().min(Duration::from_secs(2))
    };
    let (mut stream, mut rbuf) = (c.stream, c.rbuf);
    let own = cfg.nonce;
    let mut seen = Bitset::default();
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut t_done = None;
    let mut res = Ok(());
    loop {
        let parsed = loop {
            let p = match mqtt::read_packet(cfg.version, &mut rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            match p {
                In::Publish {
                    qos, pkid, payload, ..
                } => {
                    r.received += 1;
                    match qos {
                        1 => mqtt::encode_puback(cfg.version, pkid, &mut wbuf)?,
                        2 => mqtt::encode_pubrec(cfg.version, pkid, &mut wbuf)?,
                        _ => {}
                    }
                    let h = match mqtt::parse_header(&payload) {
                        Some(h) if (h.pub_id >> 32) as u32 == own && h.seq < cfg.count => h,
                        _ => {
                            r.foreign += 1;
                            continue;
                        }
                    };
                    if r.first_msg_ms.is_none() {
                        r.first_msg_ms = Some(ms(t0.elapsed()));
                    }
                    if seen.test_and_set(h.seq) {
                        r.duplicates += 1;
                    } else {
                        r.unique += 1;
                        if r.unique == cfg.count {
                            t_done = Some(Instant::now());
                        }
                    }
                }
                In::PubRel(pkid) => mqtt::encode_pubcomp(cfg.version, pkid, &mut wbuf)?,
                In::Disconnect => break Err(anyhow!("broker sent DISCONNECT during the resume")),
                _ => {}
            }
        };
        if let Err(e) = parsed {
            res = Err(e);
            break;
        }
        if !wbuf.is_empty() {
            if let Err(e) = stream.write_all(&wbuf).await {
                res = Err(anyhow::Error::from(e).context("sending PUBACKs"));
                break;
            }
            wbuf.clear();
        }
        if t_done.is_some() {
            break;
        }
        let what = format!("queued messages ({} of {})", r.unique, cfg.count);
        if let Err(e) = read_more(&mut stream, &mut rbuf, deadline.into(), &what).await {
            if c.session_present || r.received > 0 {
                res = Err(e);
            }
            break;
        }
    }
    if let Some(t) = t_done {
        r.resume_ms = Some(ms(t - t0));
        let drain = t - t_connack;
        r.drain_ms = Some(ms(drain));
        r.msgs_per_s = Some(r.unique as f64 / drain.as_secs_f64().max(1e-6));
    }
    let _ = disconnect(cfg.version, &mut stream).await;
    res
}

/// Remove the session: a clean-session connect and a DISCONNECT.
async fn cleanup(cfg: &ResumeCfg) -> Result<()> {
    let mut c = connect(cfg, cfg.resume_addr, &cfg.client_id, true).await?;
    disconnect(cfg.version, &mut c.stream).await
}

pub async fn run(cfg: ResumeCfg) -> Result<ResumeResult> {
    let wall = Instant::now();
    let mut r = ResumeResult {
        tool: "millet-bench",
        broker: cfg.resume_addr.to_string(),
        ..Default::default()
    };
    let steps = async {
        subscribe(&cfg).await.context("subscribing")?;
        publish(&cfg, &mut r.publish).await.context("publishing")?;
        tokio::time::sleep(Duration::from_secs_f64(cfg.settle_s)).await;
        resume(&cfg, &mut r).await.context("resuming")
    };
    if let Err(e) = steps.await {
        r.errors.push(format!("{e:#}"));
    }
    if let Err(e) = cleanup(&cfg).await {
        r.errors.push(format!("removing the session: {e:#}"));
    }
    if r.session_present && r.resume_ms.is_none() && r.errors.is_empty() {
        r.errors
            .push(format!("{} of {} messages delivered", r.unique, cfg.count));
    }
    r.wall_time_s = wall.elapsed().as_secs_f64();
    r.config = Some(cfg);
    Ok(r)
}

/// The human summary (stderr).
pub fn print_summary(r: &ResumeResult) {
    let Some(c) = &r.config else { return };
    let opt = |v: Option<f64>, unit: &str| {
        v.map(|x| format!("{x:.1} {unit}"))
            .unwrap_or_else(|| "n/a".into())
    };
    eprintln!(
        "== millet-bench resume | subscribe {} -> publish {} -> resume {} | MQTT {} | {} x {} B QoS 1 queued",
        c.sub_port,
        c.pub_port,
        c.resume_port,
        if c.mqtt_version == 5 { "5.0" } else { "3.1.1" },
        c.count,
        c.payload_size
    );
    let p = &r.publish;
    eprintln!(
        "published  {} sent, {} acked, {} rejected in {:.2}s = {:.0} msg/s",
        p.sent, p.acked, p.rejected, p.time_s, p.ack_rate
    );
    eprintln!(
        "resume     session present {}; CONNACK {}; first message {}; all {} after {} (drain {}, {})",
        u8::from(r.session_present),
        opt(r.connack_ms, "ms"),
        opt(r.first_msg_ms, "ms"),
        c.count,
        opt(r.resume_ms, "ms"),
        opt(r.drain_ms, "ms"),
        opt(r.msgs_per_s, "msg/s"),
    );
    eprintln!(
        "received   {} (distinct {}, duplicates {}, foreign {})",
        r.received, r.unique, r.duplicates, r.foreign
    );
    for e in r.errors.iter().take(10) {
        eprintln!("error: {e}");
    }
}
