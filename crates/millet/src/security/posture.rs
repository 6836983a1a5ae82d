//! The security posture: what each listener lets in when no provider
//! decides, and what the operator is told about it at start-up. Owns the
//! posture rule ([`ListenerPolicy::for_listener`]) and the start-up report
//! ([`posture_report`], [`log_posture`]); no state of its own.
//!
//! Without configuration Millet listens on loopback only and lets anonymous
//! clients in there. A listener on any other address requires
//! authentication unless listed in `security.auth.anonymous_listeners`;
//! once any provider (or SCRAM) is configured, every listener not listed
//! there requires it. See [`ListenerPolicy::for_listener`] and
//! [`posture_report`].
//!
//! Settings Millet would not enforce are refused at start-up where they are
//! checked: the chain by [`super::effective_chain`], the rest (and the
//! warning about a JWT `bind = "none"`) by [`super::Security::from_config`].

use std::net::SocketAddr;

/// What happens at the end of the chain on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerPolicy {
    /// Clients no provider decided on are let in.
    Anonymous,
    /// Clients no provider accepted are refused.
    Authenticated,
}

impl ListenerPolicy {
    /// The posture rule: explicitly anonymous listeners are anonymous; a
    /// loopback listener is anonymous while no provider is configured;
    /// anything else requires authentication.
    pub fn for_listener(
        addr: SocketAddr,
        marked_anonymous: bool,
        providers_configured: bool,
    ) -> ListenerPolicy {
        if marked_anonymous || (!providers_configured && addr.ip().is_loopback()) {
            ListenerPolicy::Anonymous
        } else {
            ListenerPolicy::Authenticated
        }
    }
}

/// Start-up log lines describing each listener's posture: `(is_warning, line)`.
pub fn posture_report(
    listeners: &[(SocketAddr, bool)],
    providers: &[&'static str],
) -> Vec<(bool, String)> {
    listeners
        .iter()
        .map(|&(addr, marked)| {
            match ListenerPolicy::for_listener(addr, marked, !providers.is_empty()) {
                ListenerPolicy::Anonymous if marked => (
                    !addr.ip().is_loopback(),
                    format!("listener {addr}: anonymous clients allowed (explicitly marked anonymous)"),
                ),
                ListenerPolicy::Anonymous => (
                    false,
                    format!("listener {addr}: anonymous clients allowed (loopback, no authentication configured)"),
                ),
                ListenerPolicy::Authenticated if providers.is_empty() => (
                    true,
                    format!("listener {addr}: authentication required but no provider is configured: every client will be refused (configure a provider under [security.auth], or list the listener in security.auth.anonymous_listeners)"),
                ),
                ListenerPolicy::Authenticated => (
                    false,
                    format!("listener {addr}: authentication required (chain: {})", providers.join(", ")),
                ),
            }
        })
        .collect()
}

/// Log [`posture_report`] at info / warn.
pub fn log_posture(listeners: &[(SocketAddr, bool)], providers: &[&'static str]) {
    for (warn, line) in posture_report(listeners, providers) {
        if warn {
            tracing::warn!("{line}");
        } else {
            tracing::info!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posture() {
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        let v6lo: SocketAddr = "[::1]:1883".parse().unwrap();
        use ListenerPolicy::*;
        assert_eq!(ListenerPolicy::for_listener(lo, false, false), Anonymous);
        assert_eq!(ListenerPolicy::for_listener(v6lo, false, false), Anonymous);
        assert_eq!(ListenerPolicy::for_listener(lo, false, true), Authenticated);
        assert_eq!(
            ListenerPolicy::for_listener(any, false, false),
            Authenticated
        );
        assert_eq!(ListenerPolicy::for_listener(any, true, true), Anonymous);
        let r = posture_report(&[(lo, false), (any, false)], &[]);
        assert!(!r[0].0 && r[0].1.contains("anonymous"));
        assert!(r[1].0 && r[1].1.contains("every client will be refused"));
        let r = posture_report(&[(any, false)], &["jwt"]);
        assert!(!r[0].0 && r[0].1.contains("chain: jwt"));
    }
}
