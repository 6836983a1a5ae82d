//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) over the MQTT 5 AUTH exchange,
//! server side, as an [`Authenticator`] for the method `"SCRAM-SHA-256"`.
//!
//! Exchange (authentication data of CONNECT / AUTH packets):
//! 1. client → CONNECT: `n,,n=user,r=cnonce` (client-first)
//! 2. server → AUTH 0x18: `r=cnonce+snonce,s=salt,i=iterations` (server-first)
//! 3. client → AUTH 0x18: `c=biws,r=cnonce+snonce,p=proof` (client-final)
//! 4. server → CONNACK / AUTH 0x00: `v=server-signature` (server-final)
//!
//! Re-authentication (AUTH 0x19) runs the same exchange again.
//! Channel binding is not supported (`p=` is refused; `y` is accepted as
//! RFC 5802 allows). Usernames and passwords are used as UTF-8 bytes without
//! SASLprep: keep them ASCII. An unknown user goes through the whole
//! exchange with a fake salt and fails at the end (no user enumeration).
//!
//! # Credentials file
//! One line per user (`#` comments), the PostgreSQL-like format
//! `username:SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`,
//! written by `millet scram FILE USER` ([`crate::tools`]), or
//! [`ScramCredential::generate`] / [`ScramStore::set_password`] (no
//! plain-text passwords).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::reload::ReloadableFile;
use crate::auth::{AuthExchange, AuthStep, Authenticator};
use crate::tools::{valid_username, UserFile};

/// The authentication method name.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// Default PBKDF2 iteration count for new credentials (RFC 7677 minimum).
pub const DEFAULT_ITERATIONS: u32 = 4096;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length: this cannot fail.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    m.update(data);
    m.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SCRAM errors (file handling).
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error("invalid username {0:?}")]
    BadUsername(String),
}

/// What the server stores for one user.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredential {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramCredential")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramCredential {
    /// Derive from a password: SaltedPassword = PBKDF2-HMAC-SHA-256.
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramCredential {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramCredential {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Derive with a random 16-byte salt.
    pub fn generate(password: &[u8], iterations: u32) -> ScramCredential {
        let mut salt = [0u8; 16];
        rand::fill(&mut salt);
        ScramCredential::derive(password, &salt, iterations)
    }

    /// `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn encode(&self) -> String {
        format!(
            "{SCRAM_SHA_256}${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// Parse [`ScramCredential::encode`]'s format.
    pub fn decode(s: &str) -> Option<ScramCredential> {
        let rest = s.strip_prefix(SCRAM_SHA_256)?.strip_prefix('$')?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let key = |k: &str| -> Option<[u8; 32]> { B64.decode(k).ok()?.try_into().ok() };
        let iterations: u32 = iter.parse().ok()?;
        if iterations == 0 {
            return None;
        }
        Some(ScramCredential {
            iterations,
            salt: B64.decode(salt).ok()?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }
}

/// The credentials file, reloadable.
#[derive(Debug, Default)]
pub struct ScramStore {
    creds: ReloadableFile<HashMap<String, ScramCredential>, ScramError>,
}

/// Parse a credentials file's text.
pub fn parse_credentials(text: &str) -> Result<HashMap<String, ScramCredential>, ScramError> {
    let decode = |v: &str| ScramCredential::decode(v).ok_or("bad SCRAM credential");
    let file = UserFile::parse(text, |v| decode(v).map(drop).map_err(String::from))
        .map_err(|(line, msg)| ScramError::Parse { line, msg })?;
    Ok(file
        .entries()
        .filter_map(|(user, v)| Some((user.to_string(), decode(v).ok()?)))
        .collect())
}

impl ScramStore {
    pub fn new(creds: HashMap<String, ScramCredential>) -> ScramStore {
        ScramStore {
            creds: ReloadableFile::fixed(creds),
        }
    }

    pub fn from_file(path: impl Into<PathBuf>) -> Result<ScramStore, ScramError> {
        Ok(ScramStore {
            creds: ReloadableFile::open(path, Self::read)?,
        })
    }

    fn read(path: &Path) -> Result<HashMap<String, ScramCredential>, ScramError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScramError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        parse_credentials(&text)
    }

    /// Re-read the file; on error the old credentials stay in force.
    pub fn reload(&self) -> Result<(), ScramError> {
        // On error the caller logs it, once.
        self.creds.reload().map(drop)
    }

    pub fn get(&self, user: &str) -> Option<ScramCredential> {
        self.creds.load().get(user).cloned()
    }

    /// Add or replace a user (in memory; [`ScramStore::render`] + write to persist).
    pub fn set_password(
        &self,
        user: &str,
        password: &[u8],
        iterations: u32,
    ) -> Result<(), ScramError> {
        if !valid_username(user) {
            return Err(ScramError::BadUsername(user.to_string()));
        }
        let cred = ScramCredential::generate(password, iterations);
        let mut m = HashMap::clone(&self.creds.load());
        m.insert(user.to_string(), cred);
        self.creds.store(m);
        Ok(())
    }

    /// Remove a user (in memory).
    pub fn remove(&self, user: &str) -> bool {
        let mut m = HashMap::clone(&self.creds.load());
        let had = m.remove(user).is_some();
        self.creds.store(m);
        had
    }

    /// The file text for the current credentials (sorted by user).
    pub fn render(&self) -> String {
        let m = self.creds.load();
        let mut users: Vec<_> = m.iter().collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        users
            .into_iter()
            .map(|(u, c)| format!("{u}:{}\n", c.encode()))
            .collect()
    }
}

/// The SCRAM-SHA-256 [`Authenticator`].
#[derive(Debug)]
pub struct ScramAuthenticator {
    store: Arc<ScramStore>,
    /// Secret for fake salts of unknown users.
    fake_key: [u8; 32],
}

impl ScramAuthenticator {
    pub fn new(store: Arc<ScramStore>) -> ScramAuthenticator {
        let mut fake_key = [0u8; 32];
        rand::fill(&mut fake_key);
        ScramAuthenticator { store, fake_key }
    }

    pub fn store(&self) -> &Arc<ScramStore> {
        &self.store
    }
}

impl Authenticator for ScramAuthenticator {
    fn start(&self, method: &str, _client_id: &str) -> Option<Box<dyn AuthExchange>> {
        if method != SCRAM_SHA_256 {
            return None;
        }
        Some(Box::new(ScramExchange {
            store: self.store.clone(),
            fake_key: self.fake_key,
            state: State::Initial,
        }))
    }
}

enum State {
    Initial,
    SentFirst {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
        cred: ScramCredential,
        known: bool,
    },
    Done,
}

/// One exchange (see the module docs).
pub struct ScramExchange {
    store: Arc<ScramStore>,
    fake_key: [u8; 32],
    state: State,
}

/// Decode a SCRAM `saslname` (`=2C` → `,`, `=3D` → `=`).
fn decode_saslname(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i + 1..i + 3)?;
        out.push(match esc {
            "2C" => ',',
            "3D" => '=',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// The user named in a SCRAM client-first message (`n,,n=user,r=...`), for
/// the ACL's username: the exchange then proves the client knows that user's
/// password.
pub fn client_first_username(data: &[u8]) -> Option<String> {
    let msg = std::str::from_utf8(data).ok()?;
    let (_, rest) = msg.split_once(',')?;
    let (_, bare) = rest.split_once(',')?;
    bare.split(',')
        .next()?
        .strip_prefix("n=")
        .and_then(decode_saslname)
}

fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

impl ScramExchange {
    fn client_first(&mut self, data: &[u8]) -> AuthStep {
        let Ok(msg) = std::str::from_utf8(data) else {
            return AuthStep::Failure;
        };
        // gs2-header: cbind-flag "," [authzid] ","
        let Some((flag, rest)) = msg.split_once(',') else {
            return AuthStep::Failure;
        };
        if flag != "n" && flag != "y" {
            return AuthStep::Failure; // "p=...": channel binding unsupported
        }
        let Some((authzid, bare)) = rest.split_once(',') else {
            return AuthStep::Failure;
        };
        let gs2_header = format!("{flag},{authzid},");
        let mut attrs = bare.split(',');
        let (Some(n), Some(r)) = (attrs.next(), attrs.next()) else {
            return AuthStep::Failure;
        };
        let (Some(user), Some(cnonce)) = (
            n.strip_prefix("n=").and_then(decode_saslname),
            r.strip_prefix("r="),
        ) else {
            return AuthStep::Failure;
        };
        if !valid_nonce(cnonce) {
            return AuthStep::Failure;
        }
        if let Some(a) = authzid.strip_prefix("a=") {
            if decode_saslname(a).as_deref() != Some(user.as_str()) {
                return AuthStep::Failure;
            }
        } else if !authzid.is_empty() {
            return AuthStep::Failure;
        }
        let (cred, known) = match self.store.get(&user) {
            Some(c) => (c, true),
            None => {
                let salt = hmac(&self.fake_key, user.as_bytes());
                let mut bogus = [0u8; 32];
                rand::fill(&mut bogus);
                (
                    ScramCredential {
                        iterations: DEFAULT_ITERATIONS,
                        salt: salt[..16].to_vec(),
                        stored_key: bogus,
                        server_key: bogus,
                    },
                    false,
                )
            }
        };
        let mut snonce = [0u8; 18];
        rand::fill(&mut snonce);
        let nonce = format!("{cnonce}{}", B64.encode(snonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&cred.salt),
            cred.iterations
        );
        self.state = State::SentFirst {
            gs2_header,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            cred,
            known,
        };
        AuthStep::Continue(Bytes::from(server_first))
    }

    fn client_final(&mut self, data: &[u8]) -> AuthStep {
        let State::SentFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
            cred,
            known,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return AuthStep::Failure;
        };
        let Ok(msg) = std::str::from_utf8(data) else {
            return AuthStep::Failure;
        };
        let Some(idx) = msg.rfind(",p=") else {
            return AuthStep::Failure;
        };
        let without_proof = &msg[..idx];
        let Ok(proof) = B64.decode(&msg[idx + 3..]) else {
            return AuthStep::Failure;
        };
        let mut attrs = without_proof.split(',');
        let (Some(c), Some(r)) = (attrs.next(), attrs.next()) else {
            return AuthStep::Failure;
        };
        if c.strip_prefix("c=") != Some(&B64.encode(gs2_header.as_bytes()))
            || r.strip_prefix("r=") != Some(nonce.as_str())
            || proof.len() != 32
        {
            return AuthStep::Failure;
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&cred.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        if !ct_eq(&sha256(&client_key), &cred.stored_key) || !known {
            return AuthStep::Failure;
        }
        let server_signature = hmac(&cred.server_key, auth_message.as_bytes());
        AuthStep::Success(Some(Bytes::from(format!(
            "v={}",
            B64.encode(server_signature)
        ))))
    }
}

impl AuthExchange for ScramExchange {
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep {
        let Some(data) = data else {
            self.state = State::Done;
            return AuthStep::Failure;
        };
        match self.state {
            State::Initial => self.client_first(data),
            State::SentFirst { .. } => self.client_final(data),
            State::Done => AuthStep::Failure,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A client-side SCRAM-SHA-256 implementation for tests.
    pub struct Client {
        user: String,
        password: String,
        cnonce: String,
        first_bare: String,
        expected_server_sig: Option<[u8; 32]>,
    }

    impl Client {
        pub fn new(user: &str, password: &str) -> Client {
            Client {
                user: user.into(),
                password: password.into(),
                cnonce: "fyko+d2lbbFgONRv9qkxdawL".into(),
                first_bare: String::new(),
                expected_server_sig: None,
            }
        }

        pub fn first(&mut self) -> Vec<u8> {
            let name = self.user.replace('=', "=3D").replace(',', "=2C");
            self.first_bare = format!("n={name},r={}", self.cnonce);
            format!("n,,{}", self.first_bare).into_bytes()
        }

        pub fn finish(&mut self, server_first: &[u8]) -> Vec<u8> {
            let sf = std::str::from_utf8(server_first).unwrap();
            let mut nonce = "";
            let mut salt = vec![];
            let mut iter = 0;
            for a in sf.split(',') {
                match a.split_at(2) {
                    ("r=", v) => nonce = v,
                    ("s=", v) => salt = B64.decode(v).unwrap(),
                    ("i=", v) => iter = v.parse().unwrap(),
                    _ => {}
                }
            }
            assert!(nonce.starts_with(&self.cnonce));
            let mut salted = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(self.password.as_bytes(), &salt, iter, &mut salted);
            let client_key = hmac(&salted, b"Client Key");
            let stored_key = sha256(&client_key);
            let without_proof = format!("c=biws,r={nonce}");
            let auth_message = format!("{},{sf},{without_proof}", self.first_bare);
            let sig = hmac(&stored_key, auth_message.as_bytes());
            let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
            let server_key = hmac(&salted, b"Server Key");
            self.expected_server_sig = Some(hmac(&server_key, auth_message.as_bytes()));
            format!("{without_proof},p={}", B64.encode(proof)).into_bytes()
        }

        pub fn verify_server(&self, server_final: &[u8]) -> bool {
            let expected = format!("v={}", B64.encode(self.expected_server_sig.unwrap()));
            server_final == expected.as_bytes()
        }
    }

    fn store() -> Arc<ScramStore> {
        let s = ScramStore::default();
        s.set_password("user", b"pencil", DEFAULT_ITERATIONS)
            .unwrap();
        s.set_password("a,b=c", b"weird", 4096).unwrap();
        Arc::new(s)
    }

    fn run(auth: &ScramAuthenticator, user: &str, pw: &str) -> AuthStep {
        let mut client = Client::new(user, pw);
        let mut ex = auth.start(SCRAM_SHA_256, "cid").unwrap();
        let AuthStep::Continue(sf) = ex.step(Some(&client.first())) else {
            return AuthStep::Failure;
        };
        let step = ex.step(Some(&client.finish(&sf)));
        if let AuthStep::Success(Some(v)) = &step {
            assert!(client.verify_server(v), "server signature must verify");
        }
        // the exchange is over
        assert_eq!(ex.step(Some(b"again")), AuthStep::Failure);
        step
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil".
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let cred = ScramCredential::derive(b"pencil", &salt, 4096);
        let cfb = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let sf = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let cf = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let am = format!("{cfb},{sf},{cf}");
        let sig = hmac(&cred.server_key, am.as_bytes());
        assert_eq!(
            B64.encode(sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let csig = hmac(&cred.stored_key, am.as_bytes());
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"pencil", &salt, 4096, &mut salted);
        let ck = hmac(&salted, b"Client Key");
        let proof: Vec<u8> = ck.iter().zip(csig).map(|(a, b)| a ^ b).collect();
        assert_eq!(
            B64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
    }

    #[test]
    fn full_exchange_and_wrong_password() {
        let auth = ScramAuthenticator::new(store());
        assert!(matches!(
            run(&auth, "user", "pencil"),
            AuthStep::Success(Some(_))
        ));
        assert!(matches!(
            run(&auth, "a,b=c", "weird"),
            AuthStep::Success(Some(_))
        ));
        assert_eq!(run(&auth, "user", "wrong"), AuthStep::Failure);
        assert_eq!(run(&auth, "nobody", "pencil"), AuthStep::Failure);
        assert!(auth.start("PLAIN", "cid").is_none());
    }

    #[test]
    fn reauthentication_is_a_fresh_exchange() {
        let auth = ScramAuthenticator::new(store());
        for _ in 0..2 {
            assert!(matches!(run(&auth, "user", "pencil"), AuthStep::Success(_)));
        }
    }

    #[test]
    fn malformed_messages_fail() {
        let auth = ScramAuthenticator::new(store());
        for first in [
            &b"p=tls-unique,,n=user,r=abc"[..],
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=user",
            b"n,a=other,n=user,r=abc",
            b"garbage",
            b"n,,n=us=ZZer,r=abc",
        ] {
            let mut ex = auth.start(SCRAM_SHA_256, "c").unwrap();
            assert_eq!(ex.step(Some(first)), AuthStep::Failure, "{first:?}");
        }
        let mut ex = auth.start(SCRAM_SHA_256, "c").unwrap();
        assert_eq!(ex.step(None), AuthStep::Failure);

        // tampered nonce / channel binding in the final message
        let mut client = Client::new("user", "pencil");
        let mut ex = auth.start(SCRAM_SHA_256, "c").unwrap();
        let AuthStep::Continue(sf) = ex.step(Some(&client.first())) else {
            panic!()
        };
        let fin = String::from_utf8(client.finish(&sf)).unwrap();
        let bad = fin.replace("c=biws", "c=eSws");
        assert_eq!(ex.step(Some(bad.as_bytes())), AuthStep::Failure);
    }

    #[test]
    fn credentials_file_roundtrip_and_reload() {
        let s = store();
        let text = format!("# scram users\n{}", s.render());
        let parsed = parse_credentials(&text).unwrap();
        assert_eq!(parsed.get("user"), s.get("user").as_ref());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scram");
        std::fs::write(&path, &text).unwrap();
        let fs = Arc::new(ScramStore::from_file(&path).unwrap());
        let auth = ScramAuthenticator::new(fs.clone());
        assert!(matches!(run(&auth, "user", "pencil"), AuthStep::Success(_)));
        std::fs::write(&path, "user:SCRAM-SHA-256$bad").unwrap();
        assert!(fs.reload().is_err());
        assert!(matches!(run(&auth, "user", "pencil"), AuthStep::Success(_)));
        assert!(parse_credentials("x:plain\n").is_err());
        assert!(fs.remove("user"));
        assert_eq!(run(&auth, "user", "pencil"), AuthStep::Failure);
    }
}
