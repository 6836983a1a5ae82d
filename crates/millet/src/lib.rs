//! # Millet
//!
//! An MQTT 3.1 / 3.1.1 / 5.0 message gateway.
//!
//! ## Layout
//! - [`millet_codec`] (separate crate): packets ⇄ bytes, sans-IO, errors carry reason codes.
//! - [`protocol`]: one connection's state machine (CONNECT, keep-alive, aliases,
//!   QoS handshakes, flow control), sans-IO, driven with `now`; it asks the
//!   engine for what may cross a network and waits for the answer.
//! - [`engine`]: the seam to shared, durable state (attach with takeover,
//!   subscribe, unsubscribe, detach, answered now or later; publish, whose
//!   durability ticket is done now or later); [`engine::delaying`] answers
//!   late on purpose, for tests.
//! - [`hooks`]: authorization (answered in place, or later through the
//!   same pending path) and events (connected, published, subscribed,
//!   delivered, disconnected) for the rules engine and thing models to come.
//! - [`session`]: what outlives a connection: subscriptions, queue, in-flight
//!   window, QoS 2 ids awaiting PUBREL, will, expiry.
//! - [`broker`]: the embedded engine: routing (subscription index, `$share`
//!   groups), retained messages, client registry and takeover, delayed
//!   wills, `$SYS`, and the redb store behind its write-ahead log
//!   ([`broker::persist`], [`store`]).
//! - [`node`]: what the process holds about itself on any engine
//!   (configuration, counters, security settings, the memory meter); the
//!   protocol reaches it and the engine, never the broker.
//! - [`budget`]: node-wide memory accounting (`limits.memory_budget`).
//! - [`alias`]: topic aliases both ways (O(1) outbound assignment with replacement).
//! - [`auth`]: the enhanced-authentication (AUTH) provider interface.
//! - [`security`]: TLS, the authentication chain, ACL, quotas and bans.
//! - [`config`]: configuration layers (defaults, TOML, env, flags).
//! - [`server`]: the tokio driver: listeners, connection tasks and the
//!   plain-TCP event loops (`server/reactor.rs`), ticker, drain.
//! - [`tools`]: the `millet passwd` / `millet scram` credential tools.
//! - [`admin`]: the admin HTTP API (axum), API keys, Prometheus `/metrics`.
//! - [`histogram`]: fixed-bucket latency histograms for `/metrics`.

// No unsafe code (the TCP event loops' epoll set was registered with tokio
// through an `unsafe fn` until they became threads of their own).
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod alias;
pub mod auth;
pub mod broker;
pub mod budget;
pub mod config;
pub mod engine;
pub mod histogram;
pub mod hooks;
pub mod lazy;
pub mod node;
pub mod protocol;
pub mod proxy;
pub mod security;
pub mod server;
pub mod session;
pub mod stamp;
pub mod store;
pub mod tools;
pub mod ws;
