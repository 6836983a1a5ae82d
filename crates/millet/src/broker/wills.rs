//! Wills: publishing a will message, and the wills waiting for their
//! delay (`delayed_wills`). Which will goes out when is decided on attach
//! and detach ([`Broker::connect`], [`Broker::disconnect`] in
//! `registry.rs`); the ticker publishes the delayed ones that are due.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;

use super::Broker;
use crate::session::{Message, SessionId, Will, WillParts};

/// A will waiting for its delay.
pub(super) struct DelayedWill {
    pub(super) at: Instant,
    pub(super) will: Will,
}

impl Broker {
    /// Remove the delayed will of `session`, if any.
    pub(super) fn take_delayed_will(&self, session: SessionId) -> Option<Will> {
        let mut dw = self.delayed_wills.lock();
        let i = dw.iter().position(|d| d.will.session == session)?;
        Some(dw.swap_remove(i).will)
    }

    pub(super) fn publish_will(&self, w: Will, now: Instant) {
        let WillParts {
            will,
            client_id: will_client_id,
            session: will_session,
        } = *w.into_parts();
        let mut properties = millet_codec::PublishProperties {
            payload_format_indicator: will.properties.payload_format_indicator,
            message_expiry_interval: will.properties.message_expiry_interval,
            response_topic: will.properties.response_topic,
            correlation_data: will.properties.correlation_data,
            user_properties: will.properties.user_properties,
            content_type: will.properties.content_type,
            ..Default::default()
        };
        let expires_at = properties
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(u64::from(s)));
        properties.topic_alias = None;
        let msg = Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties,
            expires_at,
            publisher: Some(will_session),
            publisher_client_id: will_client_id,
            engine_id: Default::default(),
            routed_at: None,
        };
        tracing::debug!(topic = %msg.topic, "publishing will");
        self.publish(Arc::new(msg), None, now);
    }

    /// Publish the will of a connection another node of the cluster had,
    /// that node being dead ([`crate::engine::nats`]): routed here and
    /// forwarded to the other nodes like any will.
    pub fn publish_orphan_will(
        &self,
        will: millet_codec::LastWill,
        client_id: ByteString,
        now: Instant,
    ) {
        // Session id 0 is no session of this node (ids start at 1).
        self.publish_will(Will::new(will, client_id, 0), now);
    }

    /// Publish the delayed wills that are due (part of [`Broker::handle_timeout`]).
    pub(super) fn publish_due_wills(&self, now: Instant) {
        let due: Vec<Will> = {
            let mut dw = self.delayed_wills.lock();
            let mut due = Vec::new();
            dw.retain(|d| {
                if d.at <= now {
                    due.push(d.will.clone());
                    false
                } else {
                    true
                }
            });
            due
        };
        for w in due {
            self.publish_will(w, now);
        }
    }
}
