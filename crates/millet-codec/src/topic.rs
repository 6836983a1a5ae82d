//! Topic name and topic filter validation (MQTT 5 section 4.7, 3.1.1 section
//! 4.7), matching of one filter against one topic name, and
//! `$share/{group}/{filter}` parsing (MQTT 5 section 4.8.2).
//!
//! This module is the one definition of these rules: the broker's ACL builds
//! on it, and the broker's subscription trie (which matches many filters at
//! once) is tested against [`topic_matches`].
//!
//! The decoder only checks that topic filters are well-formed UTF-8; the broker
//! validates them with [`valid_topic_filter`] / [`parse_shared`] so that it can
//! answer an invalid filter with a per-filter reason code.

/// Longest topic name or filter: it is a UTF-8 string with a 16-bit length.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// What starts a shared subscription filter `$share/{group}/{filter}`.
pub const SHARE_PREFIX: &str = "$share/";

/// A topic name a PUBLISH (or a will) may carry: non-empty, no wildcard
/// characters [MQTT-3.3.2-2], no U+0000 [MQTT-4.7.3-2], at most 65,535 bytes
/// [MQTT-4.7.3-3]. (The empty topic name of an MQTT 5 PUBLISH that uses a topic
/// alias is handled by the decoder, not here.)
pub fn valid_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOPIC_LEN
        && !s.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
}

/// The number of levels of a topic name or filter (`a/b` has 2, `a/` has 2,
/// `a` has 1): one more than its `/` separators. Counted over the bytes
/// (`/` never occurs inside a multi-byte UTF-8 character), which the
/// compiler vectorises; `str::split` searches character by character.
pub fn topic_levels(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'/').count() + 1
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

/// [MQTT-4.7.2-1]: a filter whose first level is a wildcard (`#`, `+`, ...)
/// matches no topic starting with `$`. `topic` may itself be a filter (the
/// ACL asks whether one filter covers another).
pub fn dollar_excluded(filter: &str, topic: &str) -> bool {
    is_sys_topic(topic) && (filter.starts_with('+') || filter.starts_with('#'))
}

/// Does topic filter `filter` match topic name `topic` (MQTT 5 section 4.7)?
///
/// Levels are compared one by one: `+` matches any one level (an empty one
/// too), `#` matches the rest, including nothing (`a/#` matches `a`), and any
/// other level matches itself only. A filter starting with a wildcard does not
/// match a `$` topic [MQTT-4.7.2-1]. Both arguments are expected to be valid
/// (see [`valid_topic_filter`] / [`valid_topic_name`]); for an invalid filter
/// the answer is just that of the same level-by-level comparison.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if dollar_excluded(filter, topic) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_counted_as_split_counts_them() {
        for t in ["a", "a/b", "a/", "/", "//", "", "é/ü/€/𝄞", "$SYS/broker/x"] {
            assert_eq!(topic_levels(t), t.split('/').count(), "{t:?}");
        }
    }

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

    /// Tricky cases (MQTT 5 section 4.7). The ACL's former private matcher
    /// and the topic-tree tests' reference matcher agreed on all of them.
    #[test]
    fn matching_mqtt_4_7() {
        let table: &[(&str, &str, bool)] = &[
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a", "a/b", false),
            ("a/b", "a", false),
            // '#' alone, and matching the parent level [MQTT-4.7.1-1].
            ("#", "a", true),
            ("#", "x/y", true),
            ("#", "/", true),
            ("a/#", "a", true),
            ("a/#", "a/", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            // '+' is one whole level, possibly empty.
            ("a/+", "a/b", true),
            ("a/+", "a/", true),
            ("a/+", "a", false),
            ("a/+", "a/b/c", false),
            ("+", "a", true),
            ("+", "/a", false),
            ("+/+", "/x", true),
            ("+/+", "/", true),
            ("+/+", "a", false),
            // Empty levels and trailing '/'.
            ("a//b", "a//b", true),
            ("a//b", "a/b", false),
            ("a/+/b", "a//b", true),
            ("a/", "a", false),
            ("a", "a/", false),
            ("/", "/", true),
            ("//", "//", true),
            // [MQTT-4.7.2-1] '$' topics and first-level wildcards.
            ("#", "$SYS/x", false),
            ("#", "$SYS", false),
            ("+/x", "$SYS/x", false),
            ("+", "$", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/#", "$SYS", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/#", "a/$SYS", true),
            ("+/$x", "a/$x", true),
            // Invalid filters compare level by level, as literals.
            ("a/b#", "a/b#", true),
            ("a/b#", "a/b", false),
            ("a+", "a+", true),
            ("a+", "ab", false),
            // Unicode is compared as is; case matters.
            ("é/+", "é/x", true),
            ("e/+", "é/x", false),
            ("A", "a", false),
        ];
        for &(f, t, want) in table {
            assert_eq!(topic_matches(f, t), want, "{f:?} {t:?}");
        }
        // The one place filters and names agree on NUL: neither may hold it.
        for bad in ["a\0", "\0", "+/\0"] {
            assert!(!valid_topic_filter(bad), "{bad:?}");
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn dollar_exclusion() {
        assert!(dollar_excluded("#", "$SYS/x"));
        assert!(dollar_excluded("+/#", "$SYS/#"));
        assert!(!dollar_excluded("$SYS/#", "$SYS/x"));
        assert!(!dollar_excluded("#", "a/$SYS"));
    }

    #[test]
    fn sys_topics() {
        assert!(is_sys_topic("$SYS/broker/uptime"));
        assert!(is_sys_topic("$share/g/a"));
        assert!(!is_sys_topic("a/$SYS"));
        assert!(!is_sys_topic(""));
    }
}
