//! Topic aliases of one connection (MQTT 5 section 3.3.2.3.4), both ways.
//!
//! Outbound ([`OutAliases`]): the server picks aliases for the topics it
//! sends, up to the client's Topic Alias Maximum. Assigning one is O(1):
//! a hash lookup for a topic already aliased, else a fresh alias from a
//! next-free counter or the free list, else (every alias in use) one taken
//! from an existing topic by a CLOCK sweep (second chance, an O(1)-amortized
//! approximation of least recently used): a topic used again since the hand
//! last passed keeps its alias. A taken alias is re-mapped by sending a
//! PUBLISH with both the new topic name and the alias, which the receiver
//! must honour (MQTT 5 section 3.3.2.3.4: "the Receiver ... replaces the
//! mapping"). Aliases are per connection: a new connection starts empty.
//!
//! Inbound ([`InAliases`]): the topics a client maps, copied out of the read
//! buffer they arrived in (a slice would keep the whole read chunk alive for
//! as long as the alias exists).

use std::collections::HashMap;

use bytestring::ByteString;

/// What to put in an outgoing PUBLISH for its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutAlias {
    /// No alias: send the topic name alone.
    None,
    /// The client already maps this alias to the topic: send the alias and
    /// an empty topic name.
    Known(u16),
    /// Newly (re-)mapped: send the topic name and the alias.
    New(u16),
}

#[derive(Debug)]
struct Slot {
    /// `None` while the alias is on the free list.
    topic: Option<ByteString>,
    /// Used since the CLOCK hand last passed.
    referenced: bool,
}

/// The server → client aliases of one connection. Nothing is allocated
/// until the first alias is assigned (most connections never use one, and
/// an idle connection should cost as little as possible).
#[derive(Debug, Default)]
pub struct OutAliases {
    max: u16,
    table: Option<Box<OutTable>>,
}

#[derive(Debug, Default)]
struct OutTable {
    by_topic: HashMap<ByteString, u16>,
    /// Alias `a` is `slots[a - 1]`; grows up to `max` as aliases are first used.
    slots: Vec<Slot>,
    /// Aliases given back by [`OutAliases::forget`].
    free: Vec<u16>,
    /// CLOCK hand: index into `slots`.
    hand: usize,
    /// Slots the hand has passed (the cost of eviction, for the tests).
    #[cfg(test)]
    steps: u64,
}

impl OutAliases {
    /// Aliases up to `max` (the client's Topic Alias Maximum; 0: none).
    pub fn new(max: u16) -> OutAliases {
        OutAliases { max, table: None }
    }

    /// Number of topics currently aliased.
    pub fn len(&self) -> usize {
        self.table.as_ref().map_or(0, |t| t.by_topic.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The alias to use for `topic` in the PUBLISH about to be sent.
    pub fn assign(&mut self, topic: &ByteString) -> OutAlias {
        if self.max == 0 || topic.is_empty() {
            return OutAlias::None;
        }
        let max = self.max;
        let t = self.table.get_or_insert_with(Box::default);
        if let Some(&a) = t.by_topic.get(topic) {
            if let Some(s) = t.slots.get_mut(usize::from(a) - 1) {
                s.referenced = true;
            }
            return OutAlias::Known(a);
        }
        let alias = if let Some(a) = t.free.pop() {
            a
        } else if t.slots.len() < usize::from(max) {
            t.slots.push(Slot {
                topic: None,
                referenced: false,
            });
            t.slots.len() as u16
        } else {
            t.evict()
        };
        // An owned copy: the message's topic may be a slice of a publisher's
        // read buffer, which this map would otherwise keep alive.
        let owned = ByteString::from(&**topic);
        if let Some(s) = t.slots.get_mut(usize::from(alias) - 1) {
            s.topic = Some(owned.clone());
            s.referenced = false;
        }
        t.by_topic.insert(owned, alias);
        OutAlias::New(alias)
    }

    /// The PUBLISH that mapped `alias` to `topic` was never sent (too big
    /// for the client): the mapping is forgotten and the alias freed, so
    /// that its next use sends the topic name with it.
    pub fn forget(&mut self, topic: &str, alias: u16) {
        let Some(t) = self.table.as_mut() else {
            return;
        };
        if t.by_topic.get(topic) != Some(&alias) {
            return;
        }
        t.by_topic.remove(topic);
        if let Some(s) = t.slots.get_mut(usize::from(alias) - 1) {
            s.topic = None;
            s.referenced = false;
            t.free.push(alias);
        }
    }
}

impl OutTable {
    /// Take an alias from a topic (every alias is in use): the first one the
    /// CLOCK hand finds not used since it last passed.
    fn evict(&mut self) -> u16 {
        let n = self.slots.len();
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            #[cfg(test)]
            {
                self.steps += 1;
            }
            let s = &mut self.slots[i];
            if s.referenced {
                s.referenced = false;
                continue;
            }
            if let Some(t) = s.topic.take() {
                self.by_topic.remove(&t);
            }
            return (i + 1) as u16;
        }
    }
}

/// The client → server aliases of one connection (allocated on first use).
#[derive(Debug, Default)]
pub struct InAliases {
    // Boxed on purpose: `None` costs 8 bytes where an empty map costs 48,
    // in every connection.
    #[allow(clippy::box_collection)]
    map: Option<Box<HashMap<u16, ByteString>>>,
}

impl InAliases {
    /// Map `alias` to `topic`, stored as an owned copy (not copied again
    /// when a client re-sends the mapping it already has).
    pub fn set(&mut self, alias: u16, topic: &ByteString) {
        let map = self.map.get_or_insert_with(Box::default);
        if map.get(&alias) != Some(topic) {
            map.insert(alias, ByteString::from(&**topic));
        }
    }

    pub fn get(&self, alias: u16) -> Option<&ByteString> {
        self.map.as_ref()?.get(&alias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> ByteString {
        ByteString::from(s)
    }

    #[test]
    fn assigns_reuses_and_replaces() {
        let mut a = OutAliases::new(3);
        assert_eq!(a.assign(&t("a")), OutAlias::New(1));
        assert_eq!(a.assign(&t("b")), OutAlias::New(2));
        assert_eq!(a.assign(&t("a")), OutAlias::Known(1));
        assert_eq!(a.assign(&t("c")), OutAlias::New(3));
        // Full: "a" was used again, so "b" (alias 2) is taken first.
        assert_eq!(a.assign(&t("d")), OutAlias::New(2));
        assert_eq!(a.assign(&t("b")), OutAlias::New(3), "c: next unreferenced");
        assert_eq!(a.assign(&t("d")), OutAlias::Known(2));
        assert_eq!(a.assign(&t("a")), OutAlias::Known(1));
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn no_alias_without_a_maximum() {
        let mut a = OutAliases::new(0);
        assert_eq!(a.assign(&t("a")), OutAlias::None);
        assert!(a.is_empty());
    }

    #[test]
    fn forgotten_alias_is_reused_with_its_topic() {
        let mut a = OutAliases::new(2);
        assert_eq!(a.assign(&t("a")), OutAlias::New(1));
        assert_eq!(a.assign(&t("b")), OutAlias::New(2));
        a.forget("b", 2);
        a.forget("a", 2); // not a's alias: ignored
        assert_eq!(a.assign(&t("a")), OutAlias::Known(1));
        assert_eq!(a.assign(&t("c")), OutAlias::New(2));
        assert_eq!(
            a.assign(&t("b")),
            OutAlias::New(2),
            "a was used since: c loses its alias"
        );
    }

    /// Every alias maps exactly one topic and every topic one alias, across
    /// many replacements; a lookup agrees with what the client would hold.
    #[test]
    fn mapping_stays_consistent_like_the_clients() {
        let mut a = OutAliases::new(10);
        let mut client: HashMap<u16, String> = HashMap::new();
        for i in 0..5000u32 {
            let topic = format!("t/{}", (i * 7919) % 37);
            match a.assign(&t(&topic)) {
                OutAlias::New(x) => {
                    assert!((1..=10).contains(&x));
                    client.insert(x, topic);
                }
                OutAlias::Known(x) => assert_eq!(client.get(&x), Some(&topic)),
                OutAlias::None => panic!("no alias"),
            }
            if i % 11 == 0 {
                if let Some((&x, top)) = client.iter().next() {
                    let top = top.clone();
                    a.forget(&top, x);
                }
            }
        }
        assert!(a.len() <= 10);
    }

    /// O(1): 200,000 distinct topics through 65,535 aliases. The linear
    /// search for a free alias this replaces took minutes for this. The
    /// work is counted, not timed: the CLOCK hand passes each slot at most
    /// once per eviction plus once per reference bit it clears.
    #[test]
    fn many_distinct_topics_are_fast() {
        let mut a = OutAliases::new(u16::MAX);
        let n = 200_000u64;
        for i in 0..n {
            let r = a.assign(&t(&format!("devices/{i}/telemetry")));
            assert!(matches!(r, OutAlias::New(_)));
            if i % 3 == 0 {
                // Re-used topics set reference bits for the hand to clear.
                assert!(matches!(
                    a.assign(&t(&format!("devices/{i}/telemetry"))),
                    OutAlias::Known(_)
                ));
            }
        }
        assert_eq!(a.len(), usize::from(u16::MAX));
        let evictions = n - u64::from(u16::MAX);
        let references = n.div_ceil(3);
        let steps = a.table.as_ref().map_or(0, |t| t.steps);
        assert!(
            steps <= evictions + references,
            "{steps} slots passed for {evictions} evictions"
        );
    }

    #[test]
    fn stored_topics_do_not_share_the_source_buffer() {
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        let topic = ByteString::try_from(chunk.slice(0..10)).unwrap();
        let range = chunk.as_ptr_range();
        let mut i = InAliases::default();
        i.set(1, &topic);
        let stored = i.get(1).unwrap();
        assert_eq!(stored, &topic);
        assert!(!range.contains(&stored.as_bytes().as_ptr()));
        let mut o = OutAliases::new(4);
        o.assign(&topic);
        for k in o.table.as_ref().unwrap().by_topic.keys() {
            assert!(!range.contains(&k.as_bytes().as_ptr()));
        }
    }
}
