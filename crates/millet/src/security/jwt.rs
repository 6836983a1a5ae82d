//! JWT authentication: the CONNECT password carries a JSON Web Token.
//!
//! - HS256 with a shared secret; RS256 / ES256 with a PEM public key or a
//!   JWKS file (the token header's `kid` picks the key; without a `kid`, a
//!   JWKS holding exactly one key uses it).
//! - `exp` (required unless `require_exp = false`) and `nbf` are checked
//!   against the `now` passed in, with `leeway_secs`; `iss` / `aud` when
//!   configured; `bind = "username"` (default) | `"client_id"` requires the
//!   `bind_claim` claim (default `sub`) to equal that CONNECT field;
//!   `bind = "none"` accepts any name (warned about at start-up).
//! - Claims `publish` / `subscribe` (lists of topic filters, `%c` / `%u`
//!   allowed) become per-client allow rules: the client may then use those
//!   topics only (plus what the ACL file allows after them).
//! - A password that is not shaped like a JWT (`xxx.yyy.zzz`) is ignored;
//!   a JWT that does not verify is denied.
//!
//! ```toml
//! [security.auth.jwt]
//! algorithm = "RS256"            # HS256 | RS256 | ES256
//! public_key = "/etc/millet/jwt.pub.pem"   # or jwks = "...json", or secret = "..." (HS256)
//! issuer = "https://issuer.example"
//! audience = "millet"
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use millet_codec::topic::valid_topic_filter;
use serde::{Deserialize, Serialize};

use super::acl::{Action, Rule};
use super::Decision;
use crate::broker::AuthFailure;

/// The verification error of a token past its `exp` (plus leeway).
const EXPIRED: &str = "token expired";

/// Supported algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

impl From<JwtAlgorithm> for Algorithm {
    fn from(a: JwtAlgorithm) -> Algorithm {
        match a {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
        }
    }
}

/// Which connect field the token's identity claim (`bind_claim`, default
/// `sub`) must equal. The identity a token proves is the identity the ACL
/// sees: with the default `username`, a token for `sensor-1` presented with
/// username `ops` is refused (0x86), so it cannot borrow `ops`'s ACL rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JwtBind {
    /// The CONNECT username must equal the claim.
    #[default]
    Username,
    /// The CONNECT client id must equal the claim.
    ClientId,
    /// Not bound: any username / client id with any valid token (warned
    /// about at start-up). Safe only when every token carries its own
    /// `publish` / `subscribe` claims and the ACL file has no per-user rules.
    None,
}

/// `[security.auth.jwt]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret (UTF-8).
    #[serde(default)]
    pub secret: Option<String>,
    /// HS256 shared secret read from a file (trailing newline trimmed).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// RS256 / ES256 public key, PEM.
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// RS256 / ES256 keys as a JWKS (JSON) file.
    #[serde(default)]
    pub jwks: Option<PathBuf>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    #[serde(default = "default_true")]
    pub require_exp: bool,
    #[serde(default)]
    pub bind: JwtBind,
    /// The claim `bind` compares with (a string claim).
    #[serde(default = "default_bind_claim")]
    pub bind_claim: String,
}

fn default_bind_claim() -> String {
    "sub".into()
}

fn default_leeway() -> u64 {
    30
}

fn default_true() -> bool {
    true
}

impl JwtConfig {
    pub fn hs256(secret: &str) -> JwtConfig {
        JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: Some(secret.to_string()),
            secret_file: None,
            public_key: None,
            jwks: None,
            issuer: None,
            audience: None,
            leeway_secs: default_leeway(),
            require_exp: true,
            bind: JwtBind::Username,
            bind_claim: default_bind_claim(),
        }
    }
}

/// JWT setup errors.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JWT key: {0}")]
    Key(String),
    #[error("JWT configuration: {0}")]
    Config(String),
}

enum Keys {
    Single(DecodingKey),
    Jwks(JwkSet),
}

/// The claims this provider reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Every other claim (for `bind_claim`).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// A string claim by name (`sub` included).
    pub fn string(&self, name: &str) -> Option<&str> {
        if name == "sub" {
            return self.sub.as_deref();
        }
        self.other.get(name).and_then(|v| v.as_str())
    }
}

/// The JWT provider.
pub struct JwtAuth {
    cfg: JwtConfig,
    keys: ArcSwap<Keys>,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth")
            .field("algorithm", &self.cfg.algorithm)
            .finish_non_exhaustive()
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, JwtError> {
    std::fs::read(path).map_err(|source| JwtError::Io {
        path: path.clone(),
        source,
    })
}

fn load_keys(cfg: &JwtConfig) -> Result<Keys, JwtError> {
    let key_err = |e: jsonwebtoken::errors::Error| JwtError::Key(e.to_string());
    match cfg.algorithm {
        JwtAlgorithm::HS256 => {
            let secret = match (&cfg.secret, &cfg.secret_file) {
                (Some(s), None) => s.as_bytes().to_vec(),
                (None, Some(p)) => {
                    let mut s = read(p)?;
                    while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        s.pop();
                    }
                    s
                }
                _ => {
                    return Err(JwtError::Config(
                        "HS256 needs exactly one of secret / secret_file".into(),
                    ))
                }
            };
            if secret.is_empty() {
                return Err(JwtError::Config("empty HS256 secret".into()));
            }
            Ok(Keys::Single(DecodingKey::from_secret(&secret)))
        }
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => match (&cfg.public_key, &cfg.jwks) {
            (Some(p), None) => {
                let pem = read(p)?;
                let k = if cfg.algorithm == JwtAlgorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ec_pem(&pem)
                };
                Ok(Keys::Single(k.map_err(key_err)?))
            }
            (None, Some(p)) => {
                let set: JwkSet = serde_json::from_slice(&read(p)?)
                    .map_err(|e| JwtError::Key(format!("JWKS {}: {e}", p.display())))?;
                for k in &set.keys {
                    DecodingKey::from_jwk(k).map_err(key_err)?;
                }
                Ok(Keys::Jwks(set))
            }
            _ => Err(JwtError::Config(
                "RS256 / ES256 need exactly one of public_key / jwks".into(),
            )),
        },
    }
}

/// Does `s` look like a compact JWS (three base64url parts)?
pub fn looks_like_jwt(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        })
}

impl JwtAuth {
    pub fn new(cfg: JwtConfig) -> Result<JwtAuth, JwtError> {
        let keys = load_keys(&cfg)?;
        Ok(JwtAuth {
            cfg,
            keys: ArcSwap::from_pointee(keys),
        })
    }

    /// Re-read the key files; on error the old keys stay in force.
    pub fn reload(&self) -> Result<(), JwtError> {
        // On error the caller logs it, once.
        self.keys.store(Arc::new(load_keys(&self.cfg)?));
        Ok(())
    }

    /// Verify `token` and return its claims (no ACL conversion).
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, String> {
        let alg: Algorithm = self.cfg.algorithm.into();
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        if header.alg != alg {
            return Err(format!("algorithm {:?} not accepted", header.alg));
        }
        let keys = self.keys.load();
        let jwk_key;
        let key = match &**keys {
            Keys::Single(k) => k,
            Keys::Jwks(set) => {
                let jwk = match &header.kid {
                    Some(kid) => set.find(kid),
                    None if set.keys.len() == 1 => set.keys.first(),
                    None => None,
                }
                .ok_or("no JWKS key for this token")?;
                jwk_key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
                &jwk_key
            }
        };
        let mut v = Validation::new(alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.required_spec_claims.clear();
        v.leeway = self.cfg.leeway_secs;
        if let Some(iss) = &self.cfg.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        match &self.cfg.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                v.required_spec_claims.insert("aud".into());
            }
            None => v.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| e.to_string())?;
        let c = data.claims;
        let leeway = self.cfg.leeway_secs;
        match c.exp {
            Some(exp) if exp.saturating_add(leeway) <= now_secs => return Err(EXPIRED.into()),
            None if self.cfg.require_exp => return Err("token without exp".into()),
            _ => {}
        }
        if let Some(nbf) = c.nbf {
            if nbf > now_secs.saturating_add(leeway) {
                return Err("token not yet valid".into());
            }
        }
        Ok(c)
    }

    /// [`JwtAuth::check_why`] with every refusal a plain
    /// [`Decision::Deny`].
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        now_secs: u64,
    ) -> Decision {
        self.check_why(client_id, username, password, now_secs)
            .plain()
    }

    /// Check a CONNECT whose password may carry a token; a refusal says
    /// whether the token expired or is invalid.
    pub fn check_why(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        now_secs: u64,
    ) -> Decision {
        let Some(token) = password
            .and_then(|p| std::str::from_utf8(p).ok())
            .map(str::trim)
            .filter(|t| looks_like_jwt(t))
        else {
            return Decision::Ignore;
        };
        let claims = match self.verify(token, now_secs) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(client_id, error = %e, "JWT refused");
                return Decision::DenyFor(if e == EXPIRED {
                    AuthFailure::JwtExpired
                } else {
                    AuthFailure::JwtInvalid
                });
            }
        };
        let claim = claims.string(&self.cfg.bind_claim);
        let bound = match self.cfg.bind {
            JwtBind::None => true,
            JwtBind::Username => claim.is_some() && claim == username,
            JwtBind::ClientId => claim == Some(client_id),
        };
        if !bound {
            tracing::info!(
                client_id,
                username = username.unwrap_or(""),
                claim = %self.cfg.bind_claim,
                token_identity = claim.unwrap_or("(none)"),
                bind = ?self.cfg.bind,
                "JWT refused: the token was issued for another identity"
            );
            return Decision::DenyFor(AuthFailure::JwtInvalid);
        }
        Decision::Allow {
            acl: claims_to_rules(&claims.publish, &claims.subscribe),
            // Accepted within the leeway: valid until the leeway ends.
            valid_until: claims.exp.map(|e| e.saturating_add(self.cfg.leeway_secs)),
        }
    }
}

/// `publish` / `subscribe` filter lists → per-client allow rules (invalid
/// filters are dropped).
pub fn claims_to_rules(publish: &[String], subscribe: &[String]) -> Vec<Rule> {
    let keep = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|f| {
                let ok = valid_topic_filter(f);
                if !ok {
                    tracing::warn!(filter = %f, "invalid topic filter in claims ignored");
                }
                ok
            })
            .cloned()
            .collect()
    };
    let mut rules = Vec::new();
    let p = keep(publish);
    if !p.is_empty() {
        rules.push(Rule::allow(Action::Publish, p));
    }
    let s = keep(subscribe);
    if !s.is_empty() {
        rules.push(Rule::allow(Action::Subscribe, s));
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;
    const RSA_PRIVATE: &str = include_str!("testdata/jwt_rs256_private.pem");
    const RSA_PUBLIC: &str = include_str!("testdata/jwt_rs256_public.pem");

    fn hs(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    /// Tests of signatures and claims use tokens without `sub`.
    fn unbound(secret: &str) -> JwtConfig {
        JwtConfig {
            bind: JwtBind::None,
            ..JwtConfig::hs256(secret)
        }
    }

    #[test]
    fn binds_the_username_to_sub_by_default() {
        let cfg = JwtConfig::hs256("k");
        assert_eq!(cfg.bind, JwtBind::Username);
        let from_toml: JwtConfig = toml::from_str("algorithm = \"HS256\"\nsecret = \"k\"").unwrap();
        assert_eq!(from_toml.bind, JwtBind::Username);
        assert_eq!(from_toml.bind_claim, "sub");
        let a = JwtAuth::new(cfg).unwrap();
        let t = hs("k", json!({"exp": NOW + 60, "sub": "sensor-1"}));
        assert!(allowed(&a.check(
            "c",
            Some("sensor-1"),
            Some(t.as_bytes()),
            NOW
        )));
        // another username, or none, with sensor-1's token: refused
        assert_eq!(
            a.check("c", Some("ops"), Some(t.as_bytes()), NOW),
            Decision::Deny
        );
        assert_eq!(a.check("c", None, Some(t.as_bytes()), NOW), Decision::Deny);
        let no_sub = hs("k", json!({"exp": NOW + 60}));
        assert_eq!(
            a.check("c", Some("ops"), Some(no_sub.as_bytes()), NOW),
            Decision::Deny
        );
        // another claim, bound to the client id
        let a = JwtAuth::new(JwtConfig {
            bind: JwtBind::ClientId,
            bind_claim: "device_id".into(),
            ..JwtConfig::hs256("k")
        })
        .unwrap();
        let t = hs("k", json!({"exp": NOW + 60, "device_id": "dev-7"}));
        assert!(allowed(&a.check(
            "dev-7",
            Some("x"),
            Some(t.as_bytes()),
            NOW
        )));
        assert_eq!(
            a.check("dev-8", Some("x"), Some(t.as_bytes()), NOW),
            Decision::Deny
        );
    }

    fn allowed(d: &Decision) -> bool {
        matches!(d, Decision::Allow { .. })
    }

    #[test]
    fn hs256_claims_become_rules() {
        let a = JwtAuth::new(unbound("k")).unwrap();
        let t = hs(
            "k",
            json!({"exp": NOW + 60, "publish": ["d/%c/up", "bad/#/x"], "subscribe": ["d/%c/down"]}),
        );
        let d = a.check("c1", None, Some(t.as_bytes()), NOW);
        let Decision::Allow { acl, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            acl,
            vec![
                Rule::allow(Action::Publish, vec!["d/%c/up".into()]),
                Rule::allow(Action::Subscribe, vec!["d/%c/down".into()]),
            ]
        );
        let acl_check = super::super::acl::Acl::default();
        assert!(acl_check.check_publish("c1", None, &acl, "d/c1/up"));
        assert!(!acl_check.check_publish("c1", None, &acl, "d/c2/up"));
        assert!(acl_check.check_subscribe("c1", None, &acl, "d/c1/down"));
    }

    #[test]
    fn hs256_rejections() {
        let a = JwtAuth::new(unbound("k")).unwrap();
        let wrong_key = hs("other", json!({"exp": NOW + 60}));
        assert_eq!(
            a.check("c", None, Some(wrong_key.as_bytes()), NOW),
            Decision::Deny
        );
        let expired = hs("k", json!({"exp": NOW - 31}));
        assert_eq!(
            a.check("c", None, Some(expired.as_bytes()), NOW),
            Decision::Deny
        );
        let in_leeway = hs("k", json!({"exp": NOW - 29}));
        assert!(allowed(&a.check(
            "c",
            None,
            Some(in_leeway.as_bytes()),
            NOW
        )));
        let no_exp = hs("k", json!({"sub": "x"}));
        assert_eq!(
            a.check("c", None, Some(no_exp.as_bytes()), NOW),
            Decision::Deny
        );
        let future = hs("k", json!({"exp": NOW + 600, "nbf": NOW + 300}));
        assert_eq!(
            a.check("c", None, Some(future.as_bytes()), NOW),
            Decision::Deny
        );
        assert!(allowed(&a.check(
            "c",
            None,
            Some(future.as_bytes()),
            NOW + 300
        )));
        // not a JWT: ignored; tampered payload: denied
        assert_eq!(a.check("c", None, Some(b"hunter2"), NOW), Decision::Ignore);
        assert_eq!(a.check("c", None, None, NOW), Decision::Ignore);
        let good = hs("k", json!({"exp": NOW + 60}));
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(json!({"exp": NOW + 6000}).to_string());
        let tampered = parts.join(".");
        assert_eq!(
            a.check("c", None, Some(tampered.as_bytes()), NOW),
            Decision::Deny
        );
        // "none" / other algorithms are refused
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"exp": NOW + 60}),
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(
            a.check("c", None, Some(hs384.as_bytes()), NOW),
            Decision::Deny
        );
    }

    #[test]
    fn issuer_audience_and_binding() {
        let mut cfg = JwtConfig::hs256("k");
        cfg.issuer = Some("iss-1".into());
        cfg.audience = Some("millet".into());
        cfg.bind = JwtBind::Username;
        let a = JwtAuth::new(cfg).unwrap();
        let ok = hs(
            "k",
            json!({"exp": NOW + 60, "iss": "iss-1", "aud": "millet", "sub": "alice"}),
        );
        assert!(allowed(&a.check(
            "c",
            Some("alice"),
            Some(ok.as_bytes()),
            NOW
        )));
        assert_eq!(
            a.check("c", Some("bob"), Some(ok.as_bytes()), NOW),
            Decision::Deny
        );
        assert_eq!(a.check("c", None, Some(ok.as_bytes()), NOW), Decision::Deny);
        for bad in [
            json!({"exp": NOW + 60, "iss": "other", "aud": "millet", "sub": "alice"}),
            json!({"exp": NOW + 60, "iss": "iss-1", "aud": "else", "sub": "alice"}),
            json!({"exp": NOW + 60, "aud": "millet", "sub": "alice"}),
        ] {
            let t = hs("k", bad);
            assert_eq!(
                a.check("c", Some("alice"), Some(t.as_bytes()), NOW),
                Decision::Deny
            );
        }
    }

    #[test]
    fn rs256_with_pem_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let pubp = dir.path().join("pub.pem");
        std::fs::write(&pubp, RSA_PUBLIC).unwrap();
        let a = JwtAuth::new(JwtConfig {
            algorithm: JwtAlgorithm::RS256,
            public_key: Some(pubp),
            secret: None,
            ..unbound("")
        })
        .unwrap();
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let t = encode(
            &Header::new(Algorithm::RS256),
            &json!({"exp": NOW + 60}),
            &key,
        )
        .unwrap();
        assert!(allowed(&a.check("c", None, Some(t.as_bytes()), NOW)));
        // an HS256 token signed with the public key as secret must not pass
        let confused = hs(RSA_PUBLIC, json!({"exp": NOW + 60}));
        assert_eq!(
            a.check("c", None, Some(confused.as_bytes()), NOW),
            Decision::Deny
        );
    }

    #[test]
    fn es256_with_jwks_kid_lookup_and_reload() {
        let k1 = rcgen::KeyPair::generate().unwrap();
        let k2 = rcgen::KeyPair::generate().unwrap();
        let jwk = |kid: &str, k: &rcgen::KeyPair| {
            let raw = k.public_key_raw();
            json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                   "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])})
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({"keys": [jwk("one", &k1)]}).to_string()).unwrap();
        let a = JwtAuth::new(JwtConfig {
            algorithm: JwtAlgorithm::ES256,
            jwks: Some(path.clone()),
            secret: None,
            ..unbound("")
        })
        .unwrap();
        let token = |kid: Option<&str>, k: &rcgen::KeyPair| {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = kid.map(String::from);
            let key = EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
            encode(&h, &json!({"exp": NOW + 60}), &key).unwrap()
        };
        let t1 = token(Some("one"), &k1);
        assert!(allowed(&a.check("c", None, Some(t1.as_bytes()), NOW)));
        // single key, no kid: used
        assert!(allowed(&a.check(
            "c",
            None,
            Some(token(None, &k1).as_bytes()),
            NOW
        )));
        let t2 = token(Some("two"), &k2);
        assert_eq!(a.check("c", None, Some(t2.as_bytes()), NOW), Decision::Deny);
        // wrong key under a known kid
        let forged = token(Some("one"), &k2);
        assert_eq!(
            a.check("c", None, Some(forged.as_bytes()), NOW),
            Decision::Deny
        );

        std::fs::write(&path, "{broken").unwrap();
        assert!(a.reload().is_err());
        assert!(allowed(&a.check("c", None, Some(t1.as_bytes()), NOW)));
        std::fs::write(
            &path,
            json!({"keys": [jwk("one", &k1), jwk("two", &k2)]}).to_string(),
        )
        .unwrap();
        a.reload().unwrap();
        assert!(allowed(&a.check("c", None, Some(t2.as_bytes()), NOW)));
        // two keys, no kid: refused
        assert_eq!(
            a.check("c", None, Some(token(None, &k1).as_bytes()), NOW),
            Decision::Deny
        );
    }

    #[test]
    fn config_errors() {
        assert!(JwtAuth::new(JwtConfig::hs256("")).is_err());
        let mut c = JwtConfig::hs256("x");
        c.algorithm = JwtAlgorithm::RS256;
        assert!(JwtAuth::new(c).is_err());
    }
}
