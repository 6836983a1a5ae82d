//! Topic name and topic filter validation (MQTT 5 section 4.7, 3.1.1 section
//! 4.7) and `$share/{group}/{filter}` parsing (MQTT 5 section 4.8.2).
//!
//! The decoder only checks that topic filters are well-formed UTF-8; the broker
//! validates them with [`valid_topic_filter`] / [`parse_shared`] so that it can
//! answer an invalid filter with a per-filter reason code.

/// Longest topic name or filter: it is a UTF-8 string with a 16-bit length.
pub const MAX_TOPIC_LEN: usize = 65_535;

const SHARE_PREFIX: &str = "$share/";

/// A topic name a PUBLISH (or a will) may carry: non-empty, no wildcard
/// characters [MQTT-3.3.2-2], no U+0000 [MQTT-4.7.3-2], at most 65,535 bytes
/// [MQTT-4.7.3-3]. (The empty topic name of an MQTT 5 PUBLISH that uses a topic
/// alias is handled by the decoder, not here.)
pub fn valid_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOPIC_LEN
        && !s.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
}

/// A topic filter a SUBSCRIBE / UNSUBSCRIBE may carry: non-empty
/// [MQTT-4.7.3-1], `#` only alone in the last level [MQTT-4.7.1-1], `+` only
/// alone in its level [MQTT-4.7.1-2], no U+0000 [MQTT-4.7.3-2], at most 65,535
/// bytes. A `$share/` filter is *not* valid here; parse it with [`parse_shared`].
pub fn valid_topic_filter(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_TOPIC_LEN {
        return false;
    }
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        for b in level.bytes() {
            match b {
                0 => return false,
                b'#' if level.len() != 1 || !is_last => return false,
                b'+' if level.len() != 1 => return false,
                _ => {}
            }
        }
    }
    true
}

/// A shared subscription filter `$share/{group}/{filter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedFilter<'a> {
    /// The share name: non-empty, without `/`, `+` or `#` [MQTT-4.8.2-2].
    pub group: &'a str,
    /// The topic filter proper (a valid filter, possibly with wildcards).
    pub filter: &'a str,
}

/// A filter that starts with `$share/` but is not `$share/{group}/{filter}`
/// with a valid share name and filter [MQTT-4.8.2-1], [MQTT-4.8.2-2].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed shared subscription filter")]
pub struct InvalidSharedFilter;

/// Parses a shared subscription filter.
///
/// - `Ok(None)`: not a shared subscription (does not start with `$share/`);
///   validate it with [`valid_topic_filter`].
/// - `Ok(Some(shared))`: a well-formed shared subscription.
/// - `Err(InvalidSharedFilter)`: starts with `$share/` but the share name is
///   empty or contains `+` / `#`, or the filter part is missing or invalid.
pub fn parse_shared(s: &str) -> Result<Option<SharedFilter<'_>>, InvalidSharedFilter> {
    let Some(rest) = s.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return Err(InvalidSharedFilter);
    };
    if group.is_empty()
        || group.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
        || s.len() > MAX_TOPIC_LEN
        || !valid_topic_filter(filter)
    {
        return Err(InvalidSharedFilter);
    }
    Ok(Some(SharedFilter { group, filter }))
}

/// Topics starting with `$` are server-specific (`$SYS/...`): wildcards at the
/// first level do not match them [MQTT-4.7.2-1].
pub fn is_sys_topic(s: &str) -> bool {
    s.starts_with('$')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in [
            "a",
            "a/b",
            "/",
            "//",
            "a/b/",
            "$SYS/x",
            "sport/tennis/player1",
            " ",
        ] {
            assert!(valid_topic_name(ok), "{ok:?}");
        }
        // [MQTT-3.3.2-2] no wildcards in topic names; [MQTT-4.7.3-1] non-empty.
        for bad in ["", "+", "#", "a/+", "a/#", "a+b", "a#", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
        assert!(valid_topic_name(&"a".repeat(65_535)));
        assert!(!valid_topic_name(&"a".repeat(65_536)));
    }

    #[test]
    fn topic_filters_mqtt_4_7_1() {
        for ok in [
            "#",
            "+",
            "a",
            "a/#",
            "a/+",
            "+/+",
            "+/#",
            "/",
            "/#",
            "a/+/b",
            "a//b",
            "+/",
            "/+",
            "sport/tennis/#",
            "$SYS/#",
            "$share",
        ] {
            assert!(valid_topic_filter(ok), "{ok:?}");
        }
        // [MQTT-4.7.1-1] '#' alone and last; [MQTT-4.7.1-2] '+' alone in its level.
        for bad in [
            "", "a#", "#/a", "a/#/b", "a/b#", "##", "a+", "+a", "a/+b/c", "++", "sport+", "a\0",
        ] {
            assert!(!valid_topic_filter(bad), "{bad:?}");
        }
        assert!(!valid_topic_filter(&"a".repeat(65_536)));
    }

    #[test]
    fn shared_filters_mqtt_4_8_2() {
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$share"), Ok(None));
        assert_eq!(parse_shared("$SYS/x"), Ok(None));
        assert_eq!(
            parse_shared("$share/g/a/+/#"),
            Ok(Some(SharedFilter {
                group: "g",
                filter: "a/+/#"
            }))
        );
        assert_eq!(
            parse_shared("$share/consumer1/sport/tennis/+"),
            Ok(Some(SharedFilter {
                group: "consumer1",
                filter: "sport/tennis/+"
            }))
        );
        assert_eq!(
            parse_shared("$share/g/#"),
            Ok(Some(SharedFilter {
                group: "g",
                filter: "#"
            }))
        );
        assert_eq!(
            parse_shared("$share/g//"),
            Ok(Some(SharedFilter {
                group: "g",
                filter: "/"
            }))
        );
        for bad in [
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g/",
            "$share/+/a",
            "$share/#/a",
            "$share/g+/a",
            "$share/g/a#",
            "$share/g/a/#/b",
        ] {
            assert_eq!(parse_shared(bad), Err(InvalidSharedFilter), "{bad:?}");
        }
    }

    #[test]
    fn sys_topics() {
        assert!(is_sys_topic("$SYS/broker/uptime"));
        assert!(is_sys_topic("$share/g/a"));
        assert!(!is_sys_topic("a/$SYS"));
        assert!(!is_sys_topic(""));
    }
}
