//! Keeping [`Security`] current: which files each reloadable part reads,
//! their modification stamps at the last (attempted) load, and reloading
//! the parts whose files changed (polled by the server) or every part
//! (SIGHUP, admin API). Owns the reload bookkeeping ([`Security`]'s
//! `stamps`, and its `file_bans`: the bans `quota.bans_file` gave). Keeping
//! the old content of one file when its new content is bad is
//! [`super::reload`]'s.

use std::path::PathBuf;

use super::config::SecurityConfig;
use super::loaded::Security;
use super::quota;
use super::reload::{file_stamps, FileStamp};

impl Security {
    /// The files this configuration reads (ACL, password, SCRAM, signature
    /// secrets, JWT keys, TLS certificate / key / CA).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        watched_files(&self.config)
    }

    /// Reload the parts whose files' modification time or size changed
    /// since the last (attempted) load, and log one line saying what was
    /// reloaded. Returns the errors (each names its part and file), or
    /// `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Vec<String>> {
        let parts = reloadable_parts(&self.config);
        let now: Vec<Vec<FileStamp>> = parts.iter().map(|(_, f)| file_stamps(f)).collect();
        let changed: Vec<&'static str> = {
            let mut old = self.stamps.lock();
            let changed = parts
                .iter()
                .zip(&now)
                .enumerate()
                .filter(|(i, (_, stamp))| old.get(*i) != Some(*stamp))
                .map(|(_, ((name, _), _))| *name)
                .collect();
            *old = now;
            changed
        };
        if changed.is_empty() {
            return None;
        }
        Some(self.reload_parts(&changed, "files changed"))
    }

    /// Reload every file (providers, ACL, TLS, SCRAM, bans); the old state
    /// stays for each part that fails. Logs one line; returns the errors.
    pub fn reload(&self) -> Vec<String> {
        self.reload_from("SIGHUP")
    }

    /// [`Security::reload`], logged as triggered by `trigger` (`SIGHUP`,
    /// `admin API`).
    pub fn reload_from(&self, trigger: &str) -> Vec<String> {
        let parts = reloadable_parts(&self.config);
        *self.stamps.lock() = parts.iter().map(|(_, f)| file_stamps(f)).collect();
        let names: Vec<&'static str> = parts.iter().map(|(n, _)| *n).collect();
        self.reload_parts(&names, trigger)
    }

    fn reload_parts(&self, names: &[&'static str], trigger: &str) -> Vec<String> {
        let mut done = Vec::new();
        let mut errs = Vec::new();
        for &name in names {
            match self.reload_part(name) {
                Ok(what) => done.push(what),
                Err(e) => errs.push(format!("{name}: {e}")),
            }
        }
        if !done.is_empty() {
            tracing::info!("security reload ({trigger}): {}", done.join("; "));
        }
        errs
    }

    /// Reload one part; `Ok` describes what is now in force.
    fn reload_part(&self, name: &'static str) -> Result<String, String> {
        let c = &self.config;
        match name {
            "acl" => {
                let n = self.acl.reload().map_err(|e| e.to_string())?;
                let path = c.acl.file.as_deref().unwrap_or(std::path::Path::new(""));
                Ok(format!("acl {} ({n} rules)", path.display()))
            }
            "bans_file" => {
                let n = self.reload_ban_file()?;
                Ok(format!("bans_file ({n} bans)"))
            }
            "tls" => match &self.tls {
                Some(t) => {
                    t.reload().map_err(|e| e.to_string())?;
                    Ok(format!("tls {}", t.config().cert.display()))
                }
                None => Ok("tls".into()),
            },
            "scram" => match &self.scram {
                Some(sc) => {
                    sc.store().reload().map_err(|e| e.to_string())?;
                    Ok("scram".into())
                }
                None => Ok("scram".into()),
            },
            provider => {
                self.chain.reload_one(provider)?;
                Ok(provider.to_string())
            }
        }
    }

    /// Re-read `quota.bans_file`: its bans replace the ones it gave before
    /// (bans from `quota.bans` stay). On error nothing changes.
    fn reload_ban_file(&self) -> Result<usize, String> {
        let Some(f) = &self.config.quota.bans_file else {
            return Ok(0);
        };
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let list = quota::parse_ban_file(&text)?;
        let now = std::time::Instant::now();
        let mut old = self.file_bans.lock();
        for t in old.drain(..) {
            self.bans.unban(&t);
        }
        for (t, d) in list {
            self.bans.ban(t.clone(), d, now);
            old.push(t);
        }
        Ok(old.len())
    }
}

/// The parts that can be reloaded, each with the files it reads (the
/// provider names are those of the chain).
pub(super) fn reloadable_parts(c: &SecurityConfig) -> Vec<(&'static str, Vec<PathBuf>)> {
    let a = &c.auth;
    let mut v: Vec<(&'static str, Vec<PathBuf>)> = Vec::new();
    if let Some(f) = &c.acl.file {
        v.push(("acl", vec![f.clone()]));
    }
    if let Some(f) = &c.quota.bans_file {
        v.push(("bans_file", vec![f.clone()]));
    }
    if let Some(p) = &a.password_file {
        v.push(("password_file", vec![p.path.clone()]));
    }
    if let Some(p) = &a.scram {
        v.push(("scram", vec![p.path.clone()]));
    }
    if let Some(p) = &a.signature {
        v.push(("signature", vec![p.secrets.clone()]));
    }
    if let Some(j) = &a.jwt {
        let files: Vec<PathBuf> = [&j.secret_file, &j.public_key, &j.jwks]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        v.push(("jwt", files));
    }
    if a.http.is_some() {
        v.push(("http", Vec::new())); // no file: SIGHUP clears its cache
    }
    if let Some(t) = &c.tls {
        let mut files = vec![t.cert.clone(), t.key.clone()];
        files.extend(t.ca.clone());
        v.push(("tls", files));
    }
    v
}

fn watched_files(c: &SecurityConfig) -> Vec<PathBuf> {
    let a = &c.auth;
    let mut v: Vec<PathBuf> = Vec::new();
    v.extend(c.acl.file.clone());
    v.extend(c.quota.bans_file.clone());
    v.extend(a.password_file.as_ref().map(|p| p.path.clone()));
    v.extend(a.scram.as_ref().map(|p| p.path.clone()));
    v.extend(a.signature.as_ref().map(|p| p.secrets.clone()));
    if let Some(j) = &a.jwt {
        v.extend(j.secret_file.clone());
        v.extend(j.public_key.clone());
        v.extend(j.jwks.clone());
    }
    if let Some(t) = &c.tls {
        v.push(t.cert.clone());
        v.push(t.key.clone());
        v.extend(t.ca.clone());
    }
    v
}
