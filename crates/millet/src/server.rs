//! The IO driver: TCP listeners, one task per connection, the broker ticker,
//! and graceful drain on SIGINT / SIGTERM.
//!
//! A connection task only moves bytes, wake-ups and timers in and out of
//! [`crate::protocol::Connection`]; it makes no protocol decisions. It waits
//! for readability without holding a read buffer, so an idle connection keeps
//! no per-connection buffers.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use millet_codec::decode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::broker::Broker;
use crate::config::Config;
use crate::protocol::Connection;

/// Read sizes adapt between these bounds: a read that fills the buffer
/// doubles the next one, one that doesn't halves it. Idle and lightly loaded
/// connections (the fleet's common case) read small, so connection bursts and
/// retained pieces of the read buffer stay small; busy publishers read big.
const READ_MIN: usize = 512;
const READ_MAX: usize = 64 * 1024;
/// Write buffers above this capacity are released after each flush.
const KEEP_WRITE_CAPACITY: usize = 8 * 1024;

/// A running server: its bound addresses, and a handle to stop it.
pub struct Server {
    pub addrs: Vec<SocketAddr>,
    pub broker: Arc<Broker>,
    shutdown: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Bind every listener and start serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let broker = Arc::new(Broker::new(config.clone(), Instant::now()));
        Self::start_with(broker).await
    }

    pub async fn start_with(broker: Arc<Broker>) -> anyhow::Result<Server> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (done_tx, done) = mpsc::channel::<()>(1);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for addr in &broker.config.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            let local = listener.local_addr()?;
            tracing::info!(addr = %local, "listening for MQTT over TCP");
            addrs.push(local);
            tasks.push(tokio::spawn(accept_loop(
                listener,
                broker.clone(),
                shutdown_rx.clone(),
                done_tx.clone(),
            )));
        }
        tasks.push(tokio::spawn(ticker(broker.clone(), shutdown_rx.clone())));
        drop(done_tx);
        Ok(Server {
            addrs,
            broker,
            shutdown,
            done,
            tasks,
        })
    }

    /// Stop accepting, send DISCONNECT 0x8B to v5 clients, flush, and wait
    /// (at most `grace`) for every connection to finish.
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
        // Connection tasks hold `done` senders; recv() returns None when all are gone.
        let _ = tokio::time::timeout(grace, self.done.recv()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let broker = broker.clone();
                    let shutdown = shutdown.clone();
                    let done = done.clone();
                    let fut = async move {
                        serve(stream, peer, broker, shutdown).await;
                        drop(done);
                    };
                    tracing::trace!(bytes = std::mem::size_of_val(&fut), "connection task size");
                    tokio::spawn(fut);
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn ticker(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(250));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => broker.handle_timeout(Instant::now()),
            _ = shutdown.changed() => return,
        }
    }
}

/// Drive one connection until it closes.
async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn = Connection::new(broker.clone(), Instant::now());
    let mut rbuf = BytesMut::new();
    let mut wbuf = BytesMut::new();
    let mut eof = false;
    let mut read_size = READ_MIN;
    let mut shutting_down = false;
    loop {
        // 1. Decode and handle every complete packet received so far.
        while conn.poll_close().is_none() && !rbuf.is_empty() {
            match decode(&mut rbuf, conn.protocol(), conn.max_packet_size()) {
                Ok(Some(p)) => conn.handle_packet(p, Instant::now()),
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(%peer, client_id = conn.client_id().unwrap_or(""), error = %e,
                        reason = %e.reason_code(), "malformed packet; closing");
                    conn.handle_decode_error(&e);
                }
            }
        }
        if rbuf.is_empty() && rbuf.capacity() > 0 {
            rbuf = BytesMut::new(); // idle: hold no read buffer
        }
        // 2. Write what the state machine produced.
        conn.poll_transmit(Instant::now(), &mut wbuf);
        if !wbuf.is_empty() {
            if stream.write_all(&wbuf).await.is_err() {
                break;
            }
            if wbuf.capacity() > KEEP_WRITE_CAPACITY {
                wbuf = BytesMut::new();
            } else {
                wbuf.clear();
            }
        }
        if let Some(c) = conn.poll_close() {
            tracing::debug!(%peer, client_id = conn.client_id().unwrap_or(""), reason = %c.reason, why = %c.why, "closing connection");
            break;
        }
        if eof {
            tracing::debug!(%peer, client_id = conn.client_id().unwrap_or(""), "connection closed by peer");
            break;
        }
        // 3. Wait for input, a delivery, the timer or shutdown.
        let deadline = conn.poll_timeout().map(tokio::time::Instant::from_std);
        let waker = conn.waker().clone();
        tokio::select! {
            r = stream.readable(), if !conn.is_paused() => {
                if r.is_err() { break; }
                loop {
                    rbuf.reserve(read_size);
                    let space = rbuf.capacity() - rbuf.len();
                    match stream.try_read_buf(&mut rbuf) {
                        Ok(0) => { eof = true; break; }
                        Ok(n) if n == space => {
                            read_size = (read_size * 2).min(READ_MAX);
                            if rbuf.len() >= READ_MAX { break; }
                        }
                        Ok(_) => { read_size = (read_size / 2).max(READ_MIN); break; }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => { eof = true; break; }
                    }
                }
            }
            _ = waker.notified() => {}
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                conn.handle_timeout(Instant::now());
            }
            _ = shutdown.changed(), if !shutting_down => {
                shutting_down = true;
                conn.handle_shutdown();
            }
        }
    }
    let _ = stream.shutdown().await;
    conn.handle_closed(Instant::now());
}
