//! The embedded engine: [`Broker`] (in-process routing, the redb store behind
//! its write-ahead log) answers every call at once.

use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;
use millet_codec::topic;

use super::{
    AckStatus, AttachRequest, Call, Completion, Engine, SessionWrites, SubscribeRequest, Ticket,
    UnsubscribeRequest,
};
use crate::broker::{Broker, Routed, SessionRefusal, SubscribeOutcome};
use crate::session::{ConnWaker, DeferredReplay, Message, Session, SessionCell};

impl Engine for Broker {
    fn attach(&self, req: AttachRequest, _reply_to: &Arc<ConnWaker>, now: Instant) -> Call {
        let attached = self.connect(
            &req.client_id,
            req.clean_start,
            req.expiry_interval,
            req.will,
            req.waker,
            now,
        );
        Call::Ready(Completion::Attached(attached))
    }

    fn subscribe(&self, req: SubscribeRequest, _reply_to: &Arc<ConnWaker>, now: Instant) -> Call {
        let mut outcomes = Vec::with_capacity(req.filters.len());
        for (filter, sub) in req.filters {
            let options = sub.options;
            let identifier = sub.identifier;
            let shared = sub.share_group.is_some();
            let outcome = self.subscribe(&req.cell, &filter, sub);
            if let SubscribeOutcome::Granted { is_new } = outcome {
                // Retained messages [MQTT-3.3.1-9..11]: never for a shared
                // subscription; Retain Handling 1 only for a new one, 2 never.
                let send_retained = !shared
                    && (options.retain_handling == 0 || (options.retain_handling == 1 && is_new));
                if send_retained {
                    replay(self, &req.cell, &filter, options, identifier, now);
                }
            }
            outcomes.push(outcome);
        }
        Call::Ready(Completion::Subscribed(outcomes))
    }

    fn unsubscribe(
        &self,
        req: UnsubscribeRequest,
        _reply_to: &Arc<ConnWaker>,
        _now: Instant,
    ) -> Call {
        let existed = req
            .filters
            .iter()
            .map(|f| self.unsubscribe(&req.cell, f))
            .collect();
        Call::Ready(Completion::Unsubscribed(existed))
    }

    fn detach(
        &self,
        cell: &Arc<SessionCell>,
        epoch: u64,
        publish_will: bool,
        expiry_override: Option<u32>,
        now: Instant,
    ) {
        self.disconnect(cell, epoch, publish_will, expiry_override, now);
    }

    fn publish(
        &self,
        msg: Arc<Message>,
        publisher: Option<&Arc<ConnWaker>>,
        now: Instant,
    ) -> Routed {
        Broker::publish(self, msg, publisher, now)
    }

    fn ticket_status(&self, ticket: Ticket) -> AckStatus {
        Broker::ticket_status(self, ticket)
    }

    fn ticket_wait(&self, ticket: Ticket, waker: &Arc<ConnWaker>) {
        Broker::ticket_wait(self, ticket, waker)
    }

    fn last_ticket(&self) -> Ticket {
        Broker::last_ticket(self)
    }

    fn session_writes<'a>(
        &'a self,
        client_id: &'a ByteString,
        session: &Session,
    ) -> SessionWrites<'a> {
        Broker::session_writes(self, client_id, session)
    }

    fn assign_client_id(&self) -> ByteString {
        Broker::assign_client_id(self)
    }

    fn handle_timeout(&self, now: Instant) {
        Broker::handle_timeout(self, now);
    }

    fn admit_session(&self, client_id: &str) -> Result<(), SessionRefusal> {
        Broker::admit_session(self, client_id)
    }

    fn retained_admits(&self, topic: &str, bytes: u64) -> bool {
        Broker::retained_admits(self, topic, bytes)
    }

    fn replay_retained(&self, cell: &Arc<SessionCell>, replay: &DeferredReplay, now: Instant) {
        Broker::replay_retained(self, cell, replay, now);
    }

    fn acks_early(&self) -> bool {
        Broker::acks_early(self)
    }
}

/// Queue the retained messages matching a new subscription. A repeat while
/// this filter's replay is still under way is coalesced (O(1) here); the
/// connection starts it once the first one has left the queue.
fn replay(
    broker: &Broker,
    cell: &Arc<SessionCell>,
    filter: &ByteString,
    options: millet_codec::SubscriptionOptions,
    identifier: Option<u32>,
    now: Instant,
) {
    debug_assert!(!matches!(topic::parse_shared(filter), Ok(Some(_))));
    let replay = DeferredReplay {
        filter: ByteString::from(&**filter),
        options,
        identifier,
    };
    let now_due = cell
        .state
        .lock()
        .session
        .replay_started(filter, replay.clone());
    if now_due {
        broker.replay_retained(cell, &replay, now);
        cell.state.lock().session.replay_settled();
    }
}

impl crate::protocol::Shared {
    /// Connections on the embedded engine `broker`, with its own ACL as the
    /// hooks (tests and tools; the server builds its `Shared` from the
    /// configuration).
    pub fn embedded(broker: Arc<Broker>) -> Arc<crate::protocol::Shared> {
        let hooks: Arc<dyn crate::hooks::Hooks> = broker.clone();
        crate::protocol::Shared::with_hooks(broker.node.clone(), broker, hooks)
    }
}
