//! Password file: `username:$argon2id$v=19$m=...,t=...,p=...$salt$hash`, one
//! entry per line; blank lines and lines starting with `#` are comments (kept
//! as they are when the file is rewritten). Only argon2id PHC hashes are
//! stored, never a plain-text password.
//!
//! Managed with `millet passwd FILE USER [--password PW | --delete]`
//! ([`crate::tools`]): without `--password` the password is prompted for
//! (twice, without echo) on a terminal, else read from standard input.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use super::reload::ReloadableFile;
use super::Decision;
use crate::tools::{valid_username, UserFile};

/// Password file errors.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error("invalid username {0:?} (empty, or contains ':' or a line break)")]
    BadUsername(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// The parsed file, with comments and order preserved.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    file: UserFile,
}

/// Hash `password` with argon2id and the default (OWASP) parameters.
pub fn hash_password(password: &str) -> Result<String, PasswdError> {
    hash_password_with(password, Params::default())
}

/// Hash `password` with argon2id and the given cost parameters.
pub fn hash_password_with(password: &str, params: Params) -> Result<String, PasswdError> {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    let salt = SaltString::encode_b64(&bytes).map_err(|e| PasswdError::Hash(e.to_string()))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswdError::Hash(e.to_string()))
}

/// Verify `password` against a PHC hash string (argon2id only). The
/// comparison is constant-time (done by the `argon2` crate).
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return false;
    }
    Argon2::default().verify_password(password, &parsed).is_ok()
}

/// A fixed hash verified against when the user does not exist, so that an
/// unknown user costs as much time as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password("millet-dummy-password").unwrap_or_default())
}

fn check_username(user: &str) -> Result<(), PasswdError> {
    if !valid_username(user) {
        return Err(PasswdError::BadUsername(user.to_string()));
    }
    Ok(())
}

/// Check that `hash` is an argon2id PHC string.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("bad hash: {e}"))?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err("only $argon2id$ hashes are accepted".into());
    }
    Ok(())
}

impl PasswordFile {
    /// Parse the file's text.
    pub fn parse(text: &str) -> Result<PasswordFile, PasswdError> {
        let file = UserFile::parse(text, check_hash)
            .map_err(|(line, msg)| PasswdError::Parse { line, msg })?;
        Ok(PasswordFile { file })
    }

    /// Read and parse `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        PasswordFile::parse(&text)
    }

    /// Write the file atomically (temporary file + rename), mode 0600 on Unix.
    pub fn save(&self, path: &Path) -> Result<(), PasswdError> {
        self.file.save(path).map_err(|source| PasswdError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        self.file.render()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.file.len()
    }

    pub fn is_empty(&self) -> bool {
        self.file.is_empty()
    }

    /// The stored hash for `user`.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.file.get(user)
    }

    /// Add or replace `user` with a fresh argon2id hash of `password`.
    pub fn set_password(&mut self, user: &str, password: &str) -> Result<(), PasswdError> {
        check_username(user)?;
        let hash = hash_password(password)?;
        self.set_hash(user, hash)
    }

    /// Add or replace `user` with an existing argon2id PHC hash.
    pub fn set_hash(&mut self, user: &str, hash: String) -> Result<(), PasswdError> {
        check_username(user)?;
        check_hash(&hash).map_err(|_| PasswdError::Hash("not an argon2id PHC string".into()))?;
        self.file.set(user, hash);
        Ok(())
    }

    /// Remove `user`; `false` if absent.
    pub fn remove(&mut self, user: &str) -> bool {
        self.file.remove(user)
    }

    /// Verify a user's password (CPU-heavy: call from a blocking thread).
    /// An unknown user costs as much as a wrong password.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.hash_of(user) {
            Some(h) => verify_password(h, password),
            None => {
                let _ = verify_password(dummy_hash(), password);
                false
            }
        }
    }
}

/// The password-file authentication provider: the parsed file behind
/// `arc-swap`, reloadable.
#[derive(Debug)]
pub struct PasswordStore {
    file: ReloadableFile<PasswordFile, PasswdError>,
}

impl PasswordStore {
    pub fn new(file: PasswordFile) -> PasswordStore {
        PasswordStore {
            file: ReloadableFile::fixed(file),
        }
    }

    pub fn from_file(path: impl Into<PathBuf>) -> Result<PasswordStore, PasswdError> {
        Ok(PasswordStore {
            file: ReloadableFile::open(path, PasswordFile::load)?,
        })
    }

    /// Re-read the file; on error the old entries stay in force.
    pub fn reload(&self) -> Result<(), PasswdError> {
        // On error the caller logs it, once.
        self.file.reload().map(drop)
    }

    pub fn current(&self) -> Arc<PasswordFile> {
        self.file.load_full()
    }

    /// Blocking check (argon2 is CPU-heavy; the chain runs this on
    /// `spawn_blocking`). No username or password → ignore; a user not in
    /// the file → ignore; a wrong password → deny.
    pub fn check(&self, username: Option<&str>, password: Option<&[u8]>) -> Decision {
        let (Some(user), Some(pw)) = (username, password) else {
            return Decision::Ignore;
        };
        let file = self.file.load();
        if file.hash_of(user).is_none() {
            // equalise timing with a wrong password, then let others decide
            let _ = file.verify(user, pw);
            return Decision::Ignore;
        }
        if file.verify(user, pw) {
            Decision::allow()
        } else {
            Decision::Deny
        }
    }
}

/// `millet passwd FILE USER [--password PW | --delete]` with `args` after
/// the subcommand name and the password (without `--password`) read from
/// the first line of `input`; see [`crate::tools`].
pub fn run_passwd_cli_with(args: &[String], input: &mut dyn BufRead) -> Result<(), String> {
    crate::tools::run(
        &crate::tools::PASSWD,
        args,
        crate::tools::PasswordInput::Lines(input),
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap(pw: &str) -> String {
        let params = Params::new(64, 1, 1, None).unwrap();
        hash_password_with(pw, params).unwrap()
    }

    #[test]
    fn parse_verify_and_edit_preserving_comments() {
        let text = format!(
            "# users\nalice:{}\n\nbob:{}\n",
            cheap("wonderland"),
            cheap("builder")
        );
        let mut f = PasswordFile::parse(&text).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.verify("alice", b"wonderland"));
        assert!(!f.verify("alice", b"builder"));
        assert!(f.verify("bob", b"builder"));
        assert!(!f.verify("carol", b"x"));
        assert_eq!(f.render(), text);

        f.set_hash("carol", cheap("c")).unwrap();
        f.set_hash("alice", cheap("new")).unwrap();
        assert!(f.remove("bob"));
        assert!(!f.remove("bob"));
        let f2 = PasswordFile::parse(&f.render()).unwrap();
        assert!(f2.verify("alice", b"new"));
        assert!(!f2.verify("alice", b"wonderland"));
        assert!(f2.verify("carol", b"c"));
        assert!(f2.hash_of("bob").is_none());
        assert!(f2.render().starts_with("# users\n"));
        assert!(!f2.render().contains("new\n"));
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(PasswordFile::parse("alice\n").is_err());
        assert!(PasswordFile::parse("alice:plaintext\n").is_err());
        let argon2i = "$argon2i$v=19$m=64,t=1,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(PasswordFile::parse(&format!("alice:{argon2i}\n")).is_err());
        let h = cheap("x");
        assert!(PasswordFile::parse(&format!("a:{h}\na:{h}\n")).is_err());
        let mut f = PasswordFile::default();
        assert!(f.set_hash("a:b", h.clone()).is_err());
        assert!(f.set_hash("", h).is_err());
    }

    #[test]
    fn store_check_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, format!("alice:{}\n", cheap("pw"))).unwrap();
        let store = PasswordStore::from_file(&path).unwrap();
        assert!(matches!(
            store.check(Some("alice"), Some(b"pw")),
            Decision::Allow { .. }
        ));
        assert_eq!(store.check(Some("alice"), Some(b"no")), Decision::Deny);
        assert_eq!(store.check(Some("bob"), Some(b"pw")), Decision::Ignore);
        assert_eq!(store.check(None, Some(b"pw")), Decision::Ignore);
        assert_eq!(store.check(Some("alice"), None), Decision::Ignore);
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(store.reload().is_err());
        assert!(matches!(
            store.check(Some("alice"), Some(b"pw")),
            Decision::Allow { .. }
        ));
        std::fs::write(&path, format!("bob:{}\n", cheap("pw2"))).unwrap();
        store.reload().unwrap();
        assert_eq!(store.check(Some("alice"), Some(b"pw")), Decision::Ignore);
        assert!(matches!(
            store.check(Some("bob"), Some(b"pw2")),
            Decision::Allow { .. }
        ));
    }
}
