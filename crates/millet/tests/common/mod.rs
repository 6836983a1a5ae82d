//! Harness for black-box tests: a real `millet` process per test on a free
//! loopback port, and thin wrappers around `rumqttc` clients (v4 = MQTT 3.1.1,
//! v5 = MQTT 5.0) that run the event loop in a task and hand its events over a
//! channel, so tests can wait for packets with bounded timeouts.
//!
//! Debugging aid: `MILLET_TEST_MOSQUITTO=1` runs the same tests against
//! `mosquitto` instead (millet-specific flags are ignored), to check whether a
//! failure is a test bug or a broker bug.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Upper bound for any single wait on the network.
pub const WAIT: Duration = Duration::from_secs(10);
/// Fixed window used only to assert that something does *not* arrive.
pub const QUIET: Duration = Duration::from_millis(300);

/// A broker process, killed (and reaped) on drop.
pub struct Broker {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    log: PathBuf,
    pub mosquitto: bool,
}

impl Broker {
    /// Starts millet with default test flags (`--sys-interval 0`).
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Starts millet with extra flags, e.g. `&["--sys-interval", "1"]`.
    ///
    /// Millet binds port 0 itself and the harness reads the bound port from
    /// its log, so no port is probed and reused. Mosquitto needs a port in
    /// its configuration: a probed one, retried if it was taken meanwhile.
    pub fn start_with(args: &[&str]) -> Broker {
        let mosquitto = std::env::var_os("MILLET_TEST_MOSQUITTO").is_some();
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = dir.path().join("broker.log");
            let log_file = std::fs::File::create(&log).expect("log file");
            let (mut cmd, port) = if mosquitto {
                let port = probe_port();
                let conf = dir.path().join("mosquitto.conf");
                let sys = args
                    .windows(2)
                    .find(|w| w[0] == "--sys-interval")
                    .map_or("0", |w| w[1]);
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\nsys_interval {sys}\n\
                         persistence false\nmax_queued_messages 10000\n"
                    ),
                )
                .expect("mosquitto.conf");
                let mut c = Command::new("mosquitto");
                c.arg("-c").arg(&conf);
                (c, port)
            } else {
                let mut c = Command::new(env!("CARGO_BIN_EXE_millet"));
                c.arg("--listen")
                    .arg("127.0.0.1:0")
                    .arg("--data-dir")
                    .arg(dir.path().join("data"));
                if !args.contains(&"--sys-interval") {
                    c.args(["--sys-interval", "0"]);
                }
                if !args.contains(&"--admin-listen") {
                    c.arg("--no-admin");
                }
                if !args.contains(&"--ws-listen") {
                    c.arg("--no-ws");
                }
                c.args(args);
                (c, 0)
            };
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log file"))
                .stderr(log_file)
                .spawn()
                .expect("spawn broker");
            let mut broker = Broker {
                child,
                port,
                dir,
                log,
                mosquitto,
            };
            match broker.wait_ready() {
                Ok(()) => return broker,
                Err(e) => last = e,
            }
            if !last.contains("in use") {
                break;
            }
        }
        panic!("{last}");
    }

    /// Waits (bounded by a deadline) until the broker listens: for Millet,
    /// until its log names the port it bound; then until the port accepts
    /// TCP connections. `Err` with the log if the broker exited or the
    /// deadline passed.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "broker exited early ({status}):\n{}",
                    self.log_text()
                ));
            }
            if self.port == 0 {
                self.port = bound_port(&self.log_text()).unwrap_or(0);
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
            if self.port != 0
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return Err(format!(
                    "broker did not listen within {WAIT:?}:\n{}",
                    self.log_text()
                ));
            }
            // Poll interval while waiting for the listener, not a correctness sleep.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("--- broker log (port {}) ---\n{tail}", self.port);
        }
        let _ = &self.dir;
    }
}

/// A port free right now (for Mosquitto's configuration only; see
/// [`Broker::start_with`] for the retry when it is taken before use).
fn probe_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// The port in Millet's "listening for MQTT over TCP" log line.
fn bound_port(log: &str) -> Option<u16> {
    let line = log
        .lines()
        .find(|l| l.contains("listening for MQTT over TCP"))?;
    let rest = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Client options common to both protocol versions.
#[derive(Clone, Debug)]
pub struct Opts {
    pub id: String,
    pub clean: bool,
    /// v5 only: session expiry interval (seconds).
    pub session_expiry: Option<u32>,
    /// (topic, payload, qos, retain)
    pub will: Option<(String, Vec<u8>, u8, bool)>,
    /// v5 only: maximum packet size the client accepts.
    pub max_packet_size: Option<u32>,
}

impl Opts {
    pub fn new(id: &str) -> Opts {
        Opts {
            id: id.to_string(),
            clean: true,
            session_expiry: None,
            will: None,
            max_packet_size: None,
        }
    }
    pub fn persistent(mut self, expiry: u32) -> Opts {
        self.clean = false;
        self.session_expiry = Some(expiry);
        self
    }
    pub fn will(mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Opts {
        self.will = Some((topic.to_string(), payload.to_vec(), qos, retain));
        self
    }
    pub fn max_packet_size(mut self, n: u32) -> Opts {
        self.max_packet_size = Some(n);
        self
    }
}

/// A received application message, version independent.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// v5 only.
    pub props: Option<rumqttc::v5::mqttbytes::v5::PublishProperties>,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Result of waiting for the CONNACK.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub session_present: bool,
}

/// What the test driver needs from a client; implemented for the v4 and v5 APIs.
#[allow(async_fn_in_trait)]
pub trait MqttClient: Sized {
    const VERSION: u8;
    /// Connects and waits for a successful CONNACK.
    async fn connect(b: &Broker, o: Opts) -> (Self, ConnInfo);
    /// Subscribes and waits for the SUBACK; returns the granted QoS (or 0x80+ on failure).
    async fn subscribe(&mut self, filter: &str, qos: u8) -> u8;
    /// Publishes; for QoS 1/2 waits for PUBACK/PUBCOMP, for QoS 0 until it is written.
    async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]);
    /// Hands all `payloads` to the client without waiting in between, then
    /// waits until every one is acknowledged (QoS 1/2) or written (QoS 0).
    async fn publish_pipelined(&mut self, topic: &str, qos: u8, payloads: Vec<Vec<u8>>);
    /// Next application message (bounded wait).
    async fn recv(&mut self) -> Msg;
    /// Next message if one arrives within `window`.
    async fn try_recv(&mut self, window: Duration) -> Option<Msg>;
    /// Sends DISCONNECT and waits until it has been written.
    async fn disconnect(self);
    /// Kills the connection without DISCONNECT (drops the socket).
    async fn kill(self);
    /// Waits for the event loop to end with an error (connection closed by the broker).
    async fn wait_closed(&mut self) -> String;
}

pub async fn assert_quiet<C: MqttClient>(c: &mut C, what: &str) {
    // Fixed window: asserting that nothing arrives.
    if let Some(m) = c.try_recv(QUIET).await {
        panic!("{what}: unexpected message {m:?}");
    }
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

pub fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

// ---------------------------------------------------------------- v4 (3.1.1)

pub type Ev4 = Result<rumqttc::Event, rumqttc::ConnectionError>;

pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Ev4>,
    task: JoinHandle<()>,
    stash: VecDeque<Msg>,
}

impl V4 {
    pub fn options(b: &Broker, o: &Opts) -> rumqttc::MqttOptions {
        let mut m = rumqttc::MqttOptions::new(o.id.clone(), "127.0.0.1", b.port);
        m.set_keep_alive(Duration::from_secs(30));
        m.set_clean_session(o.clean);
        m.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((t, p, q, r)) = &o.will {
            m.set_last_will(rumqttc::LastWill::new(t.clone(), p.clone(), qos4(*q), *r));
        }
        m
    }

    pub async fn connect_with(mo: rumqttc::MqttOptions) -> (V4, ConnInfo) {
        let (client, mut el) = rumqttc::AsyncClient::new(mo, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let stop = ev.is_err();
                if tx.send(ev).is_err() || stop {
                    break;
                }
            }
        });
        let mut c = V4 {
            client,
            rx,
            task,
            stash: VecDeque::new(),
        };
        let info = c
            .wait_for("CONNACK", |p| match p {
                rumqttc::Packet::ConnAck(ca) => {
                    assert_eq!(ca.code, rumqttc::ConnectReturnCode::Success, "CONNACK");
                    Some(ConnInfo {
                        session_present: ca.session_present,
                    })
                }
                _ => None,
            })
            .await;
        (c, info)
    }

    pub async fn next_event(&mut self) -> rumqttc::Event {
        match timeout(WAIT, self.rx.recv()).await {
            Ok(Some(Ok(ev))) => ev,
            Ok(Some(Err(e))) => panic!("v4 connection error: {e:?}"),
            Ok(None) => panic!("v4 event loop ended"),
            Err(_) => panic!("v4: no event within {WAIT:?}"),
        }
    }

    /// Waits for an incoming packet matching `f`, stashing publishes seen on the way.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&rumqttc::Packet) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) => panic!("v4 waiting for {what}: connection error {e:?}"),
                Ok(None) => panic!("v4 waiting for {what}: event loop ended"),
                Err(_) => panic!("v4: no {what} within {WAIT:?}"),
            };
            if let rumqttc::Event::Incoming(p) = ev {
                if let Some(t) = f(&p) {
                    return t;
                }
                if let rumqttc::Packet::Publish(p) = p {
                    self.stash.push_back(msg4(&p));
                }
            }
        }
    }

    async fn wait_outgoing(&mut self, what: &str, mut f: impl FnMut(&rumqttc::Outgoing) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) => panic!("v4 waiting for {what}: connection error {e:?}"),
                Ok(None) => panic!("v4 waiting for {what}: event loop ended"),
                Err(_) => panic!("v4: no {what} within {WAIT:?}"),
            };
            match ev {
                rumqttc::Event::Outgoing(o) if f(&o) => return,
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    self.stash.push_back(msg4(&p))
                }
                _ => {}
            }
        }
    }
}

fn msg4(p: &rumqttc::Publish) -> Msg {
    Msg {
        topic: p.topic.clone(),
        payload: p.payload.to_vec(),
        qos: p.qos as u8,
        retain: p.retain,
        props: None,
    }
}

impl MqttClient for V4 {
    const VERSION: u8 = 4;

    async fn connect(b: &Broker, o: Opts) -> (Self, ConnInfo) {
        V4::connect_with(V4::options(b, &o)).await
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        self.client.subscribe(filter, qos4(qos)).await.unwrap();
        self.wait_for("SUBACK", |p| match p {
            rumqttc::Packet::SubAck(s) => Some(match s.return_codes[0] {
                rumqttc::SubscribeReasonCode::Success(q) => q as u8,
                rumqttc::SubscribeReasonCode::Failure => 0x80,
            }),
            _ => None,
        })
        .await
    }

    async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos4(qos), retain, payload.to_vec())
            .await
            .unwrap();
        let mut pkid = 0;
        self.wait_outgoing("outgoing PUBLISH", |o| match o {
            rumqttc::Outgoing::Publish(id) => {
                pkid = *id;
                true
            }
            _ => false,
        })
        .await;
        match qos {
            0 => {}
            1 => {
                self.wait_for("PUBACK", |p| match p {
                    rumqttc::Packet::PubAck(a) if a.pkid == pkid => Some(()),
                    _ => None,
                })
                .await
            }
            _ => {
                self.wait_for("PUBCOMP", |p| match p {
                    rumqttc::Packet::PubComp(a) if a.pkid == pkid => Some(()),
                    _ => None,
                })
                .await
            }
        }
    }

    async fn publish_pipelined(&mut self, topic: &str, qos: u8, payloads: Vec<Vec<u8>>) {
        let n = payloads.len();
        let mut done = 0;
        for p in payloads {
            self.client
                .publish(topic, qos4(qos), false, p)
                .await
                .unwrap();
        }
        while done < n {
            let ev = match timeout(WAIT, self.rx.recv()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) => panic!("pipelined publish: connection error {e:?}"),
                Ok(None) => panic!("pipelined publish: event loop ended"),
                Err(_) => panic!("pipelined publish: only {done} of {n} done within {WAIT:?}"),
            };
            match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) if qos == 1 => done += 1,
                rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_)) if qos == 2 => done += 1,
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_)) if qos == 0 => done += 1,
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    self.stash.push_back(msg4(&p))
                }
                _ => {}
            }
        }
    }

    async fn recv(&mut self) -> Msg {
        match self.try_recv(WAIT).await {
            Some(m) => m,
            None => panic!("v4: no PUBLISH within {WAIT:?}"),
        }
    }

    async fn try_recv(&mut self, window: Duration) -> Option<Msg> {
        if let Some(m) = self.stash.pop_front() {
            return Some(m);
        }
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))))) => {
                    return Some(msg4(&p))
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("v4 waiting for PUBLISH: connection error {e:?}"),
                Ok(None) => panic!("v4 waiting for PUBLISH: event loop ended"),
                Err(_) => return None,
            }
        }
    }

    async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        self.wait_outgoing("outgoing DISCONNECT", |o| {
            matches!(o, rumqttc::Outgoing::Disconnect)
        })
        .await;
        // Give the event loop a bounded chance to flush and close.
        let _ = timeout(WAIT, &mut self.task).await;
    }

    async fn kill(self) {
        self.task.abort();
        let _ = timeout(WAIT, self.task).await;
    }

    async fn wait_closed(&mut self) -> String {
        loop {
            match timeout(WAIT, self.rx.recv()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return format!("{e:?}"),
                Ok(None) => return "event loop ended".into(),
                Err(_) => panic!("v4: connection not closed within {WAIT:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------- v5

#[allow(unused_imports)] // each test crate uses a different part
pub mod v5 {
    pub use rumqttc::v5::mqttbytes::v5::{
        DisconnectReasonCode, Filter, LastWill, Packet, Publish, PublishProperties,
        SubscribeProperties, SubscribeReasonCode,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
}

pub type Ev5 = Result<v5::Event, v5::ConnectionError>;

pub struct V5 {
    pub client: v5::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Ev5>,
    task: JoinHandle<()>,
    stash: VecDeque<Msg>,
}

fn msg5(p: &v5::Publish) -> Msg {
    Msg {
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload.to_vec(),
        qos: p.qos as u8,
        retain: p.retain,
        props: p.properties.clone(),
    }
}

impl V5 {
    pub fn options(b: &Broker, o: &Opts) -> v5::MqttOptions {
        let mut m = v5::MqttOptions::new(o.id.clone(), "127.0.0.1", b.port);
        m.set_keep_alive(Duration::from_secs(30));
        m.set_clean_start(o.clean);
        m.set_session_expiry_interval(o.session_expiry);
        m.set_max_packet_size(Some(o.max_packet_size.unwrap_or(1 << 20)));
        if let Some((t, p, q, r)) = &o.will {
            m.set_last_will(v5::LastWill::new(t.clone(), p.clone(), qos5(*q), *r, None));
        }
        m
    }

    pub async fn connect_with(mo: v5::MqttOptions) -> (V5, ConnInfo) {
        let (client, mut el) = v5::AsyncClient::new(mo, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let stop = ev.is_err();
                if tx.send(ev).is_err() || stop {
                    break;
                }
            }
        });
        let mut c = V5 {
            client,
            rx,
            task,
            stash: VecDeque::new(),
        };
        let info = c
            .wait_for("CONNACK", |p| match p {
                v5::Packet::ConnAck(ca) => Some(ConnInfo {
                    session_present: ca.session_present,
                }),
                _ => None,
            })
            .await;
        (c, info)
    }

    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&v5::Packet) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) => panic!("v5 waiting for {what}: connection error {e:?}"),
                Ok(None) => panic!("v5 waiting for {what}: event loop ended"),
                Err(_) => panic!("v5: no {what} within {WAIT:?}"),
            };
            if let v5::Event::Incoming(p) = ev {
                if let Some(t) = f(&p) {
                    return t;
                }
                if let v5::Packet::Publish(p) = p {
                    self.stash.push_back(msg5(&p));
                }
            }
        }
    }

    async fn wait_outgoing(&mut self, what: &str, mut f: impl FnMut(&rumqttc::Outgoing) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) => panic!("v5 waiting for {what}: connection error {e:?}"),
                Ok(None) => panic!("v5 waiting for {what}: event loop ended"),
                Err(_) => panic!("v5: no {what} within {WAIT:?}"),
            };
            match ev {
                v5::Event::Outgoing(o) if f(&o) => return,
                v5::Event::Incoming(v5::Packet::Publish(p)) => self.stash.push_back(msg5(&p)),
                _ => {}
            }
        }
    }

    /// Subscribes with full v5 options and properties; waits for the SUBACK.
    pub async fn subscribe_filter(
        &mut self,
        filter: v5::Filter,
        props: Option<v5::SubscribeProperties>,
    ) -> v5::SubscribeReasonCode {
        match props {
            Some(p) => self
                .client
                .subscribe_many_with_properties(vec![filter], p)
                .await
                .unwrap(),
            None => self.client.subscribe_many(vec![filter]).await.unwrap(),
        }
        self.wait_for("SUBACK", |p| match p {
            v5::Packet::SubAck(s) => Some(s.return_codes[0]),
            _ => None,
        })
        .await
    }

    /// Publishes with properties and waits for the acknowledgement (QoS 1/2).
    pub async fn publish_props(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: &[u8],
        props: v5::PublishProperties,
    ) {
        self.client
            .publish_with_properties(topic, qos5(qos), retain, payload.to_vec(), props)
            .await
            .unwrap();
        self.after_publish(qos).await;
    }

    async fn after_publish(&mut self, qos: u8) {
        let mut pkid = 0;
        self.wait_outgoing("outgoing PUBLISH", |o| match o {
            rumqttc::Outgoing::Publish(id) => {
                pkid = *id;
                true
            }
            _ => false,
        })
        .await;
        match qos {
            0 => {}
            1 => {
                self.wait_for("PUBACK", |p| match p {
                    v5::Packet::PubAck(a) if a.pkid == pkid => Some(()),
                    _ => None,
                })
                .await
            }
            _ => {
                self.wait_for("PUBCOMP", |p| match p {
                    v5::Packet::PubComp(a) if a.pkid == pkid => Some(()),
                    _ => None,
                })
                .await
            }
        }
    }

    /// Waits for the connection to end; returns the event loop's error.
    pub async fn wait_error(&mut self) -> v5::ConnectionError {
        loop {
            match timeout(WAIT, self.rx.recv()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return e,
                Ok(None) => panic!("v5 event loop ended without an error"),
                Err(_) => panic!("v5: connection not closed within {WAIT:?}"),
            }
        }
    }
}

impl MqttClient for V5 {
    const VERSION: u8 = 5;

    async fn connect(b: &Broker, o: Opts) -> (Self, ConnInfo) {
        V5::connect_with(V5::options(b, &o)).await
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        match self
            .subscribe_filter(v5::Filter::new(filter, qos5(qos)), None)
            .await
        {
            v5::SubscribeReasonCode::Success(q) => q as u8,
            other => panic!("SUBACK for {filter}: {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos5(qos), retain, payload.to_vec())
            .await
            .unwrap();
        self.after_publish(qos).await;
    }

    async fn publish_pipelined(&mut self, topic: &str, qos: u8, payloads: Vec<Vec<u8>>) {
        let n = payloads.len();
        let mut done = 0;
        for p in payloads {
            self.client
                .publish(topic, qos5(qos), false, p)
                .await
                .unwrap();
        }
        while done < n {
            let ev = match timeout(WAIT, self.rx.recv()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) => panic!("pipelined publish: connection error {e:?}"),
                Ok(None) => panic!("pipelined publish: event loop ended"),
                Err(_) => panic!("pipelined publish: only {done} of {n} done within {WAIT:?}"),
            };
            match ev {
                v5::Event::Incoming(v5::Packet::PubAck(_)) if qos == 1 => done += 1,
                v5::Event::Incoming(v5::Packet::PubComp(_)) if qos == 2 => done += 1,
                v5::Event::Outgoing(rumqttc::Outgoing::Publish(_)) if qos == 0 => done += 1,
                v5::Event::Incoming(v5::Packet::Publish(p)) => self.stash.push_back(msg5(&p)),
                _ => {}
            }
        }
    }

    async fn recv(&mut self) -> Msg {
        match self.try_recv(WAIT).await {
            Some(m) => m,
            None => panic!("v5: no PUBLISH within {WAIT:?}"),
        }
    }

    async fn try_recv(&mut self, window: Duration) -> Option<Msg> {
        if let Some(m) = self.stash.pop_front() {
            return Some(m);
        }
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(v5::Event::Incoming(v5::Packet::Publish(p))))) => return Some(msg5(&p)),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("v5 waiting for PUBLISH: connection error {e:?}"),
                Ok(None) => panic!("v5 waiting for PUBLISH: event loop ended"),
                Err(_) => return None,
            }
        }
    }

    async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        self.wait_outgoing("outgoing DISCONNECT", |o| {
            matches!(o, rumqttc::Outgoing::Disconnect)
        })
        .await;
        let _ = timeout(WAIT, &mut self.task).await;
    }

    async fn kill(self) {
        self.task.abort();
        let _ = timeout(WAIT, self.task).await;
    }

    async fn wait_closed(&mut self) -> String {
        format!("{:?}", self.wait_error().await)
    }
}
