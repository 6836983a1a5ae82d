//! Security (stub while building)
pub mod acl;
pub mod passwd;
pub mod quota;
pub mod scram;
pub mod signature;
pub mod tls;

use acl::Rule;

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { acl: Vec<Rule> },
    Deny,
    Ignore,
}

impl Decision {
    pub fn allow() -> Decision {
        Decision::Allow { acl: Vec::new() }
    }
}
