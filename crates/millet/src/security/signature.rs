//! Device signatures for fleets (in the style of Aliyun IoT).
//!
//! # Scheme
//! - **username**: `{device_name}|{product_key}|{timestamp_ms}`, e.g.
//!   `sensor-42|pk-thermo|1735689600000` (`product_key` may be empty:
//!   `sensor-42||1735689600000`). A username not of this shape is ignored by
//!   this provider (other providers of the chain may handle it).
//! - **content** signed: `clientId{client_id}deviceName{device_name}productKey{product_key}timestamp{timestamp_ms}`
//! - **password**: `HMAC(secret, content)`, lower- or upper-case hex (default)
//!   or standard base64 (`encoding = "base64"`); HMAC-SHA256 by default,
//!   `algorithm = "hmac-sha384" | "hmac-sha512"` also available.
//! - **secret**: the device's own secret (keyed by client id), else its
//!   product's secret (keyed by product key).
//! - **replay window**: `|now - timestamp| <= window_secs` (default 300 s).
//!
//! # Secrets file (TOML)
//! ```toml
//! [devices]            # per device, keyed by MQTT client id
//! "sensor-42" = "s3cr3t"
//! [products]           # per product, keyed by product key
//! "pk-thermo" = "pr0duct-s3cr3t"
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};

use super::reload::ReloadableFile;
use super::Decision;

/// HMAC hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureAlgorithm {
    #[default]
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

/// Encoding of the password (the MAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// `[security.auth.signature]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureConfig {
    /// Secrets file (see the module docs).
    pub secrets: PathBuf,
    #[serde(default)]
    pub algorithm: SignatureAlgorithm,
    #[serde(default)]
    pub encoding: SignatureEncoding,
    /// Accepted clock difference, seconds, either way.
    #[serde(default = "default_window")]
    pub window_secs: u64,
}

fn default_window() -> u64 {
    300
}

/// Secrets errors.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid secrets file: {0}")]
    Parse(String),
}

/// Device and product secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    #[serde(default)]
    pub devices: HashMap<String, String>,
    #[serde(default)]
    pub products: HashMap<String, String>,
}

impl Secrets {
    pub fn parse(text: &str) -> Result<Secrets, SignatureError> {
        toml::from_str(text).map_err(|e| SignatureError::Parse(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Secrets, SignatureError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignatureError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Secrets::parse(&text)
    }
}

/// The parts of a signature username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUsername<'a> {
    pub device_name: &'a str,
    pub product_key: &'a str,
    pub timestamp_ms: u64,
}

/// Split `device|product|timestamp_ms`; `None` if not of that shape.
pub fn parse_username(username: &str) -> Option<SignedUsername<'_>> {
    let mut it = username.split('|');
    let (Some(d), Some(p), Some(t), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return None;
    };
    if d.is_empty() || t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(SignedUsername {
        device_name: d,
        product_key: p,
        timestamp_ms: t.parse().ok()?,
    })
}

/// The signed content string.
pub fn content(client_id: &str, u: &SignedUsername<'_>) -> String {
    format!(
        "clientId{client_id}deviceName{}productKey{}timestamp{}",
        u.device_name, u.product_key, u.timestamp_ms
    )
}

fn mac_bytes(alg: SignatureAlgorithm, secret: &[u8], msg: &[u8]) -> Vec<u8> {
    macro_rules! mac {
        ($h:ty) => {{
            match Hmac::<$h>::new_from_slice(secret) {
                Ok(mut m) => {
                    m.update(msg);
                    m.finalize().into_bytes().to_vec()
                }
                Err(_) => Vec::new(),
            }
        }};
    }
    match alg {
        SignatureAlgorithm::HmacSha256 => mac!(sha2::Sha256),
        SignatureAlgorithm::HmacSha384 => mac!(sha2::Sha384),
        SignatureAlgorithm::HmacSha512 => mac!(sha2::Sha512),
    }
}

fn verify_mac(alg: SignatureAlgorithm, secret: &[u8], msg: &[u8], tag: &[u8]) -> bool {
    macro_rules! verify {
        ($h:ty) => {{
            match Hmac::<$h>::new_from_slice(secret) {
                Ok(mut m) => {
                    m.update(msg);
                    m.verify_slice(tag).is_ok() // constant-time
                }
                Err(_) => false,
            }
        }};
    }
    match alg {
        SignatureAlgorithm::HmacSha256 => verify!(sha2::Sha256),
        SignatureAlgorithm::HmacSha384 => verify!(sha2::Sha384),
        SignatureAlgorithm::HmacSha512 => verify!(sha2::Sha512),
    }
}

/// Compute the password a device must send (for tools and tests).
pub fn sign(
    alg: SignatureAlgorithm,
    encoding: SignatureEncoding,
    secret: &str,
    client_id: &str,
    username: &str,
) -> Option<String> {
    let u = parse_username(username)?;
    let tag = mac_bytes(alg, secret.as_bytes(), content(client_id, &u).as_bytes());
    Some(match encoding {
        SignatureEncoding::Hex => hex::encode(tag),
        SignatureEncoding::Base64 => B64.encode(tag),
    })
}

/// The device-signature provider.
#[derive(Debug)]
pub struct SignatureAuth {
    cfg: SignatureConfig,
    secrets: ReloadableFile<Secrets, SignatureError>,
}

impl SignatureAuth {
    /// Load the secrets file named in `cfg`.
    pub fn from_config(cfg: SignatureConfig) -> Result<SignatureAuth, SignatureError> {
        let secrets = ReloadableFile::open(&cfg.secrets, Secrets::load)?;
        Ok(SignatureAuth { cfg, secrets })
    }

    /// With in-memory secrets (`cfg.secrets` is used by reload only).
    pub fn with_secrets(cfg: SignatureConfig, secrets: Secrets) -> SignatureAuth {
        SignatureAuth {
            secrets: ReloadableFile::with_value(&cfg.secrets, Secrets::load, secrets),
            cfg,
        }
    }

    /// Re-read the secrets; on error the old ones stay in force.
    pub fn reload(&self) -> Result<(), SignatureError> {
        // On error the caller logs it, once.
        self.secrets.reload().map(drop)
    }

    /// Check a CONNECT. `now_ms`: the current Unix time in milliseconds.
    /// Not a signature username, or no secret for the device / product →
    /// ignore; bad signature or timestamp outside the window → deny.
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        now_ms: u64,
    ) -> Decision {
        let Some(u) = username.and_then(parse_username) else {
            return Decision::Ignore;
        };
        let secrets = self.secrets.load();
        let secret = secrets.devices.get(client_id).or_else(|| {
            (!u.product_key.is_empty())
                .then(|| secrets.products.get(u.product_key))
                .flatten()
        });
        let Some(secret) = secret else {
            return Decision::Ignore;
        };
        let window_ms = self.cfg.window_secs.saturating_mul(1000);
        if now_ms.abs_diff(u.timestamp_ms) > window_ms {
            tracing::debug!(client_id, "device signature outside the replay window");
            return Decision::Deny;
        }
        let Some(password) = password.and_then(|p| std::str::from_utf8(p).ok()) else {
            return Decision::Deny;
        };
        let tag = match self.cfg.encoding {
            SignatureEncoding::Hex => hex::decode(password.trim()).ok(),
            SignatureEncoding::Base64 => B64.decode(password.trim()).ok(),
        };
        let Some(tag) = tag else {
            return Decision::Deny;
        };
        let msg = content(client_id, &u);
        if verify_mac(self.cfg.algorithm, secret.as_bytes(), msg.as_bytes(), &tag) {
            Decision::allow()
        } else {
            Decision::Deny
        }
    }
}

/// The current Unix time in milliseconds.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_735_689_600_000;

    fn auth(encoding: SignatureEncoding, alg: SignatureAlgorithm) -> SignatureAuth {
        let secrets = Secrets::parse(
            "[devices]\n\"sensor-42\" = \"dev-secret\"\n[products]\npk1 = \"prod-secret\"\n",
        )
        .unwrap();
        SignatureAuth::with_secrets(
            SignatureConfig {
                secrets: PathBuf::from("/nonexistent"),
                algorithm: alg,
                encoding,
                window_secs: 60,
            },
            secrets,
        )
    }

    #[test]
    fn known_answer() {
        // HMAC-SHA256("dev-secret", "clientIdsensor-42deviceNamesensor-42productKeypk1timestamp1735689600000")
        let u = format!("sensor-42|pk1|{NOW}");
        let sig = sign(
            SignatureAlgorithm::HmacSha256,
            SignatureEncoding::Hex,
            "dev-secret",
            "sensor-42",
            &u,
        )
        .unwrap();
        assert_eq!(
            sig,
            "5f502ec6a400e5eda7825a4fec705eb3b40b5e8a6a2338d111e4906044a3c772"
        );
        assert_eq!(
            content("sensor-42", &parse_username(&u).unwrap()),
            "clientIdsensor-42deviceNamesensor-42productKeypk1timestamp1735689600000"
        );
    }

    #[test]
    fn device_and_product_secrets() {
        let a = auth(SignatureEncoding::Hex, SignatureAlgorithm::HmacSha256);
        let alg = SignatureAlgorithm::HmacSha256;
        let u = format!("sensor-42||{NOW}");
        let pw = sign(alg, SignatureEncoding::Hex, "dev-secret", "sensor-42", &u).unwrap();
        assert!(matches!(
            a.check("sensor-42", Some(&u), Some(pw.as_bytes()), NOW),
            Decision::Allow { .. }
        ));
        // upper-case hex is fine
        let up = pw.to_uppercase();
        assert!(matches!(
            a.check("sensor-42", Some(&u), Some(up.as_bytes()), NOW),
            Decision::Allow { .. }
        ));
        // product secret for a device without its own
        let u2 = format!("other|pk1|{NOW}");
        let pw2 = sign(alg, SignatureEncoding::Hex, "prod-secret", "c-9", &u2).unwrap();
        assert!(matches!(
            a.check("c-9", Some(&u2), Some(pw2.as_bytes()), NOW),
            Decision::Allow { .. }
        ));
        // signature bound to the client id
        assert_eq!(
            a.check("c-10", Some(&u2), Some(pw2.as_bytes()), NOW),
            Decision::Deny
        );
        // wrong secret
        let bad = sign(alg, SignatureEncoding::Hex, "nope", "c-9", &u2).unwrap();
        assert_eq!(
            a.check("c-9", Some(&u2), Some(bad.as_bytes()), NOW),
            Decision::Deny
        );
        assert_eq!(a.check("c-9", Some(&u2), None, NOW), Decision::Deny);
        assert_eq!(a.check("c-9", Some(&u2), Some(b"zz"), NOW), Decision::Deny);
    }

    #[test]
    fn replay_window() {
        let a = auth(SignatureEncoding::Hex, SignatureAlgorithm::HmacSha256);
        let u = format!("sensor-42|pk1|{NOW}");
        let pw = sign(
            SignatureAlgorithm::HmacSha256,
            SignatureEncoding::Hex,
            "dev-secret",
            "sensor-42",
            &u,
        )
        .unwrap();
        let ok = |now| {
            matches!(
                a.check("sensor-42", Some(&u), Some(pw.as_bytes()), now),
                Decision::Allow { .. }
            )
        };
        assert!(ok(NOW + 60_000));
        assert!(ok(NOW - 60_000));
        assert!(!ok(NOW + 60_001));
        assert!(!ok(NOW - 60_001));
    }

    #[test]
    fn base64_and_sha512() {
        let a = auth(SignatureEncoding::Base64, SignatureAlgorithm::HmacSha512);
        let u = format!("d|pk1|{NOW}");
        let pw = sign(
            SignatureAlgorithm::HmacSha512,
            SignatureEncoding::Base64,
            "prod-secret",
            "c",
            &u,
        )
        .unwrap();
        assert!(matches!(
            a.check("c", Some(&u), Some(pw.as_bytes()), NOW),
            Decision::Allow { .. }
        ));
        let hex_pw = sign(
            SignatureAlgorithm::HmacSha512,
            SignatureEncoding::Hex,
            "prod-secret",
            "c",
            &u,
        )
        .unwrap();
        assert_eq!(
            a.check("c", Some(&u), Some(hex_pw.as_bytes()), NOW),
            Decision::Deny
        );
    }

    #[test]
    fn not_ours_is_ignored() {
        let a = auth(SignatureEncoding::Hex, SignatureAlgorithm::HmacSha256);
        assert_eq!(
            a.check("c", Some("alice"), Some(b"pw"), NOW),
            Decision::Ignore
        );
        assert_eq!(a.check("c", None, Some(b"pw"), NOW), Decision::Ignore);
        assert_eq!(
            a.check("c", Some("d|unknown-pk|1"), Some(b"pw"), NOW),
            Decision::Ignore
        );
        assert!(parse_username("a|b|c|d").is_none());
        assert!(parse_username("a|b|12x").is_none());
        assert!(parse_username("|b|12").is_none());
    }

    #[test]
    fn reload_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.toml");
        std::fs::write(&path, "[devices]\nd1 = \"one\"\n").unwrap();
        let a = SignatureAuth::from_config(SignatureConfig {
            secrets: path.clone(),
            algorithm: SignatureAlgorithm::HmacSha256,
            encoding: SignatureEncoding::Hex,
            window_secs: 300,
        })
        .unwrap();
        let u = format!("d1||{NOW}");
        let pw = |s| {
            sign(
                SignatureAlgorithm::HmacSha256,
                SignatureEncoding::Hex,
                s,
                "d1",
                &u,
            )
            .unwrap()
        };
        assert!(matches!(
            a.check("d1", Some(&u), Some(pw("one").as_bytes()), NOW),
            Decision::Allow { .. }
        ));
        std::fs::write(&path, "not = [valid").unwrap();
        assert!(a.reload().is_err());
        std::fs::write(&path, "[devices]\nd1 = \"two\"\n").unwrap();
        a.reload().unwrap();
        assert_eq!(
            a.check("d1", Some(&u), Some(pw("one").as_bytes()), NOW),
            Decision::Deny
        );
        assert!(matches!(
            a.check("d1", Some(&u), Some(pw("two").as_bytes()), NOW),
            Decision::Allow { .. }
        ));
    }
}
