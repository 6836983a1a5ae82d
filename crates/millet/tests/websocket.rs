//! MQTT over WebSocket against a real broker process, with tokio-tungstenite
//! as the client: packets split across frames and coalesced in one frame,
//! ping / pong, close codes for text and broken frames, and the upgrade's
//! path and sub-protocol checks.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A broker with a WebSocket listener on a free port, and that port.
fn broker() -> (Broker, u16) {
    let b = Broker::start_with(&["--ws-listen", "127.0.0.1:0"]);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(port) = ws_port(&b.log_text()) {
            return (b, port);
        }
        assert!(
            Instant::now() < deadline,
            "no WebSocket listener:\n{}",
            b.log_text()
        );
        // Poll interval while waiting for the log line.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The port in the "listening for MQTT over WebSocket" log line.
fn ws_port(log: &str) -> Option<u16> {
    let line = log
        .lines()
        .find(|l| l.contains("listening for MQTT over WebSocket"))?;
    let rest = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

async fn connect(port: u16, path: &str, protocol: Option<&str>) -> Result<Ws, WsError> {
    let mut req = format!("ws://127.0.0.1:{port}{path}")
        .into_client_request()
        .expect("request");
    if let Some(p) = protocol {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(p).expect("header"),
        );
    }
    let (ws, resp) = timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake timed out")?;
    if let Some(p) = protocol {
        let chosen = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .expect("sub-protocol echoed");
        assert!(p.contains(chosen.to_str().expect("ascii")), "{chosen:?}");
    }
    Ok(ws)
}

/// CONNECT (MQTT 3.1.1, clean session, keep alive 60) for client id `id`.
fn connect_packet(id: &str) -> Vec<u8> {
    let mut v = vec![
        0x10,
        (12 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
    ];
    v.extend_from_slice(&(id.len() as u16).to_be_bytes());
    v.extend_from_slice(id.as_bytes());
    v
}

const CONNACK: &[u8] = &[0x20, 0x02, 0x00, 0x00];
/// SUBSCRIBE packet id 1 to `t/ws` at QoS 0, and its SUBACK.
const SUBSCRIBE: &[u8] = &[0x82, 9, 0, 1, 0, 4, b't', b'/', b'w', b's', 0];
const SUBACK: &[u8] = &[0x90, 3, 0, 1, 0];
/// PUBLISH QoS 0 to `t/ws`, payload `hello`.
const PUBLISH: &[u8] = &[
    0x30, 11, 0, 4, b't', b'/', b'w', b's', b'h', b'e', b'l', b'l', b'o',
];
const PINGREQ: &[u8] = &[0xC0, 0];
const PINGRESP: &[u8] = &[0xD0, 0];

/// Read binary messages until `n` bytes came; fails on anything else.
async fn read_bytes(ws: &mut Ws, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("timed out with {got:?}"))
            .expect("stream ended")
            .expect("websocket error");
        match m {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("expected binary, got {other:?}"),
        }
    }
    assert_eq!(got.len(), n, "{got:?}");
    got
}

/// The next message that is not a ping or pong.
async fn next_message(ws: &mut Ws) -> Option<Message> {
    loop {
        match timeout(WAIT, ws.next()).await.expect("timed out") {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(m)) => return Some(m),
            Some(Err(_)) | None => return None,
        }
    }
}

async fn connected(port: u16, id: &str) -> Ws {
    let mut ws = connect(port, "/mqtt", Some("mqtt")).await.expect("upgrade");
    ws.send(Message::binary(connect_packet(id)))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut ws, CONNACK.len()).await, CONNACK);
    ws
}

#[tokio::test]
async fn packets_split_across_frames_and_coalesced_in_one() {
    let (_b, port) = broker();
    let mut ws = connect(port, "/mqtt", Some("mqtt")).await.expect("upgrade");
    // CONNECT in three frames, cut inside the fixed header and the payload.
    let c = connect_packet("ws-split");
    for part in [&c[..1], &c[1..9], &c[9..]] {
        ws.send(Message::binary(part.to_vec())).await.expect("send");
    }
    assert_eq!(read_bytes(&mut ws, CONNACK.len()).await, CONNACK);
    // SUBSCRIBE, then PUBLISH (to ourselves) and PINGREQ in one frame, and
    // the first half of another PINGREQ, completed by the next frame.
    ws.send(Message::binary(SUBSCRIBE.to_vec()))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut ws, SUBACK.len()).await, SUBACK);
    let mut frame = PUBLISH.to_vec();
    frame.extend_from_slice(PINGREQ);
    frame.push(PINGREQ[0]);
    ws.send(Message::binary(frame)).await.expect("send");
    ws.send(Message::binary(vec![PINGREQ[1]]))
        .await
        .expect("send");
    let got = read_bytes(&mut ws, PUBLISH.len() + 2 * PINGRESP.len()).await;
    // The delivery and the PINGRESPs may come in either order.
    let at = got
        .windows(PUBLISH.len())
        .position(|w| w == PUBLISH)
        .unwrap_or_else(|| panic!("no PUBLISH in {got:?}"));
    let mut rest = got[..at].to_vec();
    rest.extend_from_slice(&got[at + PUBLISH.len()..]);
    assert_eq!(rest, [PINGRESP, PINGRESP].concat());
}

#[tokio::test]
async fn websocket_ping_gets_pong_and_close_is_answered() {
    let (_b, port) = broker();
    let mut ws = connected(port, "ws-ping").await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("send");
    let m = timeout(WAIT, ws.next())
        .await
        .expect("timed out")
        .expect("ended")
        .expect("error");
    assert_eq!(m, Message::Pong(b"are you there".to_vec().into()));
    // MQTT still works after the ping.
    ws.send(Message::binary(PINGREQ.to_vec()))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut ws, 2).await, PINGRESP);
    ws.close(None).await.expect("close");
    match next_message(&mut ws).await {
        Some(Message::Close(_)) | None => {}
        other => panic!("expected the close to be answered, got {other:?}"),
    }
}

#[tokio::test]
async fn a_text_frame_is_closed_with_1003() {
    let (b, port) = broker();
    let mut ws = connected(port, "ws-text").await;
    ws.send(Message::text("hello")).await.expect("send");
    match next_message(&mut ws).await {
        Some(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Unsupported, "{f:?}"),
        other => panic!("expected close 1003, got {other:?}"),
    }
    let deadline = Instant::now() + WAIT;
    while !b.log_text().contains("text frame") {
        assert!(Instant::now() < deadline, "no log line:\n{}", b.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_broken_frame_is_closed_with_1002() {
    let (_b, port) = broker();
    let mut ws = connected(port, "ws-broken").await;
    // A client frame without a mask (RFC 6455 §5.1: the server must close).
    let MaybeTlsStream::Plain(tcp) = ws.get_mut() else {
        panic!("plain TCP expected");
    };
    tcp.write_all(&[0x82, 0x02, 0xC0, 0x00])
        .await
        .expect("write");
    match next_message(&mut ws).await {
        Some(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Protocol, "{f:?}"),
        other => panic!("expected close 1002, got {other:?}"),
    }
}

#[tokio::test]
async fn the_upgrade_checks_path_and_sub_protocol() {
    let (b, port) = broker();
    match connect(port, "/other", Some("mqtt")).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), StatusCode::NOT_FOUND),
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
    match connect(port, "/mqtt", Some("chat, superchat")).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), StatusCode::BAD_REQUEST),
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
    // mqttv3.1 is echoed; no sub-protocol at all is accepted.
    let mut ws = connect(port, "/mqtt", Some("chat, mqttv3.1"))
        .await
        .expect("mqttv3.1");
    ws.send(Message::binary(connect_packet("ws-v31")))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut ws, CONNACK.len()).await, CONNACK);
    let mut ws = connect(port, "/mqtt", None).await.expect("none offered");
    ws.send(Message::binary(connect_packet("ws-none")))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut ws, CONNACK.len()).await, CONNACK);
    let log = b.log_text();
    assert!(log.contains("wrong path (404)"), "{log}");
    assert!(log.contains("no MQTT sub-protocol offered"), "{log}");
}

#[tokio::test]
async fn websocket_and_tcp_clients_talk_to_each_other() {
    let (b, port) = broker();
    let mut ws = connected(port, "ws-sub").await;
    ws.send(Message::binary(SUBSCRIBE.to_vec()))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut ws, SUBACK.len()).await, SUBACK);
    // A plain TCP client publishes; the WebSocket client receives.
    let mut tcp = TcpStream::connect(("127.0.0.1", b.port))
        .await
        .expect("tcp");
    tcp.write_all(&connect_packet("tcp-pub"))
        .await
        .expect("write");
    let mut ack = [0u8; 4];
    timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut ack),
    )
    .await
    .expect("timed out")
    .expect("read");
    assert_eq!(ack, CONNACK);
    tcp.write_all(PUBLISH).await.expect("write");
    assert_eq!(read_bytes(&mut ws, PUBLISH.len()).await, PUBLISH);
}

#[tokio::test]
async fn a_proxy_protocol_header_before_the_upgrade_names_the_client() {
    // Both listeners are configured as 127.0.0.1:0, so both expect the header.
    let b = Broker::start_with(&[
        "--ws-listen",
        "127.0.0.1:0",
        "--proxy-protocol-listener",
        "127.0.0.1:0",
    ]);
    let deadline = Instant::now() + WAIT;
    let port = loop {
        if let Some(p) = ws_port(&b.log_text()) {
            break p;
        }
        assert!(Instant::now() < deadline, "no WebSocket listener");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    tcp.write_all(format!("PROXY TCP4 203.0.113.50 127.0.0.1 4444 {port}\r\n").as_bytes())
        .await
        .expect("header");
    let mut req = format!("ws://127.0.0.1:{port}/mqtt")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (ws, _) = timeout(
        WAIT,
        tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("handshake timed out")
    .expect("upgrade");
    let mut ws: Ws = ws;
    ws.send(Message::binary(connect_packet("ws-proxied")))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut ws, CONNACK.len()).await, CONNACK);
    let log = b.log_text();
    assert!(
        log.contains("New client connected from 203.0.113.50:4444 as ws-proxied"),
        "{log}"
    );
    assert!(
        log.contains("over ws, address from the PROXY protocol header (proxy 127.0.0.1:"),
        "{log}"
    );
}

#[tokio::test]
async fn a_frame_above_the_packet_limit_is_closed_with_1009() {
    let b = Broker::start_with(&["--ws-listen", "127.0.0.1:0", "--max-packet-size", "1024"]);
    let deadline = Instant::now() + WAIT;
    let port = loop {
        if let Some(p) = ws_port(&b.log_text()) {
            break p;
        }
        assert!(Instant::now() < deadline, "no WebSocket listener");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut ws = connected(port, "ws-big").await;
    // max_packet_size + 64 KiB is the most one frame may carry.
    ws.send(Message::binary(vec![0u8; 1024 + 64 * 1024 + 1]))
        .await
        .expect("send");
    match next_message(&mut ws).await {
        Some(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Size, "{f:?}"),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_connect_timeout() {
    let b = Broker::start_with(&["--ws-listen", "127.0.0.1:0", "--connect-timeout", "1"]);
    let deadline = Instant::now() + WAIT;
    let port = loop {
        if let Some(p) = ws_port(&b.log_text()) {
            break p;
        }
        assert!(Instant::now() < deadline, "no WebSocket listener");
        std::thread::sleep(Duration::from_millis(20));
    };
    // No HTTP request at all: closed by the upgrade's deadline.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = timeout(WAIT, tokio::io::AsyncReadExt::read(&mut tcp, &mut buf))
        .await
        .expect("not closed within the wait")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected a close, got {:?}", &buf[..n]);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
}

#[tokio::test]
async fn a_client_gone_without_a_close_frame_is_an_ordinary_disconnect() {
    let (b, port) = broker();
    let ws = connected(port, "ws-gone").await;
    drop(ws); // TCP closed, no close frame
    let deadline = Instant::now() + WAIT;
    while !b.log_text().contains("Client ws-gone disconnected") {
        assert!(
            Instant::now() < deadline,
            "no disconnect line:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = b.log_text();
    assert!(!log.contains("bad frame"), "{log}");
}

#[tokio::test]
async fn before_connect_a_client_may_not_send_more_than_a_connect() {
    // tungstenite buffers a whole frame (up to max_packet_size + 64 KiB)
    // before the broker sees a byte of it: before CONNECT is accepted a
    // client may send the upgrade, one CONNECT of at most
    // max_connect_packet_size (64 KiB) and a frame header, as over TCP
    // (issue 11, pre-authentication buffers).
    let (b, port) = broker();
    let mut ws = connect(port, "/mqtt", Some("mqtt")).await.expect("upgrade");
    // A frame of 300 KiB: far below the frame limit (1 MiB + 64 KiB), far
    // above what an unauthenticated client may send.
    let sent = ws.send(Message::binary(vec![0x10u8; 300 * 1024])).await;
    let closed = match sent {
        Err(_) => true,
        Ok(()) => matches!(next_message(&mut ws).await, None | Some(Message::Close(_))),
    };
    assert!(closed, "the connection must be closed");
    let deadline = Instant::now() + WAIT;
    while !b.log_text().contains("before its CONNECT was accepted") {
        assert!(Instant::now() < deadline, "no log line:\n{}", b.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn after_connect_a_large_publish_in_one_frame_is_delivered() {
    // Once CONNECT is accepted the limit is the packet size (1 MiB).
    let (_b, port) = broker();
    let mut sub = connected(port, "ws-big-sub").await;
    sub.send(Message::binary(SUBSCRIBE.to_vec()))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut sub, SUBACK.len()).await, SUBACK);
    let mut publ = connected(port, "ws-big-pub").await;
    let payload = vec![7u8; 300 * 1024];
    let mut packet = vec![0x30];
    let remaining = 2 + 4 + payload.len();
    let mut n = remaining;
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if n == 0 {
            break;
        }
    }
    packet.extend_from_slice(&[0, 4, b't', b'/', b'w', b's']);
    packet.extend_from_slice(&payload);
    publ.send(Message::binary(packet.clone()))
        .await
        .expect("send");
    assert_eq!(read_bytes(&mut sub, packet.len()).await, packet);
}
