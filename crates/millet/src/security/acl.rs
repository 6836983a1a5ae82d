//! Authorization: ACL rules per user, client id and topic filter.
//!
//! # Rule file (TOML)
//! ```toml
//! [[rules]]
//! permission = "allow"          # allow | deny
//! action = "publish"            # publish | subscribe | all
//! username = "alice"            # optional: the rule applies to this user only
//! client_id = "sensor-1"        # optional: ... and/or this client id only
//! topics = ["devices/%c/#", "users/%u/+"]
//! ```
//!
//! # Semantics
//! - Rules are tried in order; the first rule whose user / client id / action
//!   and one of whose topic filters match decides (first match wins).
//! - Per-client extra rules (from a JWT's claims or the HTTP hook's answer)
//!   are consulted before the file's rules.
//! - No match: **deny** when a rule file is configured (even an empty one,
//!   as in Mosquitto) or any per-client rule exists; **allow** only when
//!   there is no ACL at all (no file, no per-client rules).
//! - `%c` is replaced by the client id, `%u` by the username. A filter whose
//!   placeholder cannot be filled (no username), or whose value contains `+`,
//!   `#` or `/` (which would widen or shift the filter), matches nothing.
//! - Rule filters must be valid MQTT topic filters
//!   ([`millet_codec::topic::valid_topic_filter`]; placeholders are checked
//!   before substitution).
//! - PUBLISH: the rule filter must match the topic name
//!   ([`millet_codec::topic::topic_matches`]: a filter starting with a
//!   wildcard does not match `$`-topics).
//! - SUBSCRIBE: the rule filter must *cover* the requested filter: every topic
//!   the subscription can match must be matched by the rule filter (`a/#`
//!   covers `a/+`, `a/+` does not cover `a/#`). A shared subscription
//!   `$share/{group}/{filter}` is checked as `{filter}`.
//!
//! Rules are held behind `arc-swap`: checks are lock-free, [`Acl::reload`]
//! swaps in a new rule set atomically and keeps the old one on error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use millet_codec::topic::{dollar_excluded, topic_matches, valid_topic_filter, SHARE_PREFIX};
use serde::{Deserialize, Serialize};

use super::reload::ReloadableFile;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Allow,
    Deny,
}

/// Which operations a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Publish,
    Subscribe,
    All,
}

/// The operation being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Publish,
    Subscribe,
}

/// One ACL rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub permission: Permission,
    pub action: Action,
    /// Applies only to this username (`None`: any client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Applies only to this client id (`None`: any client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Topic filters, with `%c` / `%u` placeholders.
    pub topics: Vec<String>,
}

impl Rule {
    /// An allow rule for `action` on `topics`, for any client (used for
    /// per-client rules, which only ever apply to their own client).
    pub fn allow(action: Action, topics: Vec<String>) -> Rule {
        Rule {
            permission: Permission::Allow,
            action,
            username: None,
            client_id: None,
            topics,
        }
    }

    /// A deny rule for `action` on `topics`, for any client.
    pub fn deny(action: Action, topics: Vec<String>) -> Rule {
        Rule {
            permission: Permission::Deny,
            ..Rule::allow(action, topics)
        }
    }

    /// Check the rule's topic filters are well-formed.
    pub fn validate(&self) -> Result<(), AclError> {
        if self.topics.is_empty() {
            return Err(AclError::Invalid("rule without topics".into()));
        }
        for t in &self.topics {
            if !valid_topic_filter(t) {
                return Err(AclError::Invalid(format!("invalid topic filter {t:?}")));
            }
        }
        Ok(())
    }

    fn applies_to(&self, client_id: &str, username: Option<&str>, access: Access) -> bool {
        let action_ok = matches!(
            (self.action, access),
            (Action::All, _)
                | (Action::Publish, Access::Publish)
                | (Action::Subscribe, Access::Subscribe)
        );
        action_ok
            && self.client_id.as_deref().is_none_or(|c| c == client_id)
            && self.username.as_deref().is_none_or(|u| Some(u) == username)
    }

    /// Does this rule match the request? (`None`: it does not apply.)
    fn decide(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
    ) -> Option<Permission> {
        if !self.applies_to(client_id, username, access) {
            return None;
        }
        for f in &self.topics {
            let Some(f) = expand(f, client_id, username) else {
                continue;
            };
            let hit = match access {
                Access::Publish => topic_matches(&f, topic),
                Access::Subscribe => filter_covers(&f, topic),
            };
            if hit {
                return Some(self.permission);
            }
        }
        None
    }
}

/// ACL errors.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read ACL file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid ACL file: {0}")]
    Parse(String),
    #[error("invalid ACL rule: {0}")]
    Invalid(String),
    /// A parse or rule error in a named file.
    #[error("ACL file {path}: {msg}")]
    InFile { path: PathBuf, msg: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rules: Vec<Rule>,
}

/// Parse a TOML rule file's text (see the module docs) and validate it.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, AclError> {
    let file: RuleFile = toml::from_str(text).map_err(|e| AclError::Parse(e.to_string()))?;
    for r in &file.rules {
        r.validate()?;
    }
    Ok(file.rules)
}

/// Read and parse a rule file.
pub fn load_rules(path: &Path) -> Result<Vec<Rule>, AclError> {
    let text = std::fs::read_to_string(path).map_err(|source| AclError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_rules(&text).map_err(|e| AclError::InFile {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// The broker-wide ACL: rules from a file (or set programmatically),
/// swapped atomically on reload.
#[derive(Debug)]
pub struct Acl {
    rules: ReloadableFile<Vec<Rule>, AclError>,
}

impl Default for Acl {
    fn default() -> Self {
        Acl::new(Vec::new())
    }
}

impl Acl {
    /// An ACL with fixed rules (no file).
    pub fn new(rules: Vec<Rule>) -> Acl {
        Acl {
            rules: ReloadableFile::fixed(rules),
        }
    }

    /// Load rules from `path`; [`Acl::reload`] re-reads it.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Acl, AclError> {
        let path = path.into();
        let rules = ReloadableFile::open(&path, load_rules)?;
        if rules.load().is_empty() {
            tracing::warn!(path = %path.display(), "ACL file has no rules: every publish and subscribe is denied");
        }
        Ok(Acl { rules })
    }

    /// Re-read the rule file. On error the current rules stay in force (and
    /// the error is returned for the caller to log). Returns the number of rules loaded.
    pub fn reload(&self) -> Result<usize, AclError> {
        // On error the caller logs it, once (the error names the file).
        let (Some(rules), Some(path)) = (self.rules.reload()?, self.rules.path()) else {
            return Ok(self.rules.load().len());
        };
        let n = rules.len();
        tracing::debug!(path = %path.display(), rules = n, "ACL reloaded");
        Ok(n)
    }

    /// Replace the rules (validated first).
    pub fn set_rules(&self, rules: Vec<Rule>) -> Result<(), AclError> {
        for r in &rules {
            r.validate()?;
        }
        self.rules.store(rules);
        Ok(())
    }

    /// The rules now in force.
    pub fn rules(&self) -> Arc<Vec<Rule>> {
        self.rules.load_full()
    }

    /// May this client publish to `topic` (a topic name)?
    pub fn check_publish(
        &self,
        client_id: &str,
        username: Option<&str>,
        extra: &[Rule],
        topic: &str,
    ) -> bool {
        self.check(client_id, username, extra, Access::Publish, topic)
    }

    /// May this client subscribe to `filter` (a topic filter, possibly
    /// `$share/{group}/...`)?
    pub fn check_subscribe(
        &self,
        client_id: &str,
        username: Option<&str>,
        extra: &[Rule],
        filter: &str,
    ) -> bool {
        self.check(client_id, username, extra, Access::Subscribe, filter)
    }

    /// The general check: per-client `extra` rules first, then the ACL's.
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        extra: &[Rule],
        access: Access,
        topic: &str,
    ) -> bool {
        let topic = match access {
            Access::Subscribe => strip_share(topic),
            Access::Publish => topic,
        };
        let rules = self.rules.load();
        for r in extra.iter().chain(rules.iter()) {
            if let Some(p) = r.decide(client_id, username, access, topic) {
                return p == Permission::Allow;
            }
        }
        // No rule at all: allowed, unless a rule file is configured (then,
        // as in Mosquitto, what no rule allows is denied, even with an
        // empty file).
        self.rules.path().is_none() && extra.is_empty() && rules.is_empty()
    }
}

/// `$share/{group}/{filter}` → `{filter}`; anything else unchanged. Lenient
/// on purpose (unlike [`millet_codec::topic::parse_shared`]): the ACL is asked
/// before the filter is validated, and `$share/+/a` is checked as `a`.
fn strip_share(filter: &str) -> &str {
    if let Some(rest) = filter.strip_prefix(SHARE_PREFIX) {
        if let Some((_, f)) = rest.split_once('/') {
            return f;
        }
    }
    filter
}

/// Substitute `%c` and `%u`; `None` if a needed value is missing or unsafe.
fn expand(filter: &str, client_id: &str, username: Option<&str>) -> Option<String> {
    if !filter.contains('%') {
        return Some(filter.to_string());
    }
    let safe = |v: &str| !v.is_empty() && !v.contains(['+', '#', '/']);
    let mut out = filter.to_string();
    if out.contains("%c") {
        if !safe(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    if out.contains("%u") {
        let u = username.filter(|u| safe(u))?;
        out = out.replace("%u", u);
    }
    Some(out)
}

/// Does rule filter `rule` cover subscription filter `sub`, i.e. is every
/// topic matched by `sub` also matched by `rule`?
pub fn filter_covers(rule: &str, sub: &str) -> bool {
    if dollar_excluded(rule, sub) {
        return false;
    }
    let mut r = rule.split('/');
    let mut s = sub.split('/');
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) => return true,
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b && b != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_coverage() {
        assert!(filter_covers("a/#", "a/+"));
        assert!(filter_covers("a/#", "a/#"));
        assert!(filter_covers("a/#", "a"));
        assert!(filter_covers("a/#", "a/b/c"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(filter_covers("a/+", "a/+"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/+", "a/b/c"));
        assert!(filter_covers("#", "x/#"));
        assert!(!filter_covers("#", "$SYS/#"));
        assert!(filter_covers("+/b", "x/b"));
        assert!(!filter_covers("+/b", "x/+"));
    }

    fn file() -> &'static str {
        r##"
[[rules]]
permission = "deny"
action = "all"
username = "mallory"
topics = ["#"]

[[rules]]
permission = "allow"
action = "publish"
topics = ["devices/%c/up", "users/%u/#"]

[[rules]]
permission = "allow"
action = "subscribe"
client_id = "dash"
topics = ["devices/#"]

[[rules]]
permission = "deny"
action = "subscribe"
topics = ["devices/secret/#"]

[[rules]]
permission = "allow"
action = "subscribe"
topics = ["devices/+/down"]
"##
    }

    #[test]
    fn first_match_wins_and_default_deny() -> Result<(), AclError> {
        let acl = Acl::new(parse_rules(file())?);
        assert!(acl.check_publish("d1", None, &[], "devices/d1/up"));
        assert!(!acl.check_publish("d1", None, &[], "devices/d2/up"));
        assert!(acl.check_publish("d1", Some("bob"), &[], "users/bob/x/y"));
        assert!(!acl.check_publish("d1", Some("bob"), &[], "users/alice/x"));
        // mallory is denied before the placeholder rule.
        assert!(!acl.check_publish("m1", Some("mallory"), &[], "devices/m1/up"));
        // dash matches the allow before the deny.
        assert!(acl.check_subscribe("dash", None, &[], "devices/secret/x"));
        assert!(acl.check_subscribe("dash", None, &[], "$share/g/devices/#"));
        assert!(!acl.check_subscribe("other", None, &[], "devices/secret/#"));
        assert!(acl.check_subscribe("other", None, &[], "devices/+/down"));
        assert!(acl.check_subscribe("other", None, &[], "devices/x/down"));
        assert!(!acl.check_subscribe("other", None, &[], "devices/#"));
        // publish rules do not grant subscribe and vice versa
        assert!(!acl.check_subscribe("d1", None, &[], "devices/d1/up"));
        assert!(!acl.check_publish("dash", None, &[], "devices/x/y"));
        // default deny
        assert!(!acl.check_publish("d1", None, &[], "elsewhere"));
        Ok(())
    }

    #[test]
    fn empty_acl_allows_and_extra_rules_come_first() {
        let acl = Acl::default();
        assert!(acl.check_publish("c", None, &[], "anything"));
        let extra = vec![Rule::allow(Action::Publish, vec!["own/%c".into()])];
        assert!(acl.check_publish("c", None, &extra, "own/c"));
        // with per-client rules present, no match means deny
        assert!(!acl.check_publish("c", None, &extra, "other"));

        let acl = Acl::new(vec![Rule::deny(Action::All, vec!["#".into()])]);
        assert!(acl.check_publish("c", None, &extra, "own/c"));
        assert!(!acl.check_publish("c", None, &extra, "own/d"));
    }

    #[test]
    fn unsafe_placeholders_never_match() {
        let acl = Acl::new(vec![Rule::allow(
            Action::All,
            vec!["d/%c/#".into(), "u/%u".into()],
        )]);
        assert!(acl.check_publish("x", None, &[], "d/x/1"));
        assert!(!acl.check_publish("+", None, &[], "d/a/1"));
        assert!(!acl.check_publish("#", None, &[], "d/a/1"));
        assert!(!acl.check_publish("a/b", None, &[], "d/a/b/1"));
        assert!(!acl.check_publish("x", None, &[], "u/"));
        assert!(!acl.check_subscribe("x", Some("#"), &[], "u/#"));
        assert!(acl.check_subscribe("x", Some("bob"), &[], "u/bob"));
    }

    #[test]
    fn parse_errors() {
        assert!(
            parse_rules("[[rules]]\npermission = \"maybe\"\naction=\"all\"\ntopics=[\"a\"]")
                .is_err()
        );
        assert!(parse_rules(
            "[[rules]]\npermission = \"allow\"\naction=\"all\"\ntopics=[\"a/#/b\"]"
        )
        .is_err());
        assert!(
            parse_rules("[[rules]]\npermission = \"allow\"\naction=\"all\"\ntopics=[]").is_err()
        );
        assert!(parse_rules(
            "[[rules]]\npermission = \"allow\"\naction=\"all\"\ntopics=[\"a\"]\nbogus=1"
        )
        .is_err());
        // Filters are checked as SUBSCRIBE checks them: no U+0000.
        assert!(parse_rules(
            "[[rules]]\npermission = \"allow\"\naction=\"all\"\ntopics=[\"a\\u0000\"]"
        )
        .is_err());
        assert!(matches!(parse_rules(""), Ok(v) if v.is_empty()));
    }

    #[test]
    fn reload_keeps_old_rules_on_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("acl.toml");
        std::fs::write(
            &path,
            "[[rules]]\npermission=\"allow\"\naction=\"all\"\ntopics=[\"a\"]\n",
        )?;
        let acl = Acl::from_file(&path)?;
        assert!(acl.check_publish("c", None, &[], "a"));
        assert!(!acl.check_publish("c", None, &[], "b"));
        std::fs::write(&path, "this is not toml [[[")?;
        assert!(acl.reload().is_err());
        assert!(acl.check_publish("c", None, &[], "a"));
        std::fs::write(
            &path,
            "[[rules]]\npermission=\"allow\"\naction=\"all\"\ntopics=[\"b\"]\n",
        )?;
        assert_eq!(acl.reload()?, 1);
        assert!(!acl.check_publish("c", None, &[], "a"));
        assert!(acl.check_publish("c", None, &[], "b"));
        Ok(())
    }
}
