//! A connection task that panics still detaches its session (issue 10,
//! item 2): the session goes offline, its expiry starts and its will is
//! published, as after any abnormal close [MQTT-3.1.2-8].
//!
//! The server runs in process (so the test can inject the panic through
//! `Node::panic_on_publish_to`, and look at the session afterwards); the
//! clients are rumqttc over real sockets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{v5, MqttClient, V4, V5};
use millet::broker::Broker;
use millet::config::Config;
use millet::server::Server;

const PANIC_TOPIC: &str = "test/panic-now";

async fn start() -> (Server, Arc<Broker>, u16) {
    let config = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        sys_interval: 0,
        ws_listen: Vec::new(),
        admin: millet::config::AdminConfig {
            enabled: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let broker = Arc::new(Broker::new(config, Instant::now()));
    broker.node.panic_on_publish_to(PANIC_TOPIC);
    let server = Server::start_with(broker.clone()).await.unwrap();
    let port = server.addrs[0].port();
    (server, broker, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_task_still_detaches_its_session() {
    let (server, broker, port) = start().await;

    let mut w = rumqttc::MqttOptions::new("watcher", "127.0.0.1", port);
    w.set_keep_alive(Duration::from_secs(30));
    let (mut watcher, _) = V4::connect_with(w).await;
    assert_eq!(watcher.subscribe("wills/#", 1).await, 1);

    let mut o = v5::MqttOptions::new("victim", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    o.set_last_will(v5::LastWill::new(
        "wills/victim",
        "gone",
        v5::QoS::AtLeastOnce,
        false,
        None,
    ));
    let (mut victim, _) = V5::connect_with(o).await;
    assert_eq!(
        broker
            .node
            .stats
            .clients_connected
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // The victim's connection task panics while handling this PUBLISH.
    victim
        .client
        .publish(PANIC_TOPIC, v5::QoS::AtMostOnce, false, b"boom".to_vec())
        .await
        .unwrap();
    victim.wait_closed().await;

    // The will is published [MQTT-3.1.2-8] ...
    let m = watcher.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.text().as_str()),
        ("wills/victim", "gone")
    );
    // ... the session is offline with its expiry running ...
    let cell = broker
        .all_sessions()
        .into_iter()
        .find(|c| c.client_id == "victim")
        .expect("the persistent session outlives the connection");
    {
        let st = cell.state.lock();
        assert_eq!(st.conn_epoch, 0, "session still marked online");
        assert!(
            st.session.expires_at.is_some(),
            "session expiry not started"
        );
    }
    assert_eq!(
        broker
            .node
            .stats
            .clients_connected
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // ... and it ends when that expiry passes (fake time for the broker's clock).
    broker.handle_timeout(Instant::now() + Duration::from_secs(61));
    assert!(
        broker
            .all_sessions()
            .iter()
            .all(|c| c.client_id != "victim"),
        "session did not expire"
    );

    // The server still serves.
    let mut o = rumqttc::MqttOptions::new("after", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (mut after, _) = V4::connect_with(o).await;
    after.publish("wills/after", 1, false, b"alive").await;
    assert_eq!(watcher.recv().await.text(), "alive");
    server.shutdown(Duration::from_secs(3)).await;
}
