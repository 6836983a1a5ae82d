//! MQTT topics and filters as NATS subjects, reversibly (docs/CLUSTER.md,
//! "Subjects"): the naming the NATS JetStream engine (issue 13) routes and
//! stores by. Pure functions, no NATS client.
//!
//! An MQTT topic level becomes one NATS token:
//! - bytes outside `[A-Za-z0-9_-]` (`.`, `*`, `>`, `$`, `%`, space, every
//!   byte of a non-ASCII character's UTF-8 form...) become `%XX` (upper-case
//!   hex), so no level can be a NATS separator or wildcard;
//! - an empty level becomes `%` alone (a NATS token may not be empty; `%` is
//!   otherwise always followed by two hex digits, so this is unambiguous).
//!
//! In a filter, `+` becomes `*` and `#` becomes `>`. MQTT's `a/#` also
//! matches `a` itself, so it maps to two NATS filters, `a` and `a.>`.
//! A `$` topic's first level is escaped like any other (`$SYS` is
//! `%24SYS`), which NATS wildcards do match: MQTT's rule that a filter
//! starting with a wildcard does not match `$` topics [MQTT-4.7.2-1] is
//! applied again by the node's own matching, as for local subscribers.

use std::fmt::Write as _;

/// Whether `b` stands for itself in a token.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Append the token for one MQTT level to `out`.
fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('%');
        return;
    }
    for &b in level.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// `prefix` followed by the tokens of `topic` (a topic name: no wildcards
/// are given a meaning, `+` and `#` are escaped like any other byte).
/// `prefix` is used as is (e.g. `m.1`), and may be empty.
pub fn topic_to_subject(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + topic.len() * 3 / 2);
    out.push_str(prefix);
    for level in topic.split('/') {
        if !out.is_empty() {
            out.push('.');
        }
        push_level(&mut out, level);
    }
    out
}

/// Why a subject is not one [`topic_to_subject`] makes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("the subject does not start with the expected prefix")]
    Prefix,
    #[error("token {0:?}: '%' must be alone or followed by two hex digits")]
    Escape(String),
    #[error("token {0:?}: a byte that is never left unescaped")]
    Unescaped(String),
    #[error("the topic is not UTF-8")]
    Utf8,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The MQTT topic of a subject made by [`topic_to_subject`] with `prefix`.
/// Strict: anything that function would not have written is refused.
pub fn subject_to_topic(prefix: &str, subject: &str) -> Result<String, SubjectError> {
    let rest = if prefix.is_empty() {
        subject
    } else {
        subject
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or(SubjectError::Prefix)?
    };
    let mut bytes = Vec::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            bytes.push(b'/');
        }
        if token == "%" {
            continue; // an empty level
        }
        let t = token.as_bytes();
        let mut j = 0;
        while let Some(&b) = t.get(j) {
            if b == b'%' {
                let (Some(h), Some(l)) = (
                    t.get(j + 1).copied().and_then(hex),
                    t.get(j + 2).copied().and_then(hex),
                ) else {
                    return Err(SubjectError::Escape(token.to_owned()));
                };
                bytes.push(h << 4 | l);
                j += 3;
            } else if plain(b) {
                bytes.push(b);
                j += 1;
            } else {
                return Err(SubjectError::Unescaped(token.to_owned()));
            }
        }
        if t.is_empty() {
            return Err(SubjectError::Escape(String::new()));
        }
    }
    String::from_utf8(bytes).map_err(|_| SubjectError::Utf8)
}

/// The NATS filters (one, or two for a trailing `#`) that together match
/// exactly the subjects of the topics `filter` matches, `$` topics aside
/// (see the module documentation). `filter` must be a valid MQTT filter
/// (not a shared one: `$share/{group}/` is taken off before).
pub fn filter_to_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let mut out = String::with_capacity(prefix.len() + 1 + filter.len() * 3 / 2);
    out.push_str(prefix);
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if i == last && *level == "#" {
            // `a/#` matches `a` and everything below it; `#` alone matches
            // every topic (all have at least one level).
            if i == 0 {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('>');
                return vec![out];
            }
            let parent = out.clone();
            out.push_str(".>");
            return vec![parent, out];
        }
        if !out.is_empty() {
            out.push('.');
        }
        if *level == "+" {
            out.push('*');
        } else {
            push_level(&mut out, level);
        }
    }
    vec![out]
}

/// Whether every subject NATS matches with `specific` is matched by
/// `general` too (`*` one token, `>` the rest).
pub fn covers(general: &str, specific: &str) -> bool {
    let (mut g, mut s) = (general.split('.'), specific.split('.'));
    loop {
        match (g.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millet_codec::topic::topic_matches;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn levels_are_escaped_into_single_tokens() {
        assert_eq!(
            topic_to_subject("m.1", "devices/42/cmd"),
            "m.1.devices.42.cmd"
        );
        assert_eq!(topic_to_subject("", "a.b/*/>"), "a%2Eb.%2A.%3E");
        assert_eq!(topic_to_subject("r", "/x//"), "r.%.x.%.%");
        assert_eq!(topic_to_subject("m.0", "$SYS/uptime"), "m.0.%24SYS.uptime");
        assert_eq!(topic_to_subject("", "100%/é"), "100%25.%C3%A9");
        assert_eq!(topic_to_subject("", "a b+#"), "a%20b%2B%23");
    }

    #[test]
    fn subjects_decode_strictly() {
        assert_eq!(subject_to_topic("m.1", "m.1.%.x.%"), Ok("/x/".into()));
        assert_eq!(subject_to_topic("m.1", "m.2.x"), Err(SubjectError::Prefix));
        assert!(matches!(
            subject_to_topic("", "a%2"),
            Err(SubjectError::Escape(_))
        ));
        assert!(matches!(
            subject_to_topic("", "a%zz"),
            Err(SubjectError::Escape(_))
        ));
        assert!(matches!(
            subject_to_topic("", "a%2e"),
            Err(SubjectError::Escape(_))
        ));
        assert!(matches!(
            subject_to_topic("", "a*"),
            Err(SubjectError::Unescaped(_))
        ));
        assert!(matches!(
            subject_to_topic("", "a..b"),
            Err(SubjectError::Escape(_))
        ));
        assert_eq!(subject_to_topic("", "%FF"), Err(SubjectError::Utf8));
    }

    #[test]
    fn filters_map_wildcards() {
        assert_eq!(
            filter_to_subjects("m.*", "devices/+/cmd"),
            ["m.*.devices.*.cmd"]
        );
        assert_eq!(filter_to_subjects("m.*", "#"), ["m.*.>"]);
        assert_eq!(filter_to_subjects("m.*", "a/#"), ["m.*.a", "m.*.a.>"]);
        assert_eq!(filter_to_subjects("", "+/#"), ["*", "*.>"]);
        assert_eq!(filter_to_subjects("", "a.b/+"), ["a%2Eb.*"]);
    }

    /// NATS subject matching (tokens; `*` one token, `>` one or more, last).
    fn nats_matches(filter: &str, subject: &str) -> bool {
        let f: Vec<&str> = filter.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        for (i, ft) in f.iter().enumerate() {
            if *ft == ">" {
                return s.len() > i;
            }
            match s.get(i) {
                Some(st) if *ft == "*" || ft == st => {}
                _ => return false,
            }
        }
        f.len() == s.len()
    }

    fn random_level(rng: &mut rand::rngs::StdRng) -> String {
        const ALPHABET: &[&str] = &[
            "a", "b", "", ".", "*", ">", "%", "$", "é", " ", "x.y", "%41",
        ];
        let n = rng.random_range(0..3);
        (0..n)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
            .collect()
    }

    /// Every topic round-trips, and a filter's subjects match a topic's
    /// subject exactly when the MQTT filter matches the topic (for topics
    /// not starting with `$`, whose rule the node applies itself).
    #[test]
    fn round_trip_and_matching_agree_with_mqtt() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for _ in 0..20_000 {
            let topic: Vec<String> = (0..rng.random_range(1..5))
                .map(|_| random_level(&mut rng))
                .collect();
            let topic = topic.join("/");
            let subject = topic_to_subject("m.1", &topic);
            assert_eq!(subject_to_topic("m.1", &subject).as_deref(), Ok(&*topic));
            assert!(!subject.split('.').any(str::is_empty), "{subject}");
            // A filter built from the topic with some levels made wildcards.
            let levels: Vec<&str> = topic.split('/').collect();
            let mut filter: Vec<String> = Vec::new();
            for (i, l) in levels.iter().enumerate() {
                match rng.random_range(0..6) {
                    0 => filter.push("+".into()),
                    1 => {
                        filter.push("#".into());
                        break;
                    }
                    2 if i + 1 == levels.len() => filter.push("other".into()),
                    _ => filter.push((*l).to_string()),
                }
            }
            if rng.random_range(0..4) == 0 {
                filter.push("#".into());
            }
            // `#` only last.
            if let Some(p) = filter.iter().position(|l| l == "#") {
                filter.truncate(p + 1);
            }
            let filter = filter.join("/");
            if topic.starts_with('$') {
                continue;
            }
            let mqtt = topic_matches(&filter, &topic);
            let nats = filter_to_subjects("m.*", &filter)
                .iter()
                .any(|f| nats_matches(f, &subject));
            assert_eq!(
                mqtt, nats,
                "filter {filter:?} topic {topic:?} subject {subject}"
            );
        }
    }

    #[test]
    fn a_subject_covers_those_it_matches() {
        assert!(covers("m.1.a.>", "m.1.a.b"));
        assert!(covers("m.1.a.>", "m.1.a.*.c"));
        assert!(covers("m.1.a.>", "m.1.a.>"));
        assert!(covers("m.1.*.b", "m.1.a.b"));
        assert!(covers("m.1.*.b", "m.1.*.b"));
        assert!(!covers("m.1.*.b", "m.1.>"));
        assert!(!covers("m.1.*", "m.1.>"));
        assert!(!covers("m.1.a.b", "m.1.*.b"));
        assert!(!covers("m.1.a", "m.1.a.b"));
        assert!(!covers("m.1.a.b", "m.1.a"));
        assert!(!covers("m.2.a", "m.1.a"));
        // Overlapping, neither covering the other.
        assert!(!covers("m.1.a.*", "m.1.*.b") && !covers("m.1.*.b", "m.1.a.*"));
    }
}
