//! Cluster mode on NATS (issue 13, docs/CLUSTER.md): the nodes of a
//! cluster route to each other through core NATS.
//!
//! What is built: **live routing** ("Routing" in docs/CLUSTER.md).
//! - A publish made on a node is routed to that node's own plain
//!   subscribers in-process, as on one node, and published once to NATS on
//!   subject `m.<qos>.<topic>` ([`subject::topic_to_subject`]), with the
//!   origin node (a random id per process) in a header.
//! - Each node subscribes once per distinct filter its sessions hold
//!   (reference-counted by the broker's index: [`ClusterLink`]), so a
//!   message reaches only the nodes with interest in it.
//! - A node drops the copies of its own messages (it routed them already);
//!   a node holding overlapping filters (`a/+` and `a/b`) gets one copy per
//!   filter from NATS, and each session takes a topic's messages from the
//!   copy of the least of its filters matching it ([`Scope::Via`]): once
//!   each, in order.
//! - Shared subscriptions are NATS queue groups, one per `$share/g/f` on
//!   every node with members: NATS gives each message to one node of the
//!   group, which gives it to one of its members. Local publishes reach
//!   local members through NATS too, so a message goes to one member
//!   cluster-wide.
//! - A SUBACK is sent once the node's NATS server has the subscriptions
//!   (a request round trip after them): a message published after the
//!   SUBACK on a node of the same NATS server reaches the subscriber.
//!
//! - Takeover across nodes: the client id's owner entry in JetStream KV
//!   (`Owners`); wills of a dead node (`Wills`); retained messages in
//!   JetStream (`Retained`), acknowledged once stored (`Tickets`); QoS 1/2
//!   refused and new connections turned away while NATS is unreachable
//!   (`NATS_DOWN`).
//!
//! - QoS 1/2 messages are published to JetStream (`MILLET_MSGS`), which
//!   stores them (R3) and delivers them to the subscriptions; the publish
//!   ticket waits for JetStream's acknowledgement (`publisher`).
//!
//! - Sessions move with their clients: the node a client reconnects to
//!   asks the node that holds its session for it with the takeover
//!   (`kick_remote`, `kick_service`, [`MovedRecord`]).
//!
//! - A dead node's persistent sessions resume on the node their clients
//!   reconnect to: recorded in KV, caught up from `MILLET_MSGS`
//!   ([`Sessions`]).
//!
//! - A node back from a NATS break catches up from `MILLET_MSGS`
//!   ([`NatsLink::catch_up_node`]); a leaving shared member's unacknowledged
//!   messages go to another member (`REDELIVER`).
//!
//! Not yet built (issue 13's open parts, in docs/CLUSTER.md): exactly once
//! across a node's death, the move's window, `FILTERS`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use bytestring::ByteString;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{
    subject, AckStatus, Acknowledged, AttachRequest, Call, Completion, Engine, Qos2Arrival, Reply,
    SessionAck, SessionWrites, SubscribeRequest, Ticket, UnsubscribeRequest,
};
use crate::broker::{
    qos2_digest, Broker, ClusterLink, MovedSession, Qos2Resume, Routed, Scope, SessionRefusal,
};
use crate::config::NatsConfig;
use crate::session::Message;
use crate::session::{
    ConnWaker, DeferredReplay, Delivery, Inflight, InflightState, Session, SessionCell,
    Subscription,
};
use crate::store::records::{MessageRecord, SubscriptionRecord};

/// The oldest NATS server this engine works with. Core routing needs
/// headers (2.2) and "no responders" (2.2); JetStream's parts will need
/// 2.10 (multi-filter consumers) and 2.11 (per-message TTL): asked for now,
/// so that no cluster is set up on a server it will outgrow.
const MIN_SERVER: (u64, u64) = (2, 11);

/// Subject prefix of a shared subscription's redeliveries: a member that
/// left with messages not acknowledged has its node give them to another
/// member, through the group's own subject (`<prefix>.<queue group>`), so
/// that no plain subscription gets them twice.
const REDELIVER: &str = "_MILLET.share";

/// Header: how many times a shared subscription's message was passed on
/// by a node with no member left ([`NatsLink::redeliver`]); at most
/// [`MAX_HOPS`].
const HOPS: &str = "Millet-Hops";
const MAX_HOPS: u32 = 5;

/// Header: the publishing node's incarnation (random per process start).
const ORIGIN: &str = "Millet-Origin";

/// Messages waiting to be handed to the NATS client; past this a publish
/// is not forwarded (counted, and logged at most once a minute).
const FORWARD_QUEUE: usize = 65_536;

/// A node's link to the others through NATS.
pub struct NatsLink {
    node_id: String,
    /// This process's incarnation: a node that restarts is a new origin.
    origin: u64,
    origin_header: HeaderValue,
    out: mpsc::Sender<Forward>,
    last_store_error_line: Mutex<Option<Instant>>,
    ctl: mpsc::UnboundedSender<Control>,
    forward_dropped: AtomicU64,
    last_drop_line: Mutex<Option<Instant>>,
    /// The NATS connection is up (the client's events).
    up: Arc<std::sync::atomic::AtomicBool>,
    refused: AtomicU64,
    last_refusal_line: Mutex<Option<Instant>>,
    /// Who owns each client id cluster-wide ([`Owners`]).
    owners: Owners,
    /// The runtime the NATS tasks run on (engine calls come from the
    /// connections' threads).
    rt: tokio::runtime::Handle,
    /// The wills of this node's connections, kept in JetStream for the
    /// other nodes should this one die ([`Wills`]).
    wills: Wills,
    /// The cluster's retained messages ([`Retained`]).
    retained: Retained,
    /// Acknowledgements waiting for JetStream ([`Tickets`]).
    tickets: Tickets,
    /// Persistent sessions in KV, for when this node dies ([`Sessions`]).
    sessions: Sessions,
    /// The broker this link serves (which holds the link).
    broker: Weak<Broker>,
    /// This link (for the tasks it starts).
    myself: Weak<NatsLink>,
}

/// Retained messages live in the stream `MILLET_RETAINED`, one per topic:
/// subject `r.<topic>` ([`subject::topic_to_subject`]), last message per
/// subject kept, replicated like the rest. The payload is the message
/// record, with the absolute expiry; a message expiry interval is also the
/// stream message's TTL (`Nats-TTL`, NATS 2.11), so JetStream removes it.
/// Clearing a topic (an empty retained payload) stores an empty record,
/// which replaces the message and expires after [`TOMBSTONE_TTL`].
///
/// No node loads them all: a subscription asks for its own. A filter
/// without wildcards is one direct get of the subject's last message,
/// served by any replica; a wildcard filter reads through an ordered
/// consumer on the filter's subjects (last per subject), which exists only
/// while it reads.
struct Retained {
    stream: async_nats::jetstream::stream::Stream,
    /// Stores in order (a topic's later message must replace its earlier
    /// one): subject, headers, record, and the ticket id to complete
    /// (0: none).
    tx: mpsc::Sender<(String, HeaderMap, Bytes, u64)>,
    last_error_line: Mutex<Option<Instant>>,
    /// The last "retained store full" line (at most one a minute).
    last_full_line: Mutex<Option<Instant>>,
}

/// A cleared retained topic's empty record stays this long.
const TOMBSTONE_TTL: Duration = Duration::from_secs(60);
/// A replay reads at most this long from JetStream...
const REPLAY_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and stops when nothing came for this long.
const REPLAY_QUIET: Duration = Duration::from_secs(2);

/// Tickets of this engine's own: an acknowledgement that waits for
/// JetStream (a QoS 1/2 or a retained message stored) and then for another
/// ticket (the node's store, or another of these). Their numbers have the top bit set
/// ([`CLUSTER_TICKET`]); [`NATS_DOWN`] is apart.
#[derive(Default)]
struct Tickets {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, PendingTicket>>,
}

struct PendingTicket {
    /// JetStream's answer: stored, or not.
    stored: Option<bool>,
    /// What is waited for after it.
    then: Ticket,
    waiters: Vec<Arc<ConnWaker>>,
    /// When JetStream answered (an entry nobody asked about is dropped a
    /// while later: its connection went away).
    answered: Option<Instant>,
}

const CLUSTER_TICKET: u64 = 1 << 63;

fn is_cluster_ticket(t: Ticket) -> bool {
    t.0 & CLUSTER_TICKET != 0 && t != NATS_DOWN
}

/// Wills of a dead node. Each connection's will is stored in the
/// `MILLET_WILLS` stream at `w.<origin>.<client id hash>` (last one per
/// subject) when it attaches, and purged when it ends (its node published
/// it, or did not have to). Every node heartbeats in the `millet_nodes` KV
/// bucket (entries expire after [`NODE_TTL`]) and is listed in
/// `millet_members`. A member whose heartbeat expired is dead: the node
/// that deletes its member entry (compare-and-set on the revision: one
/// does) publishes its wills, each after its delay, and purges them.
struct Wills {
    stream: async_nats::jetstream::stream::Stream,
    js: async_nats::jetstream::Context,
    nodes: async_nats::jetstream::kv::Store,
    members: async_nats::jetstream::kv::Store,
    /// This node's stored wills, by client id: stream sequence and the
    /// connection's epoch.
    stored: Mutex<HashMap<ByteString, (u64, u64)>>,
}

/// Persistent sessions, for the nodes that outlive the one holding them
/// (docs/CLUSTER.md, "Sessions of a dead node"). The session's node keeps
/// two KV entries per persistent session, keyed like the owner entry:
/// - `millet_sessions`: the session record ([`SessionKv`]: client id,
///   expiry, subscriptions), written when a connection attaches and when
///   its subscriptions change;
/// - `millet_marks`: the *mark*, a time (unix ms) at which the session had
///   nothing queued or in flight, written when a connection attaches or
///   ends with nothing pending, and by a checkpoint every
///   [`CHECKPOINT`] for connected sessions that were sent QoS 1/2 messages
///   since and have none pending.
///
/// A node taking over a client id whose owner does not answer (dead)
/// rebuilds the session from its record and catches up from
/// `MILLET_MSGS`: every QoS 1/2 message its filters match stored since the
/// mark (less [`MARK_MARGIN`]). At least once: what the dead node had
/// delivered since the mark comes again.
struct Sessions {
    kv: async_nats::jetstream::kv::Store,
    marks: async_nats::jetstream::kv::Store,
    /// `millet_qos2`: a persistent session's incoming QoS 2 ids awaiting
    /// their PUBREL ([`NatsLink::save_qos2`]).
    qos2: async_nats::jetstream::kv::Store,
    /// `MILLET_QOS2OUT`: persistent sessions' outgoing QoS 2 events
    /// ([`Qos2Event`]).
    qos2_out: async_nats::jetstream::stream::Stream,
    messages: async_nats::jetstream::stream::Stream,
    /// Writes, in order, to [`session_writer`].
    tx: mpsc::UnboundedSender<SessionOp>,
    /// The client ids this node wrote a session record for (deleted when
    /// the session ends here).
    recorded: Mutex<std::collections::HashSet<ByteString>>,
    /// When sessions kept here lost their connections, in the last second
    /// or so ([`NatsLink::complete_before`]).
    detached: Mutex<HashMap<ByteString, Instant>>,
}

/// A write of [`Sessions`], applied in order by [`session_writer`].
enum SessionOp {
    Put {
        key: String,
        record: Bytes,
    },
    Mark {
        key: String,
        at_ms: u64,
    },
    Delete {
        key: String,
    },
    /// The incoming QoS 2 ids awaiting their PUBREL (none: the entry is
    /// deleted), and the ticket to answer once stored (0: none).
    Qos2 {
        key: String,
        ids: Vec<u16>,
        ticket: u64,
    },
    /// Outgoing QoS 2 events of a session, to `MILLET_QOS2OUT`, and the
    /// ticket to answer once stored (0: none).
    Qos2Out {
        key: String,
        events: Vec<Qos2Event>,
        ticket: u64,
    },
    /// Answered once every write before it is acknowledged (or failed).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A persistent session's record in `millet_sessions` (postcard).
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionKv {
    client_id: String,
    expiry_interval: u32,
    subscriptions: Vec<SubscriptionRecord>,
    /// When its connection ended (unix ms); `None` while one is attached.
    /// A node that recovers the session of a dead node treats it as
    /// expired from there ([MQTT-3.1.2-23]'s clock runs from the
    /// disconnection).
    offline_since_ms: Option<u64>,
}

/// How often connected sessions' marks move on ([`Sessions`]).
const CHECKPOINT: Duration = Duration::from_secs(10);

/// A catch-up starts this long before the mark: for clock differences
/// between nodes and NATS servers, and messages stored but still on their
/// way to the node when the mark was taken.
const MARK_MARGIN: Duration = Duration::from_secs(2);

/// A session moving between nodes reads back from `MILLET_MSGS` what was
/// stored from this long before the move, when the old node does not say
/// from when ([`NatsLink::complete_before`]).
const MOVE_MARGIN: Duration = Duration::from_millis(250);

/// A catch-up from `MILLET_MSGS` reads what was stored when it began, and
/// goes on with what is stored meanwhile for this long: NATS propagates a
/// new subscription to the other servers of its cluster asynchronously,
/// and what a server publishes before it has it does not reach the node.
const CATCH_UP_FOLLOW: Duration = Duration::from_millis(250);

/// How long a message may take from its publisher's node to the node of a
/// session that moves, as [`NatsLink::complete_before`] counts it.
const MOVE_TRANSIT: Duration = Duration::from_millis(250);

/// A node back from a NATS break reads at most this many messages of
/// `MILLET_MSGS` to catch up ([`NatsLink::catch_up_node`]).
const NODE_CATCH_UP: u64 = 1_000_000;

/// How long a node tries to set up its JetStream state at start-up (at
/// least; `connect_timeout_secs` if longer).
const SETUP_TIME: Duration = Duration::from_secs(30);

/// `attempt` until it succeeds, or fails at or after `deadline`.
async fn retrying<T, E, F, Fut>(deadline: Instant, mut attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "cluster: JetStream not ready yet: retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// The KV bucket of `config`, created if need be, whose entries may carry
/// a TTL of their own (`Nats-TTL`, NATS 2.11): the entries a dead node
/// leaves are given what is left of their sessions' expiry
/// ([`NatsLink::expire_sessions_of`]). Opened first: once a node let the
/// entries expire, the bucket's configuration is no longer the one
/// `create_key_value` would ask for.
async fn kv_with_entry_ttl(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::kv::Config,
) -> Result<async_nats::jetstream::kv::Store, async_nats::Error> {
    let kv = match js.get_key_value(&config.bucket).await {
        Ok(kv) => kv,
        Err(_) => js.create_key_value(config.clone()).await?,
    };
    let mut stream = js.get_stream(format!("KV_{}", config.bucket)).await?;
    let mut stream_config = stream.info().await?.config.clone();
    if !stream_config.allow_message_ttl {
        stream_config.allow_message_ttl = true;
        js.update_stream(stream_config).await?;
    }
    Ok(kv)
}

/// The stream of `config`, created if need be; an existing one whose
/// limits (`max_age`, `max_messages`, `max_bytes`, `discard`) differ from
/// `config`'s gets them, the rest of its configuration kept: a changed
/// `message_retention_secs` or retained cap applies to the cluster at the
/// next node's start (the last node started sets them: keep the nodes'
/// settings equal).
async fn stream_with_limits(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> Result<async_nats::jetstream::stream::Stream, async_nats::Error> {
    let mut stream = js.get_or_create_stream(config.clone()).await?;
    let have = stream.info().await?.config.clone();
    // JetStream answers -1 for "no limit", which a config asks with 0.
    let none = |n: i64| if n <= 0 { -1 } else { n };
    if (
        have.max_age,
        none(have.max_messages),
        none(have.max_bytes),
        have.discard,
    ) != (
        config.max_age,
        none(config.max_messages),
        none(config.max_bytes),
        config.discard,
    ) {
        tracing::info!(
            stream = %config.name,
            max_age_secs = config.max_age.as_secs(),
            max_messages = config.max_messages,
            max_bytes = config.max_bytes,
            "cluster: the stream's limits changed to this node's settings"
        );
        let wanted = async_nats::jetstream::stream::Config {
            max_age: config.max_age,
            max_messages: config.max_messages,
            max_bytes: config.max_bytes,
            discard: config.discard,
            ..have
        };
        js.update_stream(wanted).await?;
        stream = js.get_stream(&config.name).await?;
    }
    Ok(stream)
}

/// A cap as a stream limit (JetStream has no "none at all": 0 is 1).
fn stream_limit(n: u64) -> i64 {
    i64::try_from(n.max(1)).unwrap_or(i64::MAX)
}

/// A node whose heartbeat is older than this is dead.
const NODE_TTL: Duration = Duration::from_secs(6);
/// How often a node heartbeats, and looks for dead ones.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Ownership of client ids across the cluster: the JetStream KV bucket
/// `millet_owners` (key: a hash of the client id; value: the owning node's
/// origin), changed only by compare-and-set on its revision. A node taking
/// a client id over asks the owner named there to close its connection
/// (0x8E) and waits for it first (`_MILLET.kick.<origin>`).
struct Owners {
    kv: async_nats::jetstream::kv::Store,
    client: async_nats::Client,
    /// Attaches under way on this node, by client id: the newest owner
    /// revision named by a kick for that client id meanwhile (0: none). A
    /// kick naming the revision this node wrote, or a later one, means
    /// another node took over after it: the new connection goes too.
    attaching: Mutex<HashMap<ByteString, u64>>,
    /// The owner entries this node wrote, by client id: revision and the
    /// connection's epoch (deleted when that connection ends).
    owned: Mutex<HashMap<ByteString, (u64, u64)>>,
}

/// An interest of this node: a plain filter, or a shared subscription.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Interest {
    filter: String,
    group: Option<String>,
}

enum Control {
    Add(Interest),
    Remove(Interest),
    /// Publish a shared subscription's message to its group's own subject
    /// ([`NatsLink::redeliver`]): after the interest changes before it
    /// reached the server, so not back to this node if its last member
    /// left.
    Redeliver(String, HeaderMap, Bytes),
    /// Run the closure once NATS has every change made before it.
    Barrier(Box<dyn FnOnce() + Send>),
}

impl NatsLink {
    /// Connect to NATS (checking the server's version) and start the
    /// tasks that publish and subscribe for `broker`, on the current
    /// runtime. The broker joins the cluster ([`Broker::join_cluster`]).
    pub async fn start(broker: &Arc<Broker>) -> anyhow::Result<Arc<NatsLink>> {
        let cfg = &broker.node.config.engine.nats;
        let limits = &broker.node.config.limits;
        let node_id = match &cfg.node_id {
            Some(id) => id.clone(),
            None => default_node_id(broker),
        };
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let lost = Arc::new(tokio::sync::Notify::new());
        let (back_tx, mut back_rx) = mpsc::unbounded_channel();
        let client = connect(cfg, &node_id, up.clone(), lost.clone(), back_tx).await?;
        let info = client.server_info();
        check_version(&info.version)?;
        let origin: u64 = rand::random();
        let origin_header = HeaderValue::from(format!("{origin:016x}").as_str());
        let js = async_nats::jetstream::new(client.clone());
        // A NATS cluster just started may not have elected its JetStream
        // leaders yet (its health check passes before): every step of the
        // set-up is retried until this deadline.
        let deadline =
            Instant::now() + Duration::from_secs(cfg.connect_timeout_secs.max(1)).max(SETUP_TIME);
        let storage = async_nats::jetstream::stream::StorageType::File;
        let kv_config = |bucket: &str, max_age: Duration| async_nats::jetstream::kv::Config {
            bucket: bucket.into(),
            history: 1,
            max_age,
            num_replicas: cfg.replicas,
            storage,
            ..Default::default()
        };
        let owners_config = kv_config("millet_owners", Duration::ZERO);
        let kv = retrying(deadline, || kv_with_entry_ttl(&js, owners_config.clone()))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the JetStream KV bucket millet_owners ({} replicas): {e} \
                     (JetStream enabled on the NATS servers? engine.nats.replicas = 1 for a single server)",
                    cfg.replicas
                )
            })?;
        let wills_config = async_nats::jetstream::stream::Config {
            name: "MILLET_WILLS".into(),
            subjects: vec!["w.>".into()],
            max_messages_per_subject: 1,
            num_replicas: cfg.replicas,
            storage,
            ..Default::default()
        };
        let wills_stream = retrying(deadline, || js.get_or_create_stream(wills_config.clone()))
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the JetStream stream MILLET_WILLS: {e}"))?;
        let retained_config = async_nats::jetstream::stream::Config {
            name: "MILLET_RETAINED".into(),
            subjects: vec!["r.>".into()],
            max_messages_per_subject: 1,
            // The cluster-wide retained caps: a new topic beyond them is
            // refused by JetStream (a replacement or a clear is not), and
            // the message is routed without being kept (`retained_writer`).
            max_messages: stream_limit(limits.max_retained_messages as u64),
            max_bytes: stream_limit(limits.max_retained_bytes),
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            num_replicas: cfg.replicas,
            storage,
            allow_direct: true,
            allow_message_ttl: true,
            ..Default::default()
        };
        let retained_stream = retrying(deadline, || {
            stream_with_limits(&js, retained_config.clone())
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the JetStream stream MILLET_RETAINED: {e}"))?;
        let messages_config = async_nats::jetstream::stream::Config {
            name: "MILLET_MSGS".into(),
            subjects: vec!["m.1.>".into(), "m.2.>".into()],
            max_age: Duration::from_secs(cfg.message_retention_secs.max(1)),
            num_replicas: cfg.replicas,
            storage,
            ..Default::default()
        };
        let messages_stream = retrying(deadline, || {
            stream_with_limits(&js, messages_config.clone())
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the JetStream stream MILLET_MSGS: {e}"))?;
        // KV buckets whose entries may carry their own TTL.
        let ttl_kv = |bucket: &'static str| {
            let config = kv_config(bucket, Duration::ZERO);
            let js = js.clone();
            async move {
                retrying(deadline, || kv_with_entry_ttl(&js, config.clone()))
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot create the JetStream KV bucket {bucket}: {e}")
                    })
            }
        };
        let sessions_kv = ttl_kv("millet_sessions").await?;
        let marks_kv = ttl_kv("millet_marks").await?;
        let qos2_out_config = async_nats::jetstream::stream::Config {
            name: "MILLET_QOS2OUT".into(),
            subjects: vec!["q.>".into()],
            // What a catch-up can reach: MILLET_MSGS's retention.
            max_age: Duration::from_secs(cfg.message_retention_secs.max(1)),
            num_replicas: cfg.replicas,
            storage,
            ..Default::default()
        };
        let qos2_out_stream = retrying(deadline, || {
            stream_with_limits(&js, qos2_out_config.clone())
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the JetStream stream MILLET_QOS2OUT: {e}"))?;
        let qos2_kv = ttl_kv("millet_qos2").await?;
        let (sessions_tx, sessions_rx) = mpsc::unbounded_channel();
        let nodes_config = kv_config("millet_nodes", NODE_TTL);
        let nodes = retrying(deadline, || js.create_key_value(nodes_config.clone()))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot create the JetStream KV bucket millet_nodes: {e}")
            })?;
        let members_config = kv_config("millet_members", Duration::ZERO);
        let members = retrying(deadline, || js.create_key_value(members_config.clone()))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot create the JetStream KV bucket millet_members: {e}")
            })?;
        let me = format!("{origin:016x}");
        // A stream just created (by this node or another starting at the
        // same time) answers once its replicas elected a leader.
        retrying(deadline, || async {
            nodes.put(&me, Bytes::from(node_id.clone())).await?;
            members.put(&me, Bytes::from(node_id.clone())).await?;
            Ok::<_, async_nats::Error>(())
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot join the cluster's JetStream state (millet_nodes, millet_members): {e}"
            )
        })?;
        let (out, out_rx) = mpsc::channel(FORWARD_QUEUE);
        let (retain_tx, retain_rx) = mpsc::channel(FORWARD_QUEUE);
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let link = Arc::new_cyclic(|myself| NatsLink {
            myself: myself.clone(),
            node_id: node_id.clone(),
            origin,
            origin_header,
            out,
            ctl,
            forward_dropped: AtomicU64::new(0),
            last_store_error_line: Mutex::new(None),
            last_drop_line: Mutex::new(None),
            up,
            refused: AtomicU64::new(0),
            last_refusal_line: Mutex::new(None),
            owners: Owners {
                kv,
                client: client.clone(),
                attaching: Mutex::default(),
                owned: Mutex::default(),
            },
            rt: tokio::runtime::Handle::current(),
            wills: Wills {
                stream: wills_stream,
                js: js.clone(),
                nodes,
                members,
                stored: Mutex::default(),
            },
            retained: Retained {
                stream: retained_stream,
                tx: retain_tx,
                last_error_line: Mutex::new(None),
                last_full_line: Mutex::new(None),
            },
            tickets: Tickets::default(),
            sessions: Sessions {
                kv: sessions_kv,
                marks: marks_kv,
                qos2: qos2_kv,
                qos2_out: qos2_out_stream,
                messages: messages_stream,
                tx: sessions_tx,
                recorded: Mutex::default(),
                detached: Mutex::default(),
            },
            broker: Arc::downgrade(broker),
        });
        tokio::spawn(session_writer(
            js.clone(),
            sessions_rx,
            Arc::downgrade(&link),
        ));
        tokio::spawn(checkpoint(Arc::downgrade(&link), Arc::downgrade(broker)));
        tokio::spawn(retained_writer(
            js.clone(),
            retain_rx,
            Arc::downgrade(&link),
        ));
        tokio::spawn(heartbeat(Arc::downgrade(&link), Arc::downgrade(broker)));
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            loop {
                lost.notified().await;
                match weak.upgrade() {
                    Some(link) => link.fail_unanswered(),
                    None => return,
                }
            }
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            // Back after a break: what the node's subscribers missed.
            while let Some(since) = back_rx.recv().await {
                match weak.upgrade() {
                    Some(link) => link.catch_up_node(since).await,
                    None => return,
                }
            }
        });
        let kicks = client
            .subscribe(format!("_MILLET.kick.{origin:016x}"))
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe on NATS: {e}"))?;
        tokio::spawn(kick_service(
            client.clone(),
            kicks,
            Arc::downgrade(&link),
            Arc::downgrade(broker),
        ));
        tokio::spawn(publisher(
            client.clone(),
            js.clone(),
            out_rx,
            Arc::downgrade(&link),
        ));
        tokio::spawn(control(
            client,
            ctl_rx,
            Arc::downgrade(&link),
            Arc::downgrade(broker),
        ));
        broker.join_cluster(link.clone())?;
        tracing::info!(
            node_id = %node_id,
            server = %info.server_name,
            version = %info.version,
            "cluster mode: joined through NATS"
        );
        Ok(link)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Leave the cluster on a clean shutdown, once this node's connections
    /// are closed (their wills published or dropped here): its stored
    /// wills are purged and its member and heartbeat entries deleted, so
    /// that no other node takes it for dead and publishes them again.
    /// Bounded: a node that cannot reach NATS is reaped as a dead one.
    pub async fn leave(&self) {
        let me = format!("{:016x}", self.origin);
        let w = &self.wills;
        let left = tokio::time::timeout(Duration::from_secs(3), async {
            w.members.delete(&me).await?;
            w.stream.purge().filter(format!("w.{me}.>")).await?;
            w.nodes.delete(&me).await?;
            Ok::<_, async_nats::Error>(())
        })
        .await;
        // Its persistent sessions, all disconnected now, are left to the
        // node their clients reconnect to: their entries in KV expire with
        // them should the clients never come back (what a dead node's
        // survivors do for it).
        let (tx, flushed) = tokio::sync::oneshot::channel();
        let _ = self.sessions.tx.send(SessionOp::Flush(tx));
        let expired = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = flushed.await;
            self.expire_sessions_of(self.origin).await
        })
        .await;
        if let Ok((expiring, deleted)) = expired {
            tracing::debug!(
                expiring,
                deleted,
                "cluster: this node's client ids: entries deleted, or expiring with their sessions"
            );
        } else {
            tracing::warn!("cluster: could not give this node's sessions in KV their expiry within 10 s: the rest stay until their clients connect again");
        }
        match left {
            Ok(Ok(())) => tracing::info!(node_id = %self.node_id, "cluster: left"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster: could not leave cleanly: the other nodes will take this one for dead")
            }
            Err(_) => tracing::warn!(
                "cluster: could not leave within 3 s: the other nodes will take this one for dead"
            ),
        }
    }

    /// Whether NATS is reachable (the client is connected).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// [`Self::is_up`], and the client's own connection state too: that
    /// changes in the client's connection task the moment the connection
    /// breaks, while the flag follows its events (delivered by another
    /// task, and dropped when their queue is full). For the connect path,
    /// where a stale answer means a CONNECT waiting on requests that cannot
    /// be answered.
    fn reachable(&self) -> bool {
        self.is_up()
            && self.owners.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A QoS 1/2 publish was refused while NATS is unreachable: counted,
    /// and logged at most once a minute.
    fn log_refusal(&self) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if once_a_minute(&self.last_refusal_line) {
            tracing::warn!(
                refused_total = n,
                "cluster: NATS unreachable: QoS 1/2 publishes refused (at most one line a minute)"
            );
        }
    }

    /// Messages not forwarded because the queue to NATS was full.
    pub fn forward_dropped(&self) -> u64 {
        self.forward_dropped.load(Ordering::Relaxed)
    }

    /// Run `done` once NATS has every interest change made so far.
    pub fn barrier(&self, done: Box<dyn FnOnce() + Send>) {
        if let Err(mpsc::error::SendError(Control::Barrier(done))) =
            self.ctl.send(Control::Barrier(done))
        {
            done(); // the control task is gone (shutting down): nothing to wait for
        }
    }

    /// This node's owner entry.
    fn owner_value(&self) -> Bytes {
        Bytes::from(format!("{:016x} {}", self.origin, self.node_id))
    }

    /// Make this node the owner of `client_id` cluster-wide, closing the
    /// connection another node has for it first; then attach locally.
    /// Returns the local attach's answer.
    async fn take_over_and_attach(
        &self,
        broker: &Arc<Broker>,
        req: AttachRequest,
        reply_to: &Arc<ConnWaker>,
    ) -> Completion {
        let client_id = req.client_id.clone();
        let will = req.will.clone();
        let key = owner_key(&client_id);
        self.owners.attaching.lock().insert(client_id.clone(), 0);
        let mut revision = None;
        let mut moved = None;
        let (mut had_owner, mut owner_gone) = (false, false);
        let clean_start = req.clean_start;
        // A session moving here misses what is published while it moves
        // (from when the old node stops routing to it until this node's
        // subscriptions reach every NATS server): read back from the
        // stream from where the old node says ([`NatsLink::complete_before`]),
        // or from a little before the move.
        let move_from =
            unix_ms(Instant::now(), Instant::now()).saturating_sub(MOVE_MARGIN.as_millis() as u64);
        for attempt in 0..10 {
            if !self.reachable() {
                // NATS went away since the connection was admitted: who
                // owns the client id cannot be known (CONNACK 0x88).
                self.owners.attaching.lock().remove(&client_id);
                tracing::debug!(client_id = %client_id, attempt, "cluster: NATS unreachable while taking a client id over: refused");
                return Completion::Refused(SessionRefusal::ClusterUnavailable);
            }
            let entry = match self.owners.kv.entry(key.clone()).await {
                Ok(e) => e,
                Err(e) => {
                    // A stream between leaders answers again shortly.
                    tracing::debug!(client_id = %client_id, attempt, error = %e, "cluster: cannot read the owner of a client id: again");
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
                    continue;
                }
            };
            let (rev, owner) = match &entry {
                Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                    (Some(e.revision), owner_origin(&e.value))
                }
                Some(e) => (Some(e.revision), None),
                None => (None, None),
            };
            if let (Some(o), Some(r)) = (owner.filter(|o| *o != self.origin), rev) {
                had_owner = true;
                match self.kick_remote(o, r, &client_id, !req.clean_start).await {
                    Kicked::Moved(m) => moved = Some(m),
                    Kicked::NoSession => {}
                    Kicked::Gone => owner_gone = true,
                }
            }
            let value = self.owner_value();
            let cas = match rev {
                Some(r) => self
                    .owners
                    .kv
                    .update(&key, value, r)
                    .await
                    .map_err(|e| e.to_string()),
                None => self
                    .owners
                    .kv
                    .create(&key, value)
                    .await
                    .map_err(|e| e.to_string()),
            };
            match cas {
                Ok(r) => {
                    revision = Some(r);
                    break;
                }
                Err(e) => {
                    tracing::debug!(client_id = %client_id, attempt, error = %e, "cluster: owner entry changed meanwhile: again");
                }
            }
        }
        if revision.is_none() && !self.reachable() {
            self.owners.attaching.lock().remove(&client_id);
            tracing::debug!(client_id = %client_id, "cluster: NATS unreachable while taking a client id over: refused");
            return Completion::Refused(SessionRefusal::ClusterUnavailable);
        }
        if revision.is_none() {
            tracing::warn!(client_id = %client_id, "cluster: could not become the owner of a client id (NATS unreachable, or a takeover storm): the connection is closed after its CONNACK");
        }
        // From when (unix ms) the session reads back what it missed.
        let mut catch_up = moved
            .as_ref()
            .map(|m| m.complete_before_ms.unwrap_or(move_from));
        // A dead node's record of the session's outgoing QoS 2 messages.
        let mut qos2 = Qos2Resume::default();
        let mut recovered = false;
        if moved.is_none() && owner_gone && !clean_start {
            // The node that held the session is gone: rebuilt from KV.
            if let Some((m, mark, q)) = self.recover(&client_id).await {
                tracing::info!(client_id = %client_id, mark, qos2_inflight = q.inflight.len(), qos2_completed = q.completed.len(), "cluster: the session of a node that is gone resumes here (catching up from MILLET_MSGS)");
                moved = Some(m);
                qos2 = q;
                recovered = true;
                catch_up = Some(mark.saturating_sub(MARK_MARGIN.as_millis() as u64));
            }
        }
        if let (Some(m), Some(from), false) = (&moved, catch_up, recovered) {
            // Moved from a live node, with its window exactly. What it
            // completed in QoS 2 just before the move is read back too:
            // its events say which (what they show in flight but the
            // window lacks was completed there: a PUBCOMP is not
            // recorded), so that it is not delivered again.
            let qos2_subscribed = m.subscriptions.iter().any(|(_, s)| {
                s.options.qos == millet_codec::QoS::ExactlyOnce && s.share_group.is_none()
            });
            if qos2_subscribed {
                let since = from.saturating_sub(MOVE_TRANSIT.as_millis() as u64);
                let r = self.outgoing_qos2(&client_id, since).await;
                let window: Vec<(u16, u64)> = m
                    .inflight
                    .iter()
                    .map(|(pid, i)| (*pid, qos2_digest(&i.delivery.msg)))
                    .collect();
                let mut completed = r.completed;
                completed.extend(
                    r.inflight
                        .into_iter()
                        .filter(|(pid, _, d)| !window.contains(&(*pid, *d)))
                        .map(|(_, _, d)| d),
                );
                qos2 = Qos2Resume {
                    inflight: Vec::new(),
                    completed,
                };
            }
        }
        if let Some(m) = moved {
            // The session the other node gave up: resumed by this attach.
            tracing::debug!(client_id = %client_id, queued = m.queue.len(), inflight = m.inflight.len(), "cluster: session moved here");
            let cell = broker.take_moved_session(&client_id, m, Instant::now());
            // Attached (and CONNACKed) once NATS has the subscriptions, as
            // a SUBACK is.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            self.barrier(Box::new(move || {
                let _ = tx.send(());
            }));
            let _ = tokio::time::timeout(MOVE_TIMEOUT, rx).await;
            if let (Some(cell), Some(from)) = (cell, catch_up) {
                // What the session missed, from the stream: everything its
                // filters match since then, but what it holds already
                // (moved with it, or routed to it here since it was
                // installed). Some of it again: what the other node had
                // delivered since.
                let filters: Vec<String> = cell
                    .state
                    .lock()
                    .session
                    .subscriptions
                    .iter()
                    .filter(|(_, sub)| sub.share_group.is_none())
                    .map(|(f, _)| f.to_string())
                    .collect();
                let limit = broker.node.config.limits.max_queued;
                let found = self.stored_since(&filters, from, limit).await;
                let read = found.len();
                let queued = broker.catch_up(&cell, found.into_iter().map(|(_, m)| m), qos2);
                tracing::debug!(client_id = %client_id, read, queued, "cluster: caught up from MILLET_MSGS");
            }
        }
        let c = match Engine::attach(&**broker, req, reply_to, Instant::now()) {
            Call::Ready(c) => c,
            // The broker answers at once; a wait here is bounded anyway.
            Call::Later(p) => p
                .wait(Duration::from_secs(60))
                .unwrap_or(Completion::Detached),
        };
        let kicked = self
            .owners
            .attaching
            .lock()
            .remove(&client_id)
            .is_some_and(|named| revision.is_some_and(|r| named >= r));
        tracing::debug!(client_id = %client_id, ?revision, kicked, "cluster: owner entry written");
        if let (Completion::Attached(a), Some(w)) = (&c, &will) {
            self.store_will(&client_id, w, a.epoch).await;
        }
        if let Completion::Attached(a) = &c {
            let persistent = a.cell.state.lock().session.expiry_interval > 0;
            if persistent {
                self.save_session(&a.cell, true);
            } else if had_owner {
                // A session record another node may have left.
                let _ = self.sessions.tx.send(SessionOp::Delete {
                    key: owner_key(&client_id),
                });
            }
            if let Some(r) = revision {
                self.owners
                    .owned
                    .lock()
                    .insert(client_id.clone(), (r, a.epoch));
            }
            if kicked || revision.is_none() {
                // Another node took the client id over while this one
                // attached: this connection goes (after its CONNACK).
                if let Some((epoch, _)) = broker.taken_over_elsewhere(&client_id, Instant::now()) {
                    self.released(&client_id, epoch);
                }
            }
        }
        c
    }

    /// Write the session record of `cell` to KV if its session is
    /// persistent ([`Sessions`]), and with `mark` its mark if nothing is
    /// pending; a session that is not persistent (any more) has its record
    /// deleted if this node wrote one.
    fn save_session(&self, cell: &Arc<SessionCell>, mark: bool) {
        let key = owner_key(&cell.client_id);
        let (record, idle) = {
            let st = cell.state.lock();
            if st.session.expiry_interval == 0 {
                drop(st);
                if self.sessions.recorded.lock().remove(&cell.client_id) {
                    let _ = self.sessions.tx.send(SessionOp::Delete { key });
                }
                return;
            }
            let record = SessionKv {
                client_id: cell.client_id.to_string(),
                expiry_interval: st.session.expiry_interval,
                subscriptions: st
                    .session
                    .subscriptions
                    .iter()
                    .map(|(f, sub)| SubscriptionRecord::new(f, &sub.options, sub.identifier))
                    .collect(),
                offline_since_ms: None,
            };
            let idle = st.session.queue_len() == 0 && st.session.inflight_len() == 0;
            let record = SessionKv {
                offline_since_ms: (st.conn_epoch == 0)
                    .then(|| unix_ms(Instant::now(), Instant::now())),
                ..record
            };
            if !st.session.awaiting_rel.is_empty() {
                // Written again by this node (the session may come from a
                // dead node's entries, which have a TTL).
                self.save_qos2_of(&cell.client_id, &st.session, false);
            }
            (record, idle)
        };
        let Ok(record) = postcard::to_allocvec(&record) else {
            return;
        };
        self.sessions.recorded.lock().insert(cell.client_id.clone());
        let _ = self.sessions.tx.send(SessionOp::Put {
            key: key.clone(),
            record: Bytes::from(record),
        });
        if mark && idle {
            let at_ms = unix_ms(Instant::now(), Instant::now());
            let _ = self.sessions.tx.send(SessionOp::Mark { key, at_ms });
        }
    }

    /// Write the incoming QoS 2 ids of `cell`'s session awaiting their
    /// PUBREL to `millet_qos2`, if the session is persistent (a clean one
    /// ends with its connection, and its ids with it), and return the
    /// write's ticket: a PUBREC waits for it (a publisher resending the
    /// message to another node after this one died has it acknowledged,
    /// not delivered again [MQTT-4.3.3-10]), and so does a PUBCOMP (the
    /// publisher may reuse the id once it has it). The ids are read under
    /// the session's lock and sent in that order, so the entry's last value
    /// is the session's last set.
    fn save_qos2(&self, cell: &SessionCell, with_ticket: bool) -> Ticket {
        let st = cell.state.lock();
        self.save_qos2_of(&cell.client_id, &st.session, with_ticket)
    }

    /// [`NatsLink::save_qos2`] for `session`, whose lock the caller holds.
    fn save_qos2_of(&self, client_id: &ByteString, session: &Session, with_ticket: bool) -> Ticket {
        if session.expiry_interval == 0 {
            return Ticket::NONE;
        }
        let ticket = self.write_ticket(with_ticket);
        let op = SessionOp::Qos2 {
            key: owner_key(client_id),
            ids: session.awaiting_rel.sorted(),
            ticket,
        };
        if self.sessions.tx.send(op).is_err() && ticket != 0 {
            self.ticket_answered(ticket, false);
        }
        Ticket(ticket)
    }

    /// A ticket for a QoS 2 record's write (0: none), if asked for and
    /// NATS is reachable. While it is not, nothing waits for such a write:
    /// it would fail, and a held delivery or PUBCOMP would then close a
    /// 3.x connection, again after every reconnection; and nothing could
    /// be recovered from KV meanwhile anyway. (A QoS 2 PUBLISH is refused
    /// then in any case: `Clustered::publish`.)
    fn write_ticket(&self, with_ticket: bool) -> u64 {
        if with_ticket && self.is_up() {
            self.new_ticket()
        } else {
            0
        }
    }

    /// Record outgoing QoS 2 `events` of `client_id`'s persistent session
    /// in `MILLET_QOS2OUT`; with `with_ticket`, the ticket of the write
    /// (what depends on it waits: a PUBLISH, a PUBREL).
    fn save_qos2_out(
        &self,
        client_id: &ByteString,
        events: Vec<Qos2Event>,
        with_ticket: bool,
    ) -> Ticket {
        let ticket = self.write_ticket(with_ticket);
        let op = SessionOp::Qos2Out {
            key: owner_key(client_id),
            events,
            ticket,
        };
        if self.sessions.tx.send(op).is_err() && ticket != 0 {
            self.ticket_answered(ticket, false);
        }
        Ticket(ticket)
    }

    /// The outgoing QoS 2 state of `client_id`'s session as its node
    /// recorded it from `from_ms` on (unix ms; its mark, less the margin:
    /// nothing was in flight at the mark): the events of `q.<key>` since
    /// then, replayed ([`replay_qos2`]).
    async fn outgoing_qos2(&self, client_id: &ByteString, from_ms: u64) -> Qos2Resume {
        use async_nats::jetstream::consumer::{pull, DeliverPolicy};
        use futures_util::StreamExt;
        let Ok(start_time) = async_nats::datetime::from_nanos(i128::from(from_ms) * 1_000_000)
        else {
            return Qos2Resume::default();
        };
        let consumer = self
            .sessions
            .qos2_out
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("q.{}", owner_key(client_id)),
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ..Default::default()
            })
            .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "cluster: cannot read a dead node's QoS 2 deliveries: they may be delivered again");
                return Qos2Resume::default();
            }
        };
        let mut events = Vec::new();
        let pending = consumer.info().await.map(|i| i.num_pending).unwrap_or(0);
        if pending > 0 {
            let Ok(mut messages) = consumer.messages().await else {
                return Qos2Resume::default();
            };
            let until = tokio::time::Instant::now() + REPLAY_TIMEOUT;
            loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                let Ok(Some(Ok(m))) = tokio::time::timeout(left, messages.next()).await else {
                    tracing::warn!(client_id = %client_id, "cluster: a dead node's QoS 2 deliveries not read in time: some may be delivered again");
                    break;
                };
                if let Ok(batch) = postcard::from_bytes::<Vec<Qos2Event>>(&m.message.payload) {
                    events.extend(batch);
                }
                if m.info().map(|i| i.pending).unwrap_or(0) == 0 {
                    break;
                }
            }
        }
        replay_qos2(events)
    }

    /// The session of `client_id` as its record in KV has it, and its mark
    /// (unix ms; 0 without one): for a takeover from a node that is gone.
    async fn recover(&self, client_id: &ByteString) -> Option<(MovedSession, u64, Qos2Resume)> {
        use async_nats::jetstream::kv::Operation;
        let key = owner_key(client_id);
        let entry = match self.sessions.kv.entry(key.clone()).await {
            Ok(Some(e)) if e.operation == Operation::Put => e,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "cluster: cannot read the session of a client id whose node is gone: it starts anew");
                return None;
            }
        };
        let record = postcard::from_bytes::<SessionKv>(&entry.value).ok()?;
        if record.client_id != **client_id {
            return None;
        }
        let now_ms = unix_ms(Instant::now(), Instant::now());
        if let (Some(off), false) = (record.offline_since_ms, record.expiry_interval == u32::MAX) {
            if off.saturating_add(u64::from(record.expiry_interval) * 1000) <= now_ms {
                tracing::debug!(client_id = %client_id, "cluster: the session of a node that is gone has expired");
                let _ = self.sessions.tx.send(SessionOp::Delete { key });
                return None;
            }
        }
        let mark = match self.sessions.marks.entry(key).await {
            Ok(Some(e)) if e.operation == Operation::Put => std::str::from_utf8(&e.value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok()),
            _ => None,
        };
        let mark = mark.unwrap_or(0);
        let awaiting_rel = match self.sessions.qos2.entry(owner_key(client_id)).await {
            Ok(Some(e)) if e.operation == Operation::Put => decode_qos2(&e.value),
            _ => Vec::new(),
        };
        let from = mark.saturating_sub(MARK_MARGIN.as_millis() as u64);
        let resume = self.outgoing_qos2(client_id, from).await;
        let moved = MovedSession {
            subscriptions: subscriptions_from_records(record.subscriptions),
            awaiting_rel,
            ..Default::default()
        };
        Some((moved, mark, resume))
    }

    /// Give the entries that node `origin` left behind (it died, or left)
    /// the lifetime of their sessions, so that a client that never comes
    /// back leaves nothing in KV. For every owner entry naming `origin`:
    /// - no persistent session (no record): the entry is deleted now;
    /// - a session whose expiry has passed, counted from its disconnection
    ///   (for one connected when the node died: from now)
    ///   [MQTT-3.1.2-23]: its owner entry, record and mark are deleted now;
    /// - otherwise the three are written again with what is left of the
    ///   expiry as their TTL (`Nats-TTL`), the record with its
    ///   disconnection time, so JetStream removes them when the session
    ///   expires; a session that never expires (0xFFFFFFFF) keeps them.
    ///
    /// Every change is a compare-and-set on the revision read, the owner
    /// entry first: a client that took its id over meanwhile keeps what its
    /// new node wrote. Returns (entries given a TTL, entries deleted).
    async fn expire_sessions_of(&self, origin: u64) -> (usize, usize) {
        use async_nats::jetstream::kv::Operation;
        use futures_util::StreamExt;
        let mut owned = Vec::new();
        // (`Store::status` is the bucket as it was when opened.)
        let entries = match self.wills.js.get_stream("KV_millet_owners").await {
            Ok(mut st) => st.info().await.map(|i| i.state.messages).ok(),
            Err(_) => None,
        };
        if entries == Some(0) {
            return (0, 0); // (a watch of an empty bucket would only time out)
        }
        match self.owners.kv.watch_with_history(">").await {
            Ok(mut watch) => loop {
                // Nothing within the time: an empty bucket, or NATS gone.
                let next = tokio::time::timeout(Duration::from_secs(2), watch.next()).await;
                let Ok(Some(Ok(e))) = next else {
                    break;
                };
                if e.operation == Operation::Put && owner_origin(&e.value) == Some(origin) {
                    owned.push((e.key, e.revision, e.value));
                }
                if e.delta == 0 {
                    break;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot read the owner entries of a node that is gone: they stay until their client ids connect again");
                return (0, 0);
            }
        }
        let (mut expiring, mut deleted) = (0, 0);
        let now_ms = unix_ms(Instant::now(), Instant::now());
        for (key, rev, value) in owned {
            let record = match self.sessions.kv.entry(key.clone()).await {
                Ok(Some(e)) if e.operation == Operation::Put => {
                    postcard::from_bytes::<SessionKv>(&e.value)
                        .ok()
                        .map(|r| (r, e.revision))
                }
                Ok(_) => None,
                Err(_) => continue, // unknown: left for the client id's next connection
            };
            let mark = match self.sessions.marks.entry(key.clone()).await {
                Ok(Some(e)) if e.operation == Operation::Put => Some((e.value, e.revision)),
                Ok(_) => None,
                Err(_) => continue,
            };
            let qos2 = match self.sessions.qos2.entry(key.clone()).await {
                Ok(Some(e)) if e.operation == Operation::Put => Some((e.value, e.revision)),
                Ok(_) => None,
                Err(_) => continue,
            };
            let left_ms = match &record {
                None => 0,
                Some((r, _)) if r.expiry_interval == u32::MAX => continue,
                Some((r, _)) => r
                    .offline_since_ms
                    .unwrap_or(now_ms)
                    .saturating_add(u64::from(r.expiry_interval) * 1000)
                    .saturating_sub(now_ms),
            };
            if left_ms == 0 {
                if self
                    .owners
                    .kv
                    .delete_expect_revision(&key, Some(rev))
                    .await
                    .is_err()
                {
                    continue; // taken over meanwhile
                }
                if let Some((_, r)) = record {
                    let _ = self.sessions.kv.delete_expect_revision(&key, Some(r)).await;
                }
                if let Some((_, r)) = mark {
                    let _ = self
                        .sessions
                        .marks
                        .delete_expect_revision(&key, Some(r))
                        .await;
                }
                if let Some((_, r)) = qos2 {
                    let _ = self
                        .sessions
                        .qos2
                        .delete_expect_revision(&key, Some(r))
                        .await;
                }
                deleted += 1;
                continue;
            }
            let ttl = left_ms.div_ceil(1000);
            if self
                .put_with_ttl("millet_owners", &key, value, ttl, rev)
                .await
                .is_err()
            {
                continue; // taken over meanwhile
            }
            if let Some((mut r, rrev)) = record {
                r.offline_since_ms.get_or_insert(now_ms);
                if let Ok(v) = postcard::to_allocvec(&r) {
                    let _ = self
                        .put_with_ttl("millet_sessions", &key, Bytes::from(v), ttl, rrev)
                        .await;
                }
            }
            if let Some((v, r)) = mark {
                let _ = self.put_with_ttl("millet_marks", &key, v, ttl, r).await;
            }
            if let Some((v, r)) = qos2 {
                let _ = self.put_with_ttl("millet_qos2", &key, v, ttl, r).await;
            }
            expiring += 1;
        }
        (expiring, deleted)
    }

    /// For a session this node gives up now: unix ms before which every
    /// QoS 1/2 message stored in `MILLET_MSGS` was routed to it here, and
    /// after which none was delivered to its client, so that the node it
    /// moves to reads back from there what it missed while it moved, and
    /// nothing it had. Messages on their way here when the session leaves
    /// the index are not routed to it here: from [`MOVE_TRANSIT`] before
    /// now. A client gone from here since (`connected` false) was sent
    /// nothing after it went: from then, if it went only just now (what
    /// was delivered to it is not delivered again). Assumes the nodes'
    /// and NATS servers' clocks agree to within [`MOVE_TRANSIT`].
    fn complete_before(&self, client_id: &ByteString, connected: bool) -> u64 {
        let now = Instant::now();
        let wall = unix_ms(now, now);
        let from = wall.saturating_sub(MOVE_TRANSIT.as_millis() as u64);
        if connected {
            return from;
        }
        match self.sessions.detached.lock().get(client_id) {
            Some(&at) => from.max(wall.saturating_sub(now.duration_since(at).as_millis() as u64)),
            None => from,
        }
    }

    /// A connection of a session kept here ended now (for
    /// [`NatsLink::complete_before`]; only the last second is kept).
    fn detached_now(&self, client_id: &ByteString) {
        let now = Instant::now();
        let mut d = self.sessions.detached.lock();
        if d.len() >= 1024 {
            d.retain(|_, at| now.duration_since(*at) < Duration::from_secs(1));
        }
        d.insert(client_id.clone(), now);
    }

    /// Write `value` for `key` in KV bucket `bucket` if the entry is still
    /// at `revision`, to expire after `ttl_s` seconds.
    async fn put_with_ttl(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        ttl_s: u64,
        revision: u64,
    ) -> Result<(), async_nats::Error> {
        let mut h = HeaderMap::new();
        h.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            HeaderValue::from(ttl_s.max(1)),
        );
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            HeaderValue::from(revision),
        );
        self.wills
            .js
            .publish_with_headers(format!("$KV.{bucket}.{key}"), h, value)
            .await?
            .await?;
        Ok(())
    }

    /// The QoS 1/2 messages of `MILLET_MSGS` that `filters` (plain ones)
    /// match, stored since `from_ms` (unix ms), in stream order, at most
    /// `limit`: one ordered consumer for all their subjects (or one per
    /// subject if NATS refuses them together), only while it reads;
    /// overlapping filters are kept once.
    async fn stored_since(
        &self,
        filters: &[String],
        from_ms: u64,
        limit: usize,
    ) -> Vec<(u64, Arc<Message>)> {
        use futures_util::StreamExt;
        let Ok(start_time) = async_nats::datetime::from_nanos(i128::from(from_ms) * 1_000_000)
        else {
            return Vec::new();
        };
        let mut found: std::collections::BTreeMap<u64, Bytes> = Default::default();
        let deadline = tokio::time::Instant::now() + REPLAY_TIMEOUT;
        let follow_until = tokio::time::Instant::now() + CATCH_UP_FOLLOW;
        // Every subject the filters read, less those another one covers:
        // one consumer for them all (NATS 2.10's several filter subjects),
        // or, should NATS refuse them together (two that overlap without
        // one covering the other), one each.
        let mut subjects: Vec<String> = Vec::new();
        for filter in filters {
            for prefix in ["m.1", "m.2"] {
                subjects.extend(subject::filter_to_subjects(prefix, filter));
            }
        }
        subjects.sort();
        subjects.dedup();
        let covered: Vec<bool> = subjects
            .iter()
            .enumerate()
            .map(|(i, x)| {
                subjects
                    .iter()
                    .enumerate()
                    .any(|(j, y)| i != j && subject::covers(y, x))
            })
            .collect();
        let subjects: Vec<String> = subjects
            .into_iter()
            .zip(covered)
            .filter_map(|(x, c)| (!c).then_some(x))
            .collect();
        let mut groups = vec![subjects];
        'groups: while let Some(group) = groups.pop() {
            if group.is_empty() {
                continue;
            }
            let mut config = async_nats::jetstream::consumer::pull::OrderedConfig {
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartTime {
                    start_time,
                },
                ..Default::default()
            };
            if group.len() == 1 {
                config.filter_subject = group[0].clone();
            } else {
                config.filter_subjects = group.clone();
            }
            let consumer = match self.sessions.messages.create_consumer(config).await {
                Ok(c) => c,
                Err(e) if group.len() > 1 => {
                    tracing::debug!(error = %e, "cluster: a catch-up's subjects refused together: one consumer each");
                    groups.extend(group.into_iter().map(|x| vec![x]));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot read MILLET_MSGS for a session's catch-up");
                    continue;
                }
            };
            // What was stored when the consumer was made, then what comes
            // until [`CATCH_UP_FOLLOW`] after the catch-up began: by then
            // the session's new subscriptions have reached every NATS
            // server, and what comes after reaches it live (a consumer
            // following live traffic until it is idle might never end).
            let mut stored = consumer.cached_info().num_pending;
            if stored == 0 {
                continue;
            }
            let Ok(mut messages) = consumer.messages().await else {
                continue;
            };
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    tracing::warn!(
                        "cluster: a session's catch-up took too long: it has what was read"
                    );
                    break 'groups;
                }
                let next = tokio::time::timeout(REPLAY_QUIET.min(left), messages.next()).await;
                let Ok(Some(Ok(m))) = next else {
                    break;
                };
                let Ok(info) = m.info() else {
                    break;
                };
                let (seq, pending) = (info.stream_sequence, info.pending);
                found.insert(seq, m.message.payload.clone());
                stored = stored.saturating_sub(1);
                if pending == 0
                    || found.len() >= limit
                    || (stored == 0 && tokio::time::Instant::now() >= follow_until)
                {
                    break;
                }
            }
        }
        let now = Instant::now();
        found
            .into_iter()
            .filter_map(|(seq, payload)| {
                let record = postcard::from_bytes::<MessageRecord>(&payload).ok()?;
                let m = from_record(record, now);
                (!m.is_expired(now)).then(|| (seq, Arc::new(m)))
            })
            .take(limit)
            .collect()
    }

    /// The node's NATS connection is back after a break that began at
    /// `since_ms` (unix ms): the QoS 1/2 messages the other nodes stored in
    /// `MILLET_MSGS` meanwhile (from [`MARK_MARGIN`] before) are routed to
    /// this node's plain subscribers, as live routing would have, in
    /// stream order, through one ordered consumer that exists only while it
    /// reads (at most [`NODE_CATCH_UP`] messages). At least once: what came
    /// live just before the break or just after the reconnection comes
    /// again.
    async fn catch_up_node(&self, since_ms: u64) {
        use futures_util::StreamExt;
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        let from = since_ms.saturating_sub(MARK_MARGIN.as_millis() as u64);
        let Ok(start_time) = async_nats::datetime::from_nanos(i128::from(from) * 1_000_000) else {
            return;
        };
        let config = async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartTime {
                start_time,
            },
            ..Default::default()
        };
        // JetStream may still be electing leaders right after a break.
        let deadline = Instant::now() + SETUP_TIME;
        let consumer = match retrying(deadline, || {
            self.sessions.messages.create_consumer(config.clone())
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot catch up after a NATS break: messages sent meanwhile are missed here");
                return;
            }
        };
        let (mut routed, mut read) = (0u64, 0u64);
        if consumer.cached_info().num_pending > 0 {
            let Ok(mut messages) = consumer.messages().await else {
                return;
            };
            let until = tokio::time::Instant::now() + SETUP_TIME;
            loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                let Ok(Some(Ok(m))) =
                    tokio::time::timeout(REPLAY_QUIET.min(left), messages.next()).await
                else {
                    break;
                };
                read += 1;
                let pending = m.info().map(|i| i.pending).unwrap_or(0);
                let origin = m
                    .message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(ORIGIN))
                    .and_then(|v| u64::from_str_radix(v.as_str(), 16).ok());
                // This node's own were routed here when published.
                if origin.is_some_and(|o| o != self.origin) {
                    if let Ok(record) = postcard::from_bytes::<MessageRecord>(&m.message.payload) {
                        let now = Instant::now();
                        let msg = from_record(record, now);
                        if !msg.is_expired(now) {
                            broker.route_from_cluster(Arc::new(msg), Scope::Plain);
                            routed += 1;
                        }
                    }
                }
                if pending == 0 || read >= NODE_CATCH_UP {
                    break;
                }
            }
        }
        tracing::info!(
            read,
            routed,
            "cluster: caught up after a NATS break (MILLET_MSGS)"
        );
    }

    /// Give `msg` to a member of `$share/{group}/{filter}` on another node
    /// (one NATS chooses): published on the group's own subject
    /// ([`REDELIVER`]), `hops` times so far.
    fn redeliver(&self, group: &str, filter: &str, msg: &Message, hops: u32) {
        let subject = format!("{REDELIVER}.{}", queue_group(group, filter));
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN, self.origin_header.clone());
        headers.insert(HOPS, hops.to_string().as_str());
        let Ok(payload) = postcard::to_allocvec(&to_record(msg)) else {
            return;
        };
        let _ = self
            .ctl
            .send(Control::Redeliver(subject, headers, Bytes::from(payload)));
    }

    /// Ask the node of `origin` to close its connection for `client_id`
    /// and end its session there, and wait until it has (or the node does
    /// not answer: it is gone). With `moving` (the new connection resumes
    /// the session) the node sends the session over: returned.
    async fn kick_remote(
        &self,
        origin: u64,
        revision: u64,
        client_id: &ByteString,
        moving: bool,
    ) -> Kicked {
        use futures_util::StreamExt;
        let subject = format!("_MILLET.kick.{origin:016x}");
        tracing::debug!(client_id = %client_id, revision, moving, "cluster: asking the owner to close its connection");
        let mode = if moving { 'h' } else { 'k' };
        let payload = Bytes::from(format!("{revision} {mode} {client_id}"));
        let client = &self.owners.client;
        let inbox = client.new_inbox();
        let mut answers = match client.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "cluster: cannot ask the owner node to close its connection");
                return Kicked::NoSession;
            }
        };
        if let Err(e) = client.publish_with_reply(subject, inbox, payload).await {
            tracing::warn!(client_id = %client_id, error = %e, "cluster: cannot ask the owner node to close its connection");
            return Kicked::NoSession;
        }
        // The answer: chunks `i/n` of the moved session's record (`0/0`:
        // none), in order; "no responders" when the node is gone.
        let mut bytes = Vec::new();
        let mut expected = None;
        loop {
            let next = tokio::time::timeout(MOVE_TIMEOUT, answers.next()).await;
            let m = match next {
                Ok(Some(m)) => m,
                Ok(None) => return Kicked::NoSession,
                Err(_) => {
                    tracing::warn!(client_id = %client_id, "cluster: the owner node did not answer a takeover in time (gone?)");
                    return if expected.is_none() {
                        Kicked::Gone
                    } else {
                        Kicked::NoSession
                    };
                }
            };
            if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                tracing::debug!(client_id = %client_id, "cluster: the owner node did not answer a takeover (gone)");
                return Kicked::Gone;
            }
            let chunk = m
                .headers
                .as_ref()
                .and_then(|h| h.get(CHUNK))
                .and_then(|v| parse_chunk(v.as_str()));
            let Some((i, n)) = chunk else {
                tracing::warn!(client_id = %client_id, "cluster: a takeover's answer without its chunk header ignored");
                return Kicked::NoSession;
            };
            if n == 0 {
                return Kicked::NoSession;
            }
            if i != expected.unwrap_or(1) {
                tracing::warn!(client_id = %client_id, i, n, "cluster: a moved session's chunks out of order: not moved");
                return Kicked::NoSession;
            }
            bytes.extend_from_slice(&m.payload);
            if i == n {
                break;
            }
            expected = Some(i + 1);
        }
        match postcard::from_bytes::<MovedRecord>(&bytes) {
            Ok(r) => Kicked::Moved(r.into_moved(Instant::now())),
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "cluster: a moved session that does not decode: not moved");
                Kicked::NoSession
            }
        }
    }

    /// Keep the will of this node's connection `epoch` in JetStream, for
    /// the other nodes should this one die before the connection ends.
    async fn store_will(&self, client_id: &ByteString, will: &millet_codec::LastWill, epoch: u64) {
        let subject = format!("w.{:016x}.{}", self.origin, owner_key(client_id));
        let record = crate::store::WillRecord::from(will);
        let payload = match postcard::to_allocvec(&(client_id.to_string(), record)) {
            Ok(v) => Bytes::from(v),
            Err(_) => return,
        };
        let stored = match self.wills.js.publish(subject, payload).await {
            Ok(ack) => ack.await.map(|a| a.sequence).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(seq) => {
                self.wills
                    .stored
                    .lock()
                    .insert(client_id.clone(), (seq, epoch));
            }
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "cluster: cannot store a will in JetStream: it is published only by this node")
            }
        }
    }

    /// The connection of `epoch` for `client_id` ended: its owner entry
    /// goes, unless another connection took it since, and so does its
    /// stored will.
    fn released(&self, client_id: &ByteString, epoch: u64) {
        let will = {
            let mut stored = self.wills.stored.lock();
            match stored.get(client_id) {
                Some(&(seq, e)) if e == epoch => {
                    stored.remove(client_id);
                    Some(seq)
                }
                _ => None,
            }
        };
        if let Some(seq) = will {
            let stream = self.wills.stream.clone();
            let subject = format!("w.{:016x}.{}", self.origin, owner_key(client_id));
            self.rt.spawn(async move {
                // Up to this will: a newer one of a new connection stays.
                let _ = stream.purge().filter(subject).sequence(seq + 1).await;
            });
        }
        // A session kept here (persistent, disconnected) keeps its owner
        // entry: the node its client connects to next asks for it
        // ([`NatsLink::session_ended`] deletes the entry).
        if self
            .broker
            .upgrade()
            .is_some_and(|b| b.has_session(client_id))
        {
            return;
        }
        let rev = {
            let mut owned = self.owners.owned.lock();
            match owned.get(client_id) {
                Some(&(rev, e)) if e == epoch => {
                    owned.remove(client_id);
                    rev
                }
                _ => return,
            }
        };
        let kv = self.owners.kv.clone();
        let key = owner_key(client_id);
        self.rt.spawn(async move {
            // A revision moved on means another connection owns it now.
            let _ = kv.delete_expect_revision(key, Some(rev)).await;
        });
    }

    /// A message from NATS, on one of this node's subscriptions.
    fn received(&self, broker: &Broker, interest: &Interest, m: async_nats::Message) {
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let origin = header(ORIGIN).and_then(|v| u64::from_str_radix(&v, 16).ok());
        let Some(origin) = origin else {
            tracing::debug!(subject = %m.subject, "cluster: a message without Millet's headers ignored");
            return;
        };
        let Ok(record) = postcard::from_bytes::<MessageRecord>(&m.payload) else {
            tracing::warn!(subject = %m.subject, "cluster: a message that is not a Millet message record ignored");
            return;
        };
        let now = Instant::now();
        match &interest.group {
            None => {
                if origin == self.origin {
                    return; // routed here when it was published
                }
                broker.route_from_cluster(
                    Arc::new(from_record(record, now)),
                    Scope::Via(&interest.filter),
                );
            }
            Some(group) => {
                let share = format!("$share/{group}/{}", interest.filter);
                let msg = Arc::new(from_record(record, now));
                let routed = broker.route_from_cluster(msg.clone(), Scope::Shared(&share));
                if routed.sessions == 0 && msg.qos != millet_codec::QoS::AtMostOnce {
                    // The node's last member of the group left while NATS
                    // still chose this node for the group: the message goes
                    // to another member node (a few times at most).
                    let hops = header(HOPS)
                        .and_then(|h| h.parse::<u32>().ok())
                        .unwrap_or(0);
                    if hops < MAX_HOPS {
                        self.redeliver(group, &interest.filter, &msg, hops + 1);
                    } else {
                        tracing::debug!(%share, "cluster: a shared subscription's message found no member");
                    }
                }
            }
        }
    }

    /// Keep `msg` (its record `payload`, its headers) as the retained
    /// message of its topic, in order after the earlier ones; the ticket
    /// its QoS 1/2 acknowledgement waits for.
    fn store_retained(&self, msg: &Message, mut headers: HeaderMap, payload: Bytes) -> Ticket {
        let subject = subject::topic_to_subject("r", &msg.topic);
        let ttl = if msg.payload.is_empty() {
            Some(TOMBSTONE_TTL)
        } else {
            // Whole seconds, rounded up (the record's own expiry is exact).
            msg.expires_at.map(|at| {
                let left = at.saturating_duration_since(Instant::now());
                Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0))
                    .max(Duration::from_secs(1))
            })
        };
        if let Some(ttl) = ttl {
            headers.insert(
                async_nats::header::NATS_MESSAGE_TTL,
                HeaderValue::from(ttl.as_secs()),
            );
        }
        let id = if msg.qos == millet_codec::QoS::AtMostOnce {
            0
        } else {
            self.new_ticket()
        };
        if self
            .retained
            .tx
            .try_send((subject, headers, payload, id))
            .is_err()
        {
            self.retained_error("a store", "the queue to JetStream is full");
            if id != 0 {
                self.ticket_answered(id, false);
            }
        }
        Ticket(id)
    }

    /// A ticket waiting for JetStream's answer ([`NatsLink::ticket_answered`]).
    fn new_ticket(&self) -> u64 {
        let id = (self.tickets.next.fetch_add(1, Ordering::Relaxed) + 1) | CLUSTER_TICKET;
        self.tickets.pending.lock().insert(
            id,
            PendingTicket {
                stored: None,
                then: Ticket::NONE,
                waiters: Vec::new(),
                answered: None,
            },
        );
        id
    }

    /// `what` failed on the retained stream (logged at most once a minute).
    fn retained_error(&self, what: &str, error: &str) {
        if once_a_minute(&self.retained.last_error_line) {
            tracing::warn!(what, error, "cluster: retained messages in JetStream: {what} failed (a store's QoS 1/2 publish is refused; a replay delivers what it read; at most one line a minute)");
        }
    }

    /// The connection to NATS broke: JetStream's answers to what was
    /// sent before may never come, so those acknowledgements are refused
    /// now (the message may still have been stored and delivered: the
    /// publisher sends it again, at least once) rather than after a
    /// time-out the client may not wait for.
    fn fail_unanswered(&self) {
        let ids: Vec<u64> = self
            .tickets
            .pending
            .lock()
            .iter()
            .filter(|(_, p)| p.stored.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.ticket_answered(id, false);
        }
    }

    /// JetStream answered for ticket `id` (the first answer counts).
    fn ticket_answered(&self, id: u64, stored: bool) {
        let (then, waiters) = {
            let mut pending = self.tickets.pending.lock();
            let Some(p) = pending.get_mut(&id).filter(|p| p.stored.is_none()) else {
                return;
            };
            p.stored = Some(stored);
            p.answered = Some(Instant::now());
            (p.then, std::mem::take(&mut p.waiters))
        };
        for w in waiters {
            if stored {
                self.ticket_wait(then, &w);
            } else {
                w.wake();
            }
        }
    }

    /// Where ticket `t` (one of this engine's, or the broker's) stands.
    fn ticket_status(&self, t: Ticket, broker: &Broker) -> AckStatus {
        if t == NATS_DOWN {
            return AckStatus::Failed {
                out_of_space: false,
            };
        }
        if !is_cluster_ticket(t) {
            return Broker::ticket_status(broker, t);
        }
        let then = match self.tickets.pending.lock().get(&t.0) {
            // Asked about after it was dropped: never acknowledge on doubt.
            None => {
                return AckStatus::Failed {
                    out_of_space: false,
                }
            }
            Some(p) => match p.stored {
                None => return AckStatus::Pending,
                Some(false) => {
                    return AckStatus::Failed {
                        out_of_space: false,
                    }
                }
                Some(true) => p.then,
            },
        };
        let status = self.ticket_status(then, broker);
        if status != AckStatus::Pending {
            // Asked once done by the one connection waiting for it.
            self.tickets.pending.lock().remove(&t.0);
        }
        status
    }

    /// Wake `w` once ticket `t` is no longer pending.
    fn ticket_wait(&self, t: Ticket, w: &Arc<ConnWaker>) {
        if t == NATS_DOWN {
            w.wake();
            return;
        }
        if !is_cluster_ticket(t) {
            if let Some(broker) = self.broker.upgrade() {
                if Broker::ticket_status(&broker, t) == AckStatus::Pending {
                    Broker::ticket_wait(&broker, t, w);
                    return;
                }
            }
            w.wake();
            return;
        }
        let then = {
            let mut pending = self.tickets.pending.lock();
            match pending.get_mut(&t.0) {
                Some(p) if p.stored.is_none() => {
                    p.waiters.push(w.clone());
                    return;
                }
                Some(p) if p.stored == Some(true) => p.then,
                _ => {
                    drop(pending);
                    w.wake();
                    return;
                }
            }
        };
        self.ticket_wait(then, w);
    }

    /// Drop the answered entries nobody asked about for a minute (their
    /// connections went away).
    fn sweep_tickets(&self) {
        let now = Instant::now();
        self.tickets.pending.lock().retain(|_, p| {
            p.answered
                .is_none_or(|t| now.duration_since(t) < Duration::from_secs(60))
        });
    }

    /// The retained messages matching `filter`, from JetStream.
    async fn fetch_retained(&self, filter: &str) -> anyhow::Result<Vec<Arc<Message>>> {
        use futures_util::StreamExt;
        let mut records = Vec::new();
        if !filter.contains(['+', '#']) {
            let subject = subject::topic_to_subject("r", filter);
            match self
                .retained
                .stream
                .direct_get_last_for_subject(subject)
                .await
            {
                Ok(m) => records.push(m.payload),
                Err(e)
                    if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        } else {
            let mut subjects = subject::filter_to_subjects("r", filter);
            let mut config = async_nats::jetstream::consumer::pull::OrderedConfig {
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            };
            if subjects.len() == 1 {
                config.filter_subject = subjects.remove(0);
            } else {
                config.filter_subjects = subjects;
            }
            let consumer = self.retained.stream.create_consumer(config).await?;
            if consumer.cached_info().num_pending > 0 {
                let mut messages = consumer.messages().await?;
                // Until the last pending one; a quiet stream (its last
                // pending message expired meanwhile) ends the read with
                // what came.
                while let Ok(Some(m)) = tokio::time::timeout(REPLAY_QUIET, messages.next()).await {
                    let m = m?;
                    let pending = m.info().map(|i| i.pending).unwrap_or(0);
                    records.push(m.message.payload.clone());
                    if pending == 0 {
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        let mut out = Vec::with_capacity(records.len());
        for payload in records {
            let Ok(record) = postcard::from_bytes::<MessageRecord>(&payload) else {
                continue;
            };
            // A cleared topic, a topic the filter's `$` rule leaves out, or
            // one expired before JetStream removed it.
            if record.payload.is_empty()
                || !millet_codec::topic::topic_matches(filter, &record.topic)
            {
                continue;
            }
            let m = from_record(record, now);
            if !m.is_expired(now) {
                out.push(Arc::new(m));
            }
        }
        Ok(out)
    }

    fn log_forward_drop(&self) {
        let n = self.forward_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if once_a_minute(&self.last_drop_line) {
            tracing::warn!(
                dropped_total = n,
                "cluster: the queue to NATS is full (NATS slow or unreachable): messages not forwarded to other nodes, their QoS 1/2 publishes refused (at most one line a minute)"
            );
        }
    }
}

impl ClusterLink for NatsLink {
    fn forward(&self, msg: &Message, retain: bool) -> Ticket {
        let subject = subject::topic_to_subject(qos_prefix(msg.qos as u8), &msg.topic);
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN, self.origin_header.clone());
        let payload = match postcard::to_allocvec(&to_record(msg)) {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                tracing::error!(error = %e, "cluster: cannot encode a message: not forwarded");
                return Ticket::NONE;
            }
        };
        let retained = if retain {
            self.store_retained(msg, headers.clone(), payload.clone())
        } else {
            Ticket::NONE
        };
        // QoS 1/2: stored in `MILLET_MSGS` (which also routes it), and
        // acknowledged once JetStream has it.
        let id = if msg.qos == millet_codec::QoS::AtMostOnce {
            0
        } else {
            self.new_ticket()
        };
        if self.out.try_send((subject, headers, payload, id)).is_err() {
            self.log_forward_drop();
            if id != 0 {
                self.ticket_answered(id, false);
            }
        }
        ClusterLink::join_tickets(self, Ticket(id), retained)
    }

    fn replay_retained(&self, cell: &Arc<SessionCell>, replay: &DeferredReplay) {
        // From JetStream ([`Retained`]), and this node's own `$SYS` ones;
        // queued when they are read (behind the SUBACK, which the
        // connection sends first whatever the order).
        let Some(link) = self.myself.upgrade() else {
            return;
        };
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        let cell = cell.clone();
        let replay = replay.clone();
        self.rt.spawn(async move {
            let fetched =
                tokio::time::timeout(REPLAY_TIMEOUT, link.fetch_retained(&replay.filter)).await;
            let mut messages = match fetched {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    link.retained_error("a replay", &format!("{}: {e}", replay.filter));
                    Vec::new()
                }
                Err(_) => {
                    link.retained_error("a replay", &format!("{}: timed out", replay.filter));
                    Vec::new()
                }
            };
            let now = Instant::now();
            messages.extend(
                broker
                    .retained_matching(&replay.filter, now)
                    .into_iter()
                    .filter(|m| m.topic.starts_with("$SYS/")),
            );
            broker.replay_messages(&cell, &replay, messages);
        });
    }

    fn join_tickets(&self, a: Ticket, b: Ticket) -> Ticket {
        if a == NATS_DOWN || b == NATS_DOWN {
            return NATS_DOWN;
        }
        let (cluster, other) = match (is_cluster_ticket(a), is_cluster_ticket(b)) {
            (false, false) => return a.max(b),
            (true, _) => (a, b),
            (false, true) => (b, a),
        };
        if other.is_none() {
            return cluster;
        }
        // Joined before anyone waits on the ticket (the publish's own
        // tickets, before its acknowledgement is queued), so `then` may be
        // changed whether JetStream answered yet or not.
        let then = {
            let mut pending = self.tickets.pending.lock();
            match pending.get_mut(&cluster.0) {
                Some(p) if p.stored != Some(false) => {
                    let then = p.then;
                    if !is_cluster_ticket(then) && !is_cluster_ticket(other) {
                        p.then = then.max(other);
                        return cluster;
                    }
                    then
                }
                // Refused (or gone, which counts as refused): so is the join.
                _ => return cluster,
            }
        };
        // Both have parts of this engine's: chained.
        let joined = self.join_tickets(then, other);
        if let Some(p) = self.tickets.pending.lock().get_mut(&cluster.0) {
            p.then = joined;
        }
        cluster
    }

    fn redeliver_shared(&self, group: &str, filter: &str, msg: &Message) {
        self.redeliver(group, filter, msg, 0);
    }

    fn interest_added(&self, filter: &str, share: Option<&str>) {
        let _ = self.ctl.send(Control::Add(Interest {
            filter: filter.to_owned(),
            group: share.map(str::to_owned),
        }));
    }

    fn session_ended(&self, client_id: &str) {
        let recorded = self.sessions.recorded.lock().remove(client_id);
        // Not owned any more: another node took the client id over, and
        // its entries are that node's to write.
        let Some((rev, _)) = self.owners.owned.lock().remove(client_id) else {
            return;
        };
        if recorded {
            let _ = self.sessions.tx.send(SessionOp::Delete {
                key: owner_key(client_id),
            });
        }
        let kv = self.owners.kv.clone();
        let key = owner_key(client_id);
        self.rt.spawn(async move {
            // A revision moved on means another connection owns it now.
            let _ = kv.delete_expect_revision(key, Some(rev)).await;
        });
    }

    fn interest_removed(&self, filter: &str, share: Option<&str>) {
        let _ = self.ctl.send(Control::Remove(Interest {
            filter: filter.to_owned(),
            group: share.map(str::to_owned),
        }));
    }
}

/// A persistent session's incoming QoS 2 ids awaiting PUBREL, as
/// `millet_qos2` holds them: two bytes each, big-endian.
fn encode_qos2(ids: &[u16]) -> Bytes {
    ids.iter().flat_map(|id| id.to_be_bytes()).collect()
}

fn decode_qos2(v: &[u8]) -> Vec<u16> {
    v.chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .filter(|&id| id != 0)
        .collect()
}

/// What happened to an outgoing QoS 2 message of a persistent session, as
/// `MILLET_QOS2OUT` holds it (postcard, at `q.<owner key>`): the node that
/// rebuilds the session after this one's death replays them
/// ([`NatsLink::outgoing_qos2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Qos2Event {
    /// PUBLISH sent under `pid`; the message's [`qos2_digest`].
    Sent { pid: u16, digest: u64 },
    /// PUBREC received, PUBREL sent.
    Released { pid: u16 },
    /// An error PUBREC: done (a PUBCOMP is not recorded: the id's next
    /// `Sent` says it).
    Done { pid: u16 },
}

/// A session's outgoing QoS 2 state after `events`, in order: what is in
/// flight (packet id, PUBREL sent, digest) and the digests of what was
/// done (completed, or refused by an error PUBREC: not delivered again
/// either way).
fn replay_qos2(events: impl IntoIterator<Item = Qos2Event>) -> Qos2Resume {
    let mut r = Qos2Resume::default();
    for e in events {
        match e {
            Qos2Event::Sent { pid, digest } => {
                // An id is reused once its message is done: no event says
                // so for a PUBCOMP (one write less per message; a message
                // whose PUBCOMP came last is resent as a PUBREL only).
                if let Some(i) = r.inflight.iter().position(|o| o.0 == pid) {
                    let (_, _, done) = r.inflight.remove(i);
                    r.completed.push(done);
                }
                r.inflight.push((pid, false, digest));
            }
            Qos2Event::Released { pid } => {
                if let Some(o) = r.inflight.iter_mut().find(|o| o.0 == pid) {
                    o.1 = true;
                }
            }
            Qos2Event::Done { pid } => {
                if let Some(i) = r.inflight.iter().position(|o| o.0 == pid) {
                    let (_, _, digest) = r.inflight.remove(i);
                    r.completed.push(digest);
                }
            }
        }
    }
    r
}

/// The owner entry's key for a client id: a hash, so that any client id
/// (any UTF-8, up to 64 KiB) makes a valid, bounded key.
fn owner_key(client_id: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(client_id.as_bytes())[..20])
}

/// The origin named by an owner entry.
fn owner_origin(value: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(value).ok()?;
    u64::from_str_radix(s.split(' ').next()?, 16).ok()
}

/// Answers other nodes' takeovers: closes this node's connection for the
/// client id asked for (0x8E) and answers once it has closed (at most 2 s).
async fn kick_service(
    client: async_nats::Client,
    mut kicks: async_nats::Subscriber,
    link: Weak<NatsLink>,
    broker: Weak<Broker>,
) {
    use futures_util::StreamExt;
    while let Some(m) = kicks.next().await {
        let (Some(link), Some(broker)) = (link.upgrade(), broker.upgrade()) else {
            return;
        };
        let Some((revision, moving, client_id)) = parse_kick(&m.payload) else {
            continue;
        };
        let client = client.clone();
        tokio::spawn(async move {
            if let Some(named) = link.owners.attaching.lock().get_mut(&client_id) {
                *named = (*named).max(revision);
            }
            // A kick naming an older entry than this node's connection
            // wrote is stale: its sender's compare-and-set fails, and it
            // asks again with the current revision.
            let stale = {
                let mut owned = link.owners.owned.lock();
                let stale = owned
                    .get(&client_id)
                    .is_some_and(|&(mine, _)| revision < mine);
                if !stale {
                    // The asking node takes the entry over: this node
                    // does not delete it when the session goes.
                    owned.remove(&client_id);
                }
                stale
            };
            tracing::debug!(client_id = %client_id, revision, stale, moving, "cluster: asked to close a connection");
            // Detached and ended before the answer: the new connection is
            // attached elsewhere only once nothing reaches this one.
            let (old, mut session) = if stale {
                (None, None)
            } else {
                broker.give_up_session(&client_id, moving, Instant::now())
            };
            if let Some(s) = &mut session {
                s.complete_before_ms = Some(link.complete_before(&client_id, old.is_some()));
            }
            if let Some(reply) = m.reply {
                let chunks = match &session {
                    Some(s) => {
                        let max = client.server_info().max_payload.max(4096);
                        encode_moved(s, max.saturating_sub(1024))
                    }
                    None => Vec::new(),
                };
                send_chunks(&client, reply, chunks, &client_id).await;
            }
            if let Some((epoch, _)) = old {
                link.released(&client_id, epoch);
            }
        });
    }
}

/// What a takeover's kick found on the owner node.
enum Kicked {
    /// The session, handed over.
    Moved(MovedSession),
    /// The node answered: no session to move (or it could not be moved).
    NoSession,
    /// The node did not answer: gone (its sessions are in KV).
    Gone,
}

/// A kick's request: `<revision> <h|k> <client id>` (`h`: hand the
/// session over).
fn parse_kick(payload: &[u8]) -> Option<(u64, bool, ByteString)> {
    let p = std::str::from_utf8(payload).ok()?;
    let (rev, rest) = p.split_once(' ')?;
    let (mode, client_id) = rest.split_once(' ')?;
    let moving = match mode {
        "h" => true,
        "k" => false,
        _ => return None,
    };
    Some((rev.parse().ok()?, moving, ByteString::from(client_id)))
}

/// Header of a takeover's answer: chunk `i/n` of the moved session
/// (`0/0`: no session).
const CHUNK: &str = "Millet-Chunk";

/// How long a takeover waits for each part of the old node's answer.
const MOVE_TIMEOUT: Duration = Duration::from_secs(3);

fn parse_chunk(v: &str) -> Option<(u32, u32)> {
    let (i, n) = v.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// A moved session's record, cut to fit NATS's payload limit.
fn encode_moved(s: &MovedSession, chunk: usize) -> Vec<Bytes> {
    match postcard::to_allocvec(&MovedRecord::from_moved(s)) {
        Ok(v) => {
            let v = Bytes::from(v);
            let chunk = chunk.max(1024);
            (0..v.len().div_ceil(chunk).max(1))
                .map(|i| v.slice(i * chunk..((i + 1) * chunk).min(v.len())))
                .collect()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cluster: cannot encode a moved session");
            Vec::new()
        }
    }
}

/// Send a takeover's answer: the chunks (`i/n`), or `0/0` for none.
async fn send_chunks(
    client: &async_nats::Client,
    reply: async_nats::Subject,
    chunks: Vec<Bytes>,
    client_id: &str,
) {
    let n = chunks.len();
    if n == 0 {
        let mut h = HeaderMap::new();
        h.insert(CHUNK, "0/0");
        let _ = client.publish_with_headers(reply, h, Bytes::new()).await;
        return;
    }
    for (i, c) in chunks.into_iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert(CHUNK, format!("{}/{n}", i + 1).as_str());
        if let Err(e) = client.publish_with_headers(reply.clone(), h, c).await {
            tracing::warn!(client_id = %client_id, error = %e, "cluster: cannot send a moved session: it is lost");
            return;
        }
    }
    let _ = client.flush().await;
}

/// Subscriptions as the broker has them, from their records.
fn subscriptions_from_records(records: Vec<SubscriptionRecord>) -> Vec<(ByteString, Subscription)> {
    records
        .into_iter()
        .map(|r| {
            let share_group = match millet_codec::topic::parse_shared(&r.filter) {
                Ok(Some(sf)) => Some(ByteString::from(sf.group)),
                _ => None,
            };
            (
                ByteString::from(r.filter.as_str()),
                Subscription {
                    options: r.options(),
                    identifier: r.identifier,
                    share_group,
                },
            )
        })
        .collect()
}

/// A session moving to another node, on the wire (postcard).
#[derive(serde::Serialize, serde::Deserialize)]
struct MovedRecord {
    subscriptions: Vec<SubscriptionRecord>,
    /// In send order; `true`: awaiting PUBCOMP.
    inflight: Vec<(u16, MovedDelivery, bool)>,
    queue: Vec<MovedDelivery>,
    awaiting_rel: Vec<u16>,
    /// [`MovedSession::complete_before_ms`] (0: not known).
    complete_before_ms: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MovedDelivery {
    message: MessageRecord,
    qos: u8,
    retain: bool,
    subscription_ids: Vec<u32>,
    share: Option<String>,
}

impl MovedDelivery {
    fn from_delivery(d: &Delivery) -> MovedDelivery {
        MovedDelivery {
            message: to_record(&d.msg),
            qos: d.qos as u8,
            retain: d.retain,
            subscription_ids: d.subscription_ids.to_vec(),
            share: d.share.as_ref().map(|s| s.to_string()),
        }
    }

    fn into_delivery(self, now: Instant) -> Delivery {
        Delivery {
            msg: Arc::new(from_record(self.message, now)),
            qos: crate::broker::persist::qos(self.qos),
            retain: self.retain,
            subscription_ids: self.subscription_ids.into_iter().collect(),
            share: self.share.map(ByteString::from),
            seq: 0,
            replay: false,
        }
    }
}

impl MovedRecord {
    fn from_moved(s: &MovedSession) -> MovedRecord {
        MovedRecord {
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(f, sub)| SubscriptionRecord::new(f, &sub.options, sub.identifier))
                .collect(),
            inflight: s
                .inflight
                .iter()
                .map(|(pid, i)| {
                    (
                        *pid,
                        MovedDelivery::from_delivery(&i.delivery),
                        i.state == InflightState::AwaitComp,
                    )
                })
                .collect(),
            queue: s.queue.iter().map(MovedDelivery::from_delivery).collect(),
            awaiting_rel: s.awaiting_rel.clone(),
            complete_before_ms: s.complete_before_ms.unwrap_or(0),
        }
    }

    fn into_moved(self, now: Instant) -> MovedSession {
        MovedSession {
            subscriptions: subscriptions_from_records(self.subscriptions),
            inflight: self
                .inflight
                .into_iter()
                .map(|(pid, d, comp)| {
                    let state = if comp {
                        InflightState::AwaitComp
                    } else {
                        InflightState::AwaitAck
                    };
                    (
                        pid,
                        Inflight {
                            delivery: d.into_delivery(now),
                            state,
                        },
                    )
                })
                .collect(),
            queue: self
                .queue
                .into_iter()
                .map(|d| d.into_delivery(now))
                .collect(),
            awaiting_rel: self.awaiting_rel,
            complete_before_ms: (self.complete_before_ms > 0).then_some(self.complete_before_ms),
        }
    }
}

/// Heartbeats for this node, and looks for dead ones to publish their
/// wills ([`Wills`]).
async fn heartbeat(link: Weak<NatsLink>, broker: Weak<Broker>) {
    use futures_util::StreamExt;
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let (Some(link), Some(broker)) = (link.upgrade(), broker.upgrade()) else {
            return;
        };
        link.sweep_tickets();
        let w = &link.wills;
        let me = format!("{:016x}", link.origin);
        if let Err(e) = w.nodes.put(&me, Bytes::from(link.node_id.clone())).await {
            tracing::debug!(error = %e, "cluster: heartbeat not written");
            continue;
        }
        let Ok(mut keys) = w.members.keys().await else {
            continue;
        };
        let mut members = Vec::new();
        while let Some(Ok(k)) = keys.next().await {
            if k != me {
                members.push(k);
            }
        }
        for m in members {
            // Dead: no heartbeat entry (expired, or deleted). An error says
            // nothing: looked at again next time.
            let dead = match w.nodes.entry(&m).await {
                Ok(None) => true,
                Ok(Some(e)) => e.operation != async_nats::jetstream::kv::Operation::Put,
                Err(_) => false,
            };
            if !dead {
                continue;
            }
            let Ok(Some(entry)) = w.members.entry(&m).await else {
                continue;
            };
            if entry.operation != async_nats::jetstream::kv::Operation::Put {
                continue;
            }
            // The compare-and-set delete is the lock: one node reaps.
            if w.members
                .delete_expect_revision(&m, Some(entry.revision))
                .await
                .is_err()
            {
                continue;
            }
            let node = String::from_utf8_lossy(&entry.value).into_owned();
            reap(&link, &broker, &m, &node).await;
            // Its entries in KV expire with their sessions (a task: there
            // may be many, and this node keeps heartbeating meanwhile).
            if let Ok(origin) = u64::from_str_radix(&m, 16) {
                let link = link.clone();
                tokio::spawn(async move {
                    let (expiring, deleted) = link.expire_sessions_of(origin).await;
                    tracing::info!(dead_node = %node, expiring, deleted, "cluster: the client ids of a node that is gone: entries deleted, or expiring with their sessions");
                });
            }
        }
    }
}

/// Publish the wills of the dead node `origin`, each after its delay, and
/// purge them.
async fn reap(link: &NatsLink, broker: &Arc<Broker>, origin: &str, node: &str) {
    use futures_util::StreamExt;
    let w = &link.wills;
    let filter = format!("w.{origin}.>");
    let mut subjects = Vec::new();
    if let Ok(mut info) = w.stream.info_with_subjects(&filter).await {
        while let Some(Ok((subject, _))) = info.next().await {
            subjects.push(subject);
        }
    }
    let mut published = 0usize;
    for subject in &subjects {
        let Ok(m) = w.stream.get_last_raw_message_by_subject(subject).await else {
            continue;
        };
        let Ok((client_id, record)) =
            postcard::from_bytes::<(String, crate::store::WillRecord)>(&m.payload)
        else {
            continue;
        };
        let delay = Duration::from_secs(u64::from(record.delay_interval.unwrap_or(0)));
        let broker = broker.clone();
        published += 1;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            broker.publish_orphan_will(
                record.to_last_will(),
                ByteString::from(client_id),
                Instant::now(),
            );
        });
    }
    let _ = w.stream.purge().filter(filter).await;
    tracing::warn!(dead_node = %node, wills = published, "cluster: a node stopped heartbeating: its connections' wills published here");
}

/// Whether a line throttled to one a minute (its last time in `last`) is
/// due now; if so, now is its last time.
fn once_a_minute(last: &Mutex<Option<Instant>>) -> bool {
    let now = Instant::now();
    let mut last = last.lock();
    let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60));
    if due {
        *last = Some(now);
    }
    due
}

/// `m.<qos>`: the subject prefix of a message of that QoS.
fn qos_prefix(qos: u8) -> &'static str {
    match qos {
        0 => "m.0",
        1 => "m.1",
        _ => "m.2",
    }
}

/// The NATS queue group of `$share/{group}/{filter}`: the same on every
/// node, a plain token whatever the group and filter hold.
fn queue_group(group: &str, filter: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(group.as_bytes());
    h.update([0]);
    h.update(filter.as_bytes());
    format!("millet-share-{}", hex::encode(&h.finalize()[..16]))
}

fn unix_ms(now: Instant, at: Instant) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let wall = wall.as_millis() as u64;
    let ahead = at.saturating_duration_since(now).as_millis() as u64;
    wall.saturating_add(ahead)
}

fn to_record(m: &Message) -> MessageRecord {
    let now = Instant::now();
    crate::broker::persist::message_record(m, m.expires_at.map(|t| unix_ms(now, t)))
}

fn from_record(r: MessageRecord, now: Instant) -> Message {
    let now_ms = unix_ms(now, now);
    let expires_at = r
        .properties
        .expires_at_ms
        .map(|ms| now + Duration::from_millis(ms.saturating_sub(now_ms)));
    Message {
        properties: r.properties.to_publish(now_ms),
        topic: r.topic,
        payload: r.payload,
        qos: crate::broker::persist::qos(r.qos),
        retain: r.retain,
        expires_at,
        publisher: None,
        publisher_client_id: r.publisher.unwrap_or_default(),
        engine_id: Default::default(),
        routed_at: None,
    }
}

fn default_node_id(broker: &Broker) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match broker.node.config.listen.first() {
        Some(a) => format!("{host}-{}", a.port()),
        None => host,
    }
}

async fn connect(
    cfg: &NatsConfig,
    node_id: &str,
    up: Arc<std::sync::atomic::AtomicBool>,
    lost: Arc<tokio::sync::Notify>,
    back: mpsc::UnboundedSender<u64>,
) -> anyhow::Result<async_nats::Client> {
    // When the connection broke (unix ms), until it is back.
    let down_since: Arc<Mutex<Option<u64>>> = Arc::default();
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("millet-{node_id}"))
        .connection_timeout(Duration::from_secs(cfg.connect_timeout_secs.max(1)))
        // Reconnect for ever: the node rejoins when NATS comes back.
        .max_reconnects(None)
        .event_callback(move |e| {
            let up = up.clone();
            let lost = lost.clone();
            let back = back.clone();
            let down_since = down_since.clone();
            async move {
                match e {
                    async_nats::Event::Connected => {
                        up.store(true, Ordering::Release);
                        if let Some(since) = down_since.lock().take() {
                            let _ = back.send(since);
                        }
                        tracing::info!("cluster: NATS connected: QoS 1/2 publishes accepted")
                    }
                    async_nats::Event::Disconnected => {
                        up.store(false, Ordering::Release);
                        down_since
                            .lock()
                            .get_or_insert_with(|| unix_ms(Instant::now(), Instant::now()));
                        lost.notify_one();
                        tracing::warn!("cluster: NATS disconnected: QoS 1/2 publishes refused (v5 0x80; 3.x connections closed) until it is back; reconnecting")
                    }
                    other => tracing::warn!(event = %other, "cluster: NATS"),
                }
            }
        });
    if let Some(path) = &cfg.credentials_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| anyhow::anyhow!("engine.nats.credentials_file {}: {e}", path.display()))?;
    }
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let mut addrs = Vec::with_capacity(cfg.servers.len());
    for s in &cfg.servers {
        let a: async_nats::ServerAddr = s
            .parse()
            .map_err(|e| anyhow::anyhow!("engine.nats.servers: {s:?} is not a NATS URL: {e}"))?;
        addrs.push(a);
    }
    opts.connect(addrs.as_slice())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {}: {e}", cfg.servers.join(", ")))
}

/// Refuse a server older than [`MIN_SERVER`], with a clear message.
fn check_version(version: &str) -> anyhow::Result<()> {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().ok());
    let major = parts.next().flatten();
    let minor = parts.next().flatten();
    match (major, minor) {
        (Some(ma), Some(mi)) if (ma, mi) >= MIN_SERVER => Ok(()),
        _ => anyhow::bail!(
            "NATS server version {version:?} is too old or unknown: cluster mode needs {}.{} or later",
            MIN_SERVER.0,
            MIN_SERVER.1
        ),
    }
}

/// Hands forwarded messages to the NATS client, in order.
/// Stores retained messages in JetStream in the order they come, and
/// answers their tickets as JetStream acknowledges.
/// Applies [`Sessions`]' writes in order: published to the KV buckets'
/// subjects one after the other (one connection keeps their order), the
/// acknowledgements awaited alongside (at most 1,024 outstanding).
async fn session_writer(
    js: async_nats::jetstream::Context,
    mut rx: mpsc::UnboundedReceiver<SessionOp>,
    link: Weak<NatsLink>,
) {
    use futures_util::future::BoxFuture;
    use futures_util::stream::FuturesUnordered;
    use futures_util::{FutureExt, StreamExt};
    type Ack = BoxFuture<'static, Result<(), String>>;
    // JetStream's acknowledgement of a write; `ticket` (0: none) is
    // answered with it.
    let ack = |a: async_nats::jetstream::context::PublishAckFuture, ticket: u64| -> Ack {
        let link = link.clone();
        async move {
            let r = a.await.map(|_| ()).map_err(|e| e.to_string());
            if ticket != 0 {
                if let Some(link) = link.upgrade() {
                    link.ticket_answered(ticket, r.is_ok());
                }
            }
            r
        }
        .boxed()
    };
    let last_error = Mutex::new(None);
    let log = |e: &dyn std::fmt::Display| {
        if once_a_minute(&last_error) {
            tracing::warn!(error = %e, "cluster: cannot write a session to JetStream KV: a node dying now would lose it (at most one line a minute)");
        }
    };
    let mut acks = FuturesUnordered::new();
    loop {
        // JetStream's acknowledgements are taken as they come (a ticket
        // waits for one), not only when the next write is sent.
        let op = tokio::select! {
            op = rx.recv() => match op {
                Some(op) => op,
                None => break,
            },
            Some(r) = acks.next(), if !acks.is_empty() => {
                if let Err(e) = r {
                    log(&e);
                }
                continue;
            }
        };
        let del = || {
            let mut h = HeaderMap::new();
            h.insert("KV-Operation", "DEL");
            h
        };
        let sent = match op {
            SessionOp::Put { key, record } => js
                .publish(format!("$KV.millet_sessions.{key}"), record)
                .await
                .map(|a| vec![ack(a, 0)]),
            SessionOp::Mark { key, at_ms } => js
                .publish(
                    format!("$KV.millet_marks.{key}"),
                    Bytes::from(at_ms.to_string()),
                )
                .await
                .map(|a| vec![ack(a, 0)]),
            SessionOp::Qos2Out {
                key,
                events,
                ticket,
            } => {
                let sent = match postcard::to_allocvec(&events) {
                    Ok(v) => js.publish(format!("q.{key}"), Bytes::from(v)).await,
                    Err(_) => continue, // invariant: a Vec of plain enums encodes
                };
                match sent {
                    Ok(a) => Ok(vec![ack(a, ticket)]),
                    Err(e) => {
                        if let (true, Some(link)) = (ticket != 0, link.upgrade()) {
                            link.ticket_answered(ticket, false);
                        }
                        Err(e)
                    }
                }
            }
            SessionOp::Qos2 { key, ids, ticket } => {
                let subject = format!("$KV.millet_qos2.{key}");
                let sent = if ids.is_empty() {
                    js.publish_with_headers(subject, del(), Bytes::new()).await
                } else {
                    js.publish(subject, encode_qos2(&ids)).await
                };
                match sent {
                    Ok(a) => Ok(vec![ack(a, ticket)]),
                    Err(e) => {
                        if let (true, Some(link)) = (ticket != 0, link.upgrade()) {
                            link.ticket_answered(ticket, false);
                        }
                        Err(e)
                    }
                }
            }
            SessionOp::Delete { key } => {
                let mut acks = Vec::with_capacity(3);
                let mut failed = None;
                for bucket in ["millet_sessions", "millet_marks", "millet_qos2"] {
                    match js
                        .publish_with_headers(format!("$KV.{bucket}.{key}"), del(), Bytes::new())
                        .await
                    {
                        Ok(a) => acks.push(ack(a, 0)),
                        Err(e) => failed = Some(e),
                    }
                }
                match failed {
                    None => Ok(acks),
                    Some(e) => Err(e),
                }
            }
            SessionOp::Flush(done) => {
                while let Some(r) = acks.next().await {
                    if let Err(e) = r {
                        log(&e);
                    }
                }
                let _ = done.send(());
                continue;
            }
        };
        match sent {
            Ok(v) => acks.extend(v),
            Err(e) => log(&e),
        }
        while acks.len() > 1024 {
            if let Some(Err(e)) = acks.next().await {
                log(&e);
            }
        }
        while let Some(Some(r)) = acks.next().now_or_never() {
            if let Err(e) = r {
                log(&e);
            }
        }
    }
}

/// Every [`CHECKPOINT`], moves on the mark of each connected persistent
/// session that has been sent QoS 1/2 messages since its last mark and has
/// none pending now ([`Sessions`]).
async fn checkpoint(link: Weak<NatsLink>, broker: Weak<Broker>) {
    // Each session's packet id cursor at its last mark: it moves with
    // every QoS 1/2 message sent.
    let mut cursors: HashMap<u64, u16> = HashMap::new();
    loop {
        tokio::time::sleep(CHECKPOINT).await;
        let (Some(link), Some(broker)) = (link.upgrade(), broker.upgrade()) else {
            return;
        };
        let now_ms = unix_ms(Instant::now(), Instant::now());
        let mut seen = HashMap::with_capacity(cursors.len());
        for cell in broker.all_sessions() {
            let st = cell.state.lock();
            if st.conn_epoch == 0 || st.session.expiry_interval == 0 {
                continue;
            }
            let cursor = st.session.packet_id_cursor();
            let idle = st.session.queue_len() == 0 && st.session.inflight_len() == 0;
            drop(st);
            let kept = match cursors.get(&cell.id) {
                // First seen: its attach marked it if nothing was pending.
                None => cursor,
                Some(&old) if idle && old != cursor => {
                    let _ = link.sessions.tx.send(SessionOp::Mark {
                        key: owner_key(&cell.client_id),
                        at_ms: now_ms,
                    });
                    cursor
                }
                Some(&old) => old,
            };
            seen.insert(cell.id, kept);
        }
        cursors = seen;
    }
}

async fn retained_writer(
    js: async_nats::jetstream::Context,
    mut rx: mpsc::Receiver<(String, HeaderMap, Bytes, u64)>,
    link: Weak<NatsLink>,
) {
    while let Some((subject, headers, payload, id)) = rx.recv().await {
        store(&js, &link, (subject, headers, payload), id, |link, e| {
            if !e.full {
                link.retained_error("a store", &e.error);
                return false;
            }
            // Beyond the cluster's retained caps: routed, not kept, as a
            // new topic beyond the caps is on one node.
            if let Some(broker) = link.broker.upgrade() {
                broker
                    .node
                    .overload
                    .retained_refused
                    .fetch_add(1, Ordering::Relaxed);
            }
            if once_a_minute(&link.retained.last_full_line) {
                tracing::warn!(error = %e.error, "cluster: the retained store is full (limits.max_retained_messages / max_retained_bytes, cluster-wide): a new retained topic is routed but not kept (at most one line a minute)");
            }
            true
        })
        .await;
    }
}

/// Publish `m` (subject, headers, payload) to JetStream, in the caller's
/// order, and answer ticket `id` (0: none) once JetStream acknowledges it,
/// apart. `failed` hears of a refusal and says whether the ticket is
/// answered as done all the same (a retained message beyond the cluster's
/// caps: routed, not kept).
async fn store(
    js: &async_nats::jetstream::Context,
    link: &Weak<NatsLink>,
    m: (String, HeaderMap, Bytes),
    id: u64,
    failed: fn(&NatsLink, &StoreFailure) -> bool,
) {
    let sent = js.publish_with_headers(m.0, m.1, m.2).await;
    let link = link.clone();
    tokio::spawn(async move {
        let stored = match sent {
            Ok(ack) => ack.await.map_err(|e| StoreFailure::of(&e)),
            Err(e) => Err(StoreFailure::of(&e)),
        };
        let Some(link) = link.upgrade() else {
            return;
        };
        let done = match &stored {
            Ok(_) => true,
            Err(e) => failed(&link, e),
        };
        if id != 0 {
            link.ticket_answered(id, done);
        }
    });
}

/// Why JetStream did not store a message.
struct StoreFailure {
    error: String,
    /// The stream's limits refused it (`discard: new`, at `max_msgs` or
    /// `max_bytes`).
    full: bool,
}

impl StoreFailure {
    fn of(e: &async_nats::jetstream::context::PublishError) -> StoreFailure {
        let error = match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        };
        // JetStream's "maximum messages exceeded" / "maximum bytes
        // exceeded" (error code 10077, the store's own words).
        let full =
            error.contains("maximum messages exceeded") || error.contains("maximum bytes exceeded");
        StoreFailure { error, full }
    }
}

/// Hands this node's messages to NATS, in order: QoS 0 as core messages,
/// QoS 1/2 to JetStream (`MILLET_MSGS`, which delivers them to the
/// subscriptions as a core publish would), whose acknowledgements answer
/// their tickets.
async fn publisher(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    mut rx: mpsc::Receiver<Forward>,
    link: Weak<NatsLink>,
) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        for (subject, headers, payload, id) in batch.drain(..) {
            if id == 0 {
                if let Err(e) = client.publish_with_headers(subject, headers, payload).await {
                    tracing::warn!(error = %e, "cluster: a message could not be handed to NATS");
                }
                continue;
            }
            store(&js, &link, (subject, headers, payload), id, |link, e| {
                if once_a_minute(&link.last_store_error_line) {
                    tracing::warn!(error = %e.error, "cluster: a QoS 1/2 message could not be stored in JetStream: its publish is refused (at most one line a minute)");
                }
                false
            })
            .await;
        }
    }
}

/// A message for [`publisher`]: subject, headers, record, and its ticket
/// (0: QoS 0, none).
type Forward = (String, HeaderMap, Bytes, u64);

/// Applies interest changes to NATS in order, and answers barriers.
async fn control(
    client: async_nats::Client,
    mut rx: mpsc::UnboundedReceiver<Control>,
    link: Weak<NatsLink>,
    broker: Weak<Broker>,
) {
    // An interest's subscriptions (one, or two for a trailing `#`): each is
    // a task that ends (unsubscribing) when its sender is dropped.
    let mut subs: HashMap<Interest, Vec<Stop>> = HashMap::new();
    while let Some(c) = rx.recv().await {
        match c {
            Control::Add(i) => {
                let mut stops = Vec::new();
                for subject in subject::filter_to_subjects("m.*", &i.filter) {
                    let sub = match &i.group {
                        None => client.subscribe(subject.clone()).await,
                        Some(g) => {
                            client
                                .queue_subscribe(subject.clone(), queue_group(g, &i.filter))
                                .await
                        }
                    };
                    match sub {
                        Ok(sub) => stops.push(spawn_reader(sub, &i, &link, &broker)),
                        Err(e) => {
                            tracing::error!(%subject, error = %e, "cluster: cannot subscribe on NATS: messages of other nodes will not reach this filter")
                        }
                    }
                }
                if let Some(g) = &i.group {
                    // The group's redeliveries ([`ClusterLink::redeliver_shared`]),
                    // to one member node as its messages.
                    let qg = queue_group(g, &i.filter);
                    match client
                        .queue_subscribe(format!("{REDELIVER}.{qg}"), qg)
                        .await
                    {
                        Ok(sub) => stops.push(spawn_reader(sub, &i, &link, &broker)),
                        Err(e) => {
                            tracing::error!(error = %e, "cluster: cannot subscribe on NATS: a shared subscription's redeliveries will not reach this node")
                        }
                    }
                }
                subs.insert(i, stops);
            }
            Control::Remove(i) => {
                // The readers unsubscribe (draining); the next command
                // waits until their unsubscriptions are on the connection.
                for stop in subs.remove(&i).unwrap_or_default() {
                    let (done, unsubscribed) = tokio::sync::oneshot::channel();
                    if stop.send(done).is_ok() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), unsubscribed).await;
                    }
                }
            }
            Control::Redeliver(subject, headers, payload) => {
                if let Err(e) = client.publish_with_headers(subject, headers, payload).await {
                    tracing::warn!(error = %e, "cluster: a shared subscription's message could not be given to another member");
                }
            }
            Control::Barrier(done) => {
                // A request goes to the server after the subscriptions
                // above, on the same connection: its answer ("no
                // responders") says the server has them.
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.request("_MILLET.barrier", Bytes::new()),
                )
                .await;
                done();
            }
        }
    }
}

/// Start the [`reader`] of `sub` for `interest`: dropping (or firing) the
/// returned sender stops it.
fn spawn_reader(
    sub: async_nats::Subscriber,
    interest: &Interest,
    link: &Weak<NatsLink>,
    broker: &Weak<Broker>,
) -> Stop {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(reader(
        sub,
        stopped,
        interest.clone(),
        link.clone(),
        broker.clone(),
    ));
    stop
}

/// Stops a [`reader`]: it answers on the sender it is given once its
/// unsubscription is on the connection (dropped: stops it too).
type Stop = tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>;

/// How long a stopped subscription waits for each message NATS still
/// delivers to it (the drain ends with the server's answer, well before).
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// One NATS subscription: its messages routed until `stop` fires.
async fn reader(
    mut sub: async_nats::Subscriber,
    mut stop: tokio::sync::oneshot::Receiver<tokio::sync::oneshot::Sender<()>>,
    interest: Interest,
    link: Weak<NatsLink>,
    broker: Weak<Broker>,
) {
    use futures_util::StreamExt;
    loop {
        tokio::select! {
            m = sub.next() => {
                let Some(m) = m else { return };
                let (Some(link), Some(broker)) = (link.upgrade(), broker.upgrade()) else {
                    return;
                };
                link.received(&broker, &interest, m);
            }
            done = &mut stop => {
                // Drained, not dropped: what NATS sent to this subscription
                // before it took the unsubscription in is still routed (the
                // subscription ends at the server's answer to a ping sent
                // after it), so a shared subscription's message chosen for
                // this node as its last member left goes to another member
                // ([`NatsLink::received`]).
                let drained = sub.drain().await;
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                if drained.is_err() {
                    return;
                }
                while let Ok(Some(m)) = tokio::time::timeout(DRAIN_TIME, sub.next()).await {
                    let (Some(link), Some(broker)) = (link.upgrade(), broker.upgrade()) else {
                        return;
                    };
                    link.received(&broker, &interest, m);
                }
                return;
            }
        }
    }
}

/// The ticket of a QoS 1/2 publish refused because NATS is unreachable:
/// failed (v5 PUBACK / PUBREC 0x80; a 3.x connection is closed, having no
/// negative acknowledgement). Above every store sequence.
const NATS_DOWN: Ticket = Ticket(u64::MAX);

/// The engine of a cluster node: the node's broker, with a SUBACK waiting
/// until NATS has the node's subscriptions ([`NatsLink::barrier`]).
pub struct Clustered {
    broker: Arc<Broker>,
    link: Arc<NatsLink>,
}

impl Clustered {
    pub fn new(broker: Arc<Broker>, link: Arc<NatsLink>) -> Clustered {
        Clustered { broker, link }
    }
}

impl Engine for Clustered {
    fn attach(&self, req: AttachRequest, reply_to: &Arc<ConnWaker>, _now: Instant) -> Call {
        let (reply, pending) = Reply::new(reply_to);
        let link = self.link.clone();
        let broker = self.broker.clone();
        let waker = reply_to.clone();
        self.link.rt.spawn(async move {
            let c = link.take_over_and_attach(&broker, req, &waker).await;
            if let Err(Completion::Attached(a)) = reply.complete(c) {
                // The connection went away meanwhile: undo the attach.
                Engine::detach(&*broker, &a.cell, a.epoch, true, None, Instant::now());
                link.released(&a.cell.client_id, a.epoch);
            }
        });
        Call::Later(pending)
    }

    fn subscribe(&self, req: SubscribeRequest, reply_to: &Arc<ConnWaker>, now: Instant) -> Call {
        let cell = req.cell.clone();
        match Engine::subscribe(&*self.broker, req, reply_to, now) {
            Call::Ready(c) => {
                self.link.save_session(&cell, false);
                let (reply, pending) = Reply::new(reply_to);
                self.link.barrier(Box::new(move || {
                    // A connection gone meanwhile: its session keeps the
                    // subscriptions, as after an answer it did not read.
                    let _ = reply.complete(c);
                }));
                Call::Later(pending)
            }
            later => later,
        }
    }

    fn unsubscribe(
        &self,
        req: UnsubscribeRequest,
        reply_to: &Arc<ConnWaker>,
        now: Instant,
    ) -> Call {
        let cell = req.cell.clone();
        let c = Engine::unsubscribe(&*self.broker, req, reply_to, now);
        self.link.save_session(&cell, false);
        c
    }

    fn detach(
        &self,
        cell: &Arc<SessionCell>,
        epoch: u64,
        publish_will: bool,
        expiry_override: Option<u32>,
        now: Instant,
    ) {
        Engine::detach(
            &*self.broker,
            cell,
            epoch,
            publish_will,
            expiry_override,
            now,
        );
        if self.broker.has_session(&cell.client_id) {
            // Kept, disconnected: its expiry may have changed.
            self.link.save_session(cell, true);
            self.link.detached_now(&cell.client_id);
        }
        self.link.released(&cell.client_id, epoch);
    }

    fn publish(
        &self,
        msg: Arc<Message>,
        publisher: Option<&Arc<ConnWaker>>,
        now: Instant,
    ) -> Routed {
        if msg.qos != millet_codec::QoS::AtMostOnce && !self.link.is_up() {
            // NATS unreachable: the other nodes cannot be reached, so a
            // QoS 1/2 message is refused whole (not routed here either),
            // rather than acknowledged and lost for them.
            self.link.log_refusal();
            return Routed {
                ticket: NATS_DOWN,
                ..Routed::default()
            };
        }
        Broker::publish(&self.broker, msg, publisher, now)
    }

    fn ticket_status(&self, ticket: Ticket) -> AckStatus {
        self.link.ticket_status(ticket, &self.broker)
    }

    fn ticket_wait(&self, ticket: Ticket, waker: &Arc<ConnWaker>) {
        if ticket == NATS_DOWN || is_cluster_ticket(ticket) {
            self.link.ticket_wait(ticket, waker);
        } else {
            Broker::ticket_wait(&self.broker, ticket, waker)
        }
    }

    fn join_tickets(&self, a: Ticket, b: Ticket) -> Ticket {
        ClusterLink::join_tickets(&*self.link, a, b)
    }

    fn last_ticket(&self) -> Ticket {
        Broker::last_ticket(&self.broker)
    }

    fn session_writes<'a>(
        &'a self,
        client_id: &'a ByteString,
        session: &Session,
    ) -> SessionWrites<'a> {
        Broker::session_writes(&self.broker, client_id, session)
    }

    fn qos2_arrived(
        &self,
        cell: &SessionCell,
        packet_id: u16,
        receive_maximum: usize,
    ) -> Qos2Arrival {
        match Engine::qos2_arrived(&*self.broker, cell, packet_id, receive_maximum) {
            Qos2Arrival::New(t) => {
                // Also in KV, for the node a dead one's client resumes on.
                let kv = self.link.save_qos2(cell, true);
                Qos2Arrival::New(self.join_tickets(t, kv))
            }
            other => other,
        }
    }

    fn acknowledge(&self, cell: &SessionCell, ack: SessionAck) -> Acknowledged {
        let persistent = || cell.state.lock().session.expiry_interval != 0;
        let a = Engine::acknowledge(&*self.broker, cell, ack);
        if !a.known {
            return a;
        }
        // Recorded for the node that rebuilds the session if this one dies.
        // What waits for the write: the PUBCOMP to a PUBREL (the publisher
        // may reuse the id once it has it), the PUBREL to a PUBREC (the
        // client forgets the message's id).
        let kv = match ack {
            SessionAck::PubAck(_) => return a,
            SessionAck::PubRel(_) => self.link.save_qos2(cell, true),
            _ if !persistent() => return a,
            SessionAck::PubRec {
                packet_id,
                refused: false,
            } => self.link.save_qos2_out(
                &cell.client_id,
                vec![Qos2Event::Released { pid: packet_id }],
                true,
            ),
            SessionAck::PubRec { packet_id, .. } => self.link.save_qos2_out(
                &cell.client_id,
                vec![Qos2Event::Done { pid: packet_id }],
                false,
            ),
            // Not recorded: the id's next `Sent` says the message is done;
            // one whose PUBCOMP came last is resent as a PUBREL only.
            SessionAck::PubComp(_) => return a,
        };
        Acknowledged {
            ticket: self.join_tickets(a.ticket, kv),
            ..a
        }
    }

    fn qos2_sent(&self, client_id: &ByteString, sent: &[(u16, Arc<Message>)]) -> Ticket {
        let events = sent
            .iter()
            .map(|(pid, m)| Qos2Event::Sent {
                pid: *pid,
                digest: qos2_digest(m),
            })
            .collect();
        self.link.save_qos2_out(client_id, events, true)
    }

    fn holds_qos2(&self, session: &Session) -> bool {
        session.expiry_interval != 0
    }

    fn qos2_awaiting(&self, cell: &SessionCell, packet_id: u16) -> bool {
        Engine::qos2_awaiting(&*self.broker, cell, packet_id)
    }

    fn handle_timeout(&self, now: Instant) {
        Broker::handle_timeout(&self.broker, now);
    }

    fn assign_client_id(&self) -> ByteString {
        Broker::assign_client_id(&self.broker)
    }

    fn admit_session(&self, client_id: &str) -> Result<(), SessionRefusal> {
        if !self.link.reachable() {
            return Err(SessionRefusal::ClusterUnavailable);
        }
        Broker::admit_session(&self.broker, client_id)
    }

    fn retained_admits(&self, topic: &str, bytes: u64) -> bool {
        Broker::retained_admits(&self.broker, topic, bytes)
    }

    fn replay_retained(&self, cell: &Arc<SessionCell>, replay: &DeferredReplay, now: Instant) {
        // The link's ([`ClusterLink::replay_retained`]).
        Broker::replay_retained(&self.broker, cell, replay, now);
    }

    fn acks_early(&self) -> bool {
        Broker::acks_early(&self.broker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_servers_are_refused() {
        assert!(check_version("2.14.6").is_ok());
        assert!(check_version("v2.11.0-beta").is_ok());
        assert!(check_version("3.0.0").is_ok());
        assert!(check_version("2.10.22").is_err());
        assert!(check_version("2.9").is_err());
        assert!(check_version("").is_err());
    }

    /// A dead node's outgoing QoS 2 events replay into what was in flight
    /// (a reused packet id is the new message's) and what was done.
    #[test]
    fn outgoing_qos2_events_replay_into_the_window_and_what_was_done() {
        use Qos2Event::*;
        let events = [
            Sent { pid: 1, digest: 10 },
            Sent { pid: 2, digest: 20 },
            Released { pid: 1 },
            Done { pid: 1 },
            Sent { pid: 1, digest: 11 }, // id 1 again: a new message
            Sent { pid: 3, digest: 30 },
            Released { pid: 2 },
            Done { pid: 3 }, // an error PUBREC: done too
            Done { pid: 9 }, // unknown: nothing
            Sent { pid: 4, digest: 40 },
            Released { pid: 4 },
            Sent { pid: 4, digest: 41 }, // its PUBCOMP, not recorded, came before
        ];
        let bytes = postcard::to_allocvec(&events.to_vec()).expect("encodes");
        let decoded: Vec<Qos2Event> = postcard::from_bytes(&bytes).expect("decodes");
        let r = replay_qos2(decoded);
        assert_eq!(
            r.inflight,
            vec![(2, true, 20), (1, false, 11), (4, false, 41)]
        );
        assert_eq!(r.completed, vec![10, 30, 40]);
        assert_eq!(decode_qos2(&encode_qos2(&[1, 65_535])), vec![1, 65_535]);
    }

    #[test]
    fn queue_groups_are_plain_tokens_and_tell_subscriptions_apart() {
        let a = queue_group("g", "a/b");
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_ne!(a, queue_group("g/a", "b"));
        assert_eq!(a, queue_group("g", "a/b"));
    }
}
