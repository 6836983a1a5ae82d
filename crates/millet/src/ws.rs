//! MQTT over WebSocket (`ws` and `wss` listeners): the HTTP upgrade and a
//! byte-stream adapter over the WebSocket's binary messages.
//!
//! The connection task ([`crate::server`]) sees a WebSocket connection as a
//! byte stream like TCP: the payloads of binary messages are read in order
//! and MQTT packets are decoded from them as from a socket, so a packet
//! split across frames and several packets in one frame both work (MQTT
//! 3.1.1 §6, MQTT 5 §6). Each write goes out as one binary message. Pings
//! are answered by tungstenite; a close from the client is end of stream.
//! A text frame is answered with close 1003 (unsupported data), a broken
//! frame with 1002 (protocol error) or 1009 (too big), each with one log line.
//!
//! The upgrade accepts `GET` on [`Config::ws_path`] only (else 404) and the
//! sub-protocols `mqtt` and `mqttv3.1`: the first one the client offers is
//! echoed; a client offering sub-protocols but none of these is refused
//! (400); one offering none is accepted, as Mosquitto and EMQX do.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::config::Config;

/// The MQTT sub-protocol names a client may offer (MQTT 3.1.1 and 5.0 say
/// `mqtt`; MQTT 3.1 clients say `mqttv3.1`).
pub const SUBPROTOCOLS: &[&str] = &["mqtt", "mqttv3.1"];

/// The most bytes of HTTP request the upgrade reads (tungstenite's own
/// bound), charged to the pre-authentication memory budget while it runs.
pub const HANDSHAKE_MAX_BYTES: usize = 64 * 1024;

/// What a WebSocket listener needs to know.
pub struct WsSettings {
    path: String,
    config: WebSocketConfig,
    /// Bytes a connection may send before its CONNECT is accepted (see
    /// [`Capped`]).
    preauth_cap: usize,
}

impl WsSettings {
    pub fn from_config(c: &Config) -> WsSettings {
        // One frame (or message) holds at most one packet of the largest
        // size plus some more (several small packets, or the start of the
        // next): tungstenite buffers a whole frame before handing it over.
        let max = (c.limits.max_packet_size as usize).saturating_add(64 * 1024);
        WsSettings {
            preauth_cap: HANDSHAKE_MAX_BYTES
                .saturating_add(c.limits.max_connect_packet_size as usize)
                .saturating_add(64),
            path: c.ws_path.clone(),
            config: WebSocketConfig::default()
                // Small: most MQTT connections are quiet devices.
                .read_buffer_size(4096)
                // Each write is one message, sent at once; the connection
                // task flushes and handles back-pressure itself.
                .write_buffer_size(0)
                .max_message_size(Some(max))
                .max_frame_size(Some(max)),
        }
    }
}

/// Why an upgrade was refused by us (for the log line).
enum Refusal {
    Path(String),
    Subprotocols(String),
}

/// Do the HTTP upgrade on `stream` (TCP, or TLS for wss). `None` (after one
/// log line) when it fails; the caller bounds it by the connect timeout.
pub async fn accept<S>(stream: S, settings: &WsSettings, peer: SocketAddr) -> Option<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut refused = None;
    // The signature is tungstenite's `Callback`.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != settings.path {
            refused = Some(Refusal::Path(req.uri().path().to_string()));
            return Err(error_response(
                StatusCode::NOT_FOUND,
                format!("MQTT over WebSocket is served at {}\n", settings.path),
            ));
        }
        match choose_subprotocol(req) {
            Ok(Some(p)) => {
                resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, p);
                Ok(resp)
            }
            Ok(None) => Ok(resp),
            Err(offered) => {
                refused = Some(Refusal::Subprotocols(offered));
                Err(error_response(
                    StatusCode::BAD_REQUEST,
                    "unsupported WebSocket sub-protocol: offer mqtt or mqttv3.1\n".to_string(),
                ))
            }
        }
    };
    let stream = Capped {
        inner: stream,
        left: Some(settings.preauth_cap),
        peer,
    };
    let r =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(settings.config))
            .await;
    match r {
        Ok(ws) => Some(WsStream {
            ws,
            pending: Bytes::new(),
            close: None,
            ended: false,
            peer,
        }),
        Err(e) => {
            match refused {
                Some(Refusal::Path(p)) => {
                    tracing::info!(%peer, path = %p, expected = %settings.path, "WebSocket upgrade refused: wrong path (404)");
                }
                Some(Refusal::Subprotocols(o)) => {
                    tracing::info!(%peer, offered = %o, "WebSocket upgrade refused: no MQTT sub-protocol offered (400; mqtt or mqttv3.1 expected)");
                }
                None => tracing::debug!(%peer, error = %e, "WebSocket upgrade failed"),
            }
            None
        }
    }
}

fn error_response(status: StatusCode, text: String) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(text));
    *r.status_mut() = status;
    r
}

/// The sub-protocol to echo: the first of [`SUBPROTOCOLS`] the client
/// offers (in its order); `Ok(None)` if it offers none; `Err(offered)` if it
/// offers some but none of ours.
fn choose_subprotocol(req: &Request) -> Result<Option<HeaderValue>, String> {
    let mut offered = Vec::new();
    for v in req.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let text = String::from_utf8_lossy(v.as_bytes());
        for p in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if SUBPROTOCOLS.contains(&p) {
                return Ok(Some(HeaderValue::from_static(if p == "mqtt" {
                    "mqtt"
                } else {
                    "mqttv3.1"
                })));
            }
            offered.push(p.to_string());
        }
    }
    if offered.is_empty() {
        Ok(None)
    } else {
        Err(offered.join(", "))
    }
}

/// A WebSocket connection as a byte stream: reads yield the payloads of
/// binary messages, each write is sent as one binary message.
pub struct WsStream<S> {
    ws: WebSocketStream<Capped<S>>,
    /// What is left of the last binary message.
    pending: Bytes,
    /// The close frame to send at shutdown (a refused frame's reason).
    close: Option<CloseFrame>,
    /// Reading is over (close received, or a refused frame).
    ended: bool,
    peer: SocketAddr,
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Append what the client sent to `buf`: the payloads of every binary
    /// message already received, until `want` bytes or nothing more is
    /// there (one message per call would make a connection task take a
    /// turn per MQTT packet: MQTT.js sends each packet as a frame).
    /// `Ready(Ok(0))` at the end of the stream (a close frame, or a frame
    /// refused: the close that says why goes out at shutdown).
    pub fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        let mut total = 0;
        loop {
            if !self.pending.is_empty() {
                total += self.pending.len();
                buf.extend_from_slice(&self.pending);
                self.pending = Bytes::new();
                if total >= want {
                    return Poll::Ready(Ok(total));
                }
            }
            if self.ended {
                return Poll::Ready(Ok(total));
            }
            let next = match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending if total > 0 => return Poll::Ready(Ok(total)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(next) => next,
            };
            match next {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                // tungstenite answers pings itself (on the next read or write).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // A client that goes away without a close frame is no
                // protocol error worth a line: TCP clients do that too.
                Some(Ok(Message::Close(_)))
                | None
                | Some(Err(
                    WsError::ConnectionClosed
                    | WsError::AlreadyClosed
                    | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                )) => {
                    self.ended = true;
                }
                Some(Ok(Message::Text(_))) => self.refuse(
                    CloseCode::Unsupported,
                    "text frame: MQTT over WebSocket uses binary frames",
                ),
                Some(Err(WsError::Io(e))) if total == 0 => return Poll::Ready(Err(e)),
                Some(Err(WsError::Io(e))) => {
                    // Hand over what came first; the next read says end.
                    tracing::debug!(peer = %self.peer, error = %e, "WebSocket read failed");
                    self.ended = true;
                }
                Some(Err(e @ WsError::Capacity(_))) => {
                    self.refuse(CloseCode::Size, &format!("frame too big: {e}"));
                }
                Some(Err(e)) => {
                    self.refuse(CloseCode::Protocol, &format!("bad frame: {e}"));
                }
            }
        }
    }

    /// The CONNECT was accepted: the client may now send frames up to the
    /// packet size limit (see [`Capped`]).
    pub fn connect_accepted(&mut self) {
        self.ws.get_mut().left = None;
    }

    /// End reading; close with `code` at shutdown. One log line.
    fn refuse(&mut self, code: CloseCode, why: &str) {
        tracing::info!(peer = %self.peer, code = u16::from(code), "WebSocket {why}: closing");
        self.ended = true;
        self.close = Some(CloseFrame {
            code,
            reason: why.into(),
        });
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(to_io)
    }

    /// Send a close frame (the refused frame's code, else 1000) and flush.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.close.is_some() {
            ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
            let frame = this.close.take();
            // Fails only if a close already went out: nothing to add then.
            let _ = Pin::new(&mut this.ws).start_send(Message::Close(frame));
        }
        Pin::new(&mut this.ws).poll_close(cx).map_err(to_io)
    }
}

/// The socket under a WebSocket connection, counting what the client sends
/// before its CONNECT is accepted. tungstenite buffers a whole frame before
/// handing it over, and a frame may be as large as the largest packet (1
/// MiB by default), where a TCP connection is refused from the fixed header
/// of a CONNECT over `limits.max_connect_packet_size`: so until then the
/// client may send at most the upgrade request, one such CONNECT and a
/// frame header ([`WsSettings`]); one read more ends the connection. That
/// bounds an unauthenticated WebSocket connection like a TCP one (to within
/// one read of tungstenite's 4 KiB buffer).
pub struct Capped<S> {
    inner: S,
    /// Bytes still allowed; `None` once the CONNECT was accepted.
    left: Option<usize>,
    peer: SocketAddr,
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if let Some(left) = self.left {
            match left.checked_sub(n) {
                Some(rest) => self.left = Some(rest),
                None => {
                    tracing::info!(peer = %self.peer, "WebSocket client sent more than a CONNECT before its CONNECT was accepted: closing");
                    return Poll::Ready(Err(io::Error::other(
                        "too many bytes before CONNECT was accepted",
                    )));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(protocols: &[&str]) -> Request {
        let mut b = Request::builder().uri("/mqtt");
        for p in protocols {
            b = b.header(header::SEC_WEBSOCKET_PROTOCOL, *p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn subprotocols_are_chosen_in_the_clients_order() {
        assert_eq!(choose_subprotocol(&req(&[])), Ok(None));
        assert_eq!(
            choose_subprotocol(&req(&["mqtt"])),
            Ok(Some(HeaderValue::from_static("mqtt")))
        );
        assert_eq!(
            choose_subprotocol(&req(&["wamp, mqttv3.1, mqtt"])),
            Ok(Some(HeaderValue::from_static("mqttv3.1")))
        );
        assert_eq!(
            choose_subprotocol(&req(&["chat", "mqtt"])),
            Ok(Some(HeaderValue::from_static("mqtt")))
        );
        assert_eq!(
            choose_subprotocol(&req(&["chat, MQTT"])),
            Err("chat, MQTT".to_string())
        );
    }
}
