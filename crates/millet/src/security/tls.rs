//! TLS for the MQTT-over-TLS listener (default port 8883): a rustls
//! `ServerConfig` from PEM files (TLS 1.2 and 1.3, the `ring` provider),
//! optional client certificates (mTLS) verified against a CA, hot reload,
//! and the identity (CN or SAN) of a client certificate.
//!
//! [`ReloadableTls`] holds the current `Arc<ServerConfig>` behind `arc-swap`:
//! each new handshake takes the config in force at accept time, so
//! [`ReloadableTls::reload`] affects only new connections; a failed reload
//! keeps the old config. [`ReloadableTls::spawn_reload_on_sighup`] and
//! [`ReloadableTls::spawn_watch_files`] trigger reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

use super::reload::{self, FileStamp};

/// Default port of the MQTT-over-TLS listener.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// Which connect field a verified client certificate's identity replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityAs {
    /// Not used (the certificate only authenticates the TLS session).
    None,
    Username,
    ClientId,
}

/// `[security.tls]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain, PEM (leaf first).
    pub cert: PathBuf,
    /// Server private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to. With a
    /// CA and `require_client_cert = false`, a certificate is optional but
    /// verified when presented.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Refuse handshakes without a valid client certificate (needs `ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// Use the client certificate's CN / SAN as the username or client id.
    #[serde(default = "default_identity_as")]
    pub identity_as: IdentityAs,
}

fn default_identity_as() -> IdentityAs {
    IdentityAs::None
}

impl TlsConfig {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
            ca: None,
            require_client_cert: false,
            identity_as: IdentityAs::None,
        }
    }
}

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {msg}")]
    Pem { path: PathBuf, msg: String },
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("require_client_cert needs a CA file (tls.ca)")]
    NoCa,
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |e: rustls_pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// Read the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Build a server config (TLS 1.2 + 1.3) from the files named in `cfg`.
pub fn build_server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &cfg.ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Rustls(format!("CA {}: {e}", ca.display())))?;
            }
            let vb = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let vb = if cfg.require_client_cert {
                vb
            } else {
                vb.allow_unauthenticated()
            };
            let verifier = vb.build().map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None if cfg.require_client_cert => return Err(TlsError::NoCa),
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Rustls(format!(
            "certificate {} and key {}: {e}",
            cfg.cert.display(),
            cfg.key.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// A server config that can be replaced while the listener runs.
#[derive(Debug)]
pub struct ReloadableTls {
    cfg: TlsConfig,
    current: ArcSwap<ServerConfig>,
    stamp: parking_lot::Mutex<Vec<FileStamp>>,
}

impl ReloadableTls {
    /// Build the initial config (errors are fatal here, unlike on reload).
    pub fn new(cfg: TlsConfig) -> Result<ReloadableTls, TlsError> {
        let current = build_server_config(&cfg)?;
        let stamp = parking_lot::Mutex::new(file_stamps(&cfg));
        Ok(ReloadableTls {
            cfg,
            current: ArcSwap::new(current),
            stamp,
        })
    }

    pub fn config(&self) -> &TlsConfig {
        &self.cfg
    }

    /// The config in force (for the next handshake).
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// An acceptor for one new connection, using the config now in force.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current())
    }

    /// Re-read the certificate, key and CA files. On error the previous
    /// config stays in force and the error is logged (and returned).
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.stamp.lock() = file_stamps(&self.cfg);
        // On error the caller logs it, once.
        self.current.store(build_server_config(&self.cfg)?);
        tracing::debug!(cert = %self.cfg.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reload if any of the files' modification time or size changed since
    /// the last (attempted) load. Returns whether a reload was attempted.
    pub fn reload_if_changed(&self) -> bool {
        let now = file_stamps(&self.cfg);
        if *self.stamp.lock() == now {
            return false;
        }
        if let Err(e) = self.reload() {
            tracing::error!(error = %e, "TLS reload failed; previous certificate kept");
        }
        true
    }

    /// Reload on every SIGHUP (Unix), until the returned task is aborted.
    #[cfg(unix)]
    pub fn spawn_reload_on_sighup(self: Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading TLS certificate");
                if let Err(e) = self.reload() {
                    tracing::error!(error = %e, "TLS reload failed; previous certificate kept");
                }
            }
        }))
    }

    /// Poll the files every `every` and reload when they change.
    pub fn spawn_watch_files(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.reload_if_changed();
            }
        })
    }
}

fn file_stamps(cfg: &TlsConfig) -> Vec<FileStamp> {
    reload::file_stamps(
        [Some(&cfg.cert), Some(&cfg.key), cfg.ca.as_ref()]
            .into_iter()
            .flatten(),
    )
}

/// Names found in a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    pub common_name: Option<String>,
    pub dns: Vec<String>,
    pub email: Vec<String>,
}

impl CertNames {
    /// The identity: the CN, else the first DNS SAN, else the first email SAN.
    pub fn identity(&self) -> Option<String> {
        self.common_name
            .clone()
            .or_else(|| self.dns.first().cloned())
            .or_else(|| self.email.first().cloned())
    }
}

/// The subject CN and the DNS / email SANs of a DER certificate.
pub fn cert_names(der: &[u8]) -> Option<CertNames> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = CertNames {
        common_name: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .filter(|s| !s.is_empty()),
        ..Default::default()
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.dns.push(d.to_string()),
                GeneralName::RFC822Name(e) => names.email.push(e.to_string()),
                _ => {}
            }
        }
    }
    Some(names)
}

/// The identity of a DER certificate: CN, else first DNS SAN, else first
/// email SAN.
pub fn cert_identity(der: &[u8]) -> Option<String> {
    cert_names(der)?.identity()
}

/// The identity of a (verified) client certificate on a server connection.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<String> {
    cert_identity(conn.peer_certificates()?.first()?.as_ref())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsConnector;

    type R<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

    pub struct Pki {
        pub dir: tempfile::TempDir,
        issuer: Issuer<'static, KeyPair>,
        pub ca_pem: String,
    }

    pub struct Issued {
        pub cert_pem: String,
        pub key_pem: String,
        pub der: Vec<u8>,
    }

    impl Pki {
        pub fn new() -> R<Pki> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(DnType::CommonName, "Millet Test CA");
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca = p.self_signed(&key)?;
            Ok(Pki {
                dir: tempfile::tempdir()?,
                ca_pem: ca.pem(),
                issuer: Issuer::new(p, key),
            })
        }

        pub fn issue(&self, cn: Option<&str>, sans: Vec<SanType>, server: bool) -> R<Issued> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.subject_alt_names = sans;
            p.distinguished_name = DistinguishedName::new();
            if let Some(cn) = cn {
                p.distinguished_name.push(DnType::CommonName, cn);
            }
            p.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let cert = p.signed_by(&key, &self.issuer)?;
            Ok(Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().to_vec(),
            })
        }

        pub fn write(&self, name: &str, text: &str) -> R<PathBuf> {
            let p = self.dir.path().join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        }

        /// Server cert for "localhost" + CA written to files; config with mTLS off.
        pub fn server_config(&self) -> R<(TlsConfig, Issued)> {
            let s = self.issue(
                Some("localhost"),
                vec![SanType::DnsName("localhost".try_into()?)],
                true,
            )?;
            let cert = self.write("server.pem", &s.cert_pem)?;
            let key = self.write("server.key", &s.key_pem)?;
            self.write("ca.pem", &self.ca_pem)?;
            Ok((TlsConfig::new(cert, key), s))
        }

        pub fn client_config(&self, client: Option<&Issued>) -> R<rustls::ClientConfig> {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
                roots.add(c?)?;
            }
            let b = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots);
            Ok(match client {
                Some(c) => {
                    let certs = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                        .collect::<Result<Vec<_>, _>>()?;
                    let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())?;
                    b.with_client_auth_cert(certs, key)?
                }
                None => b.with_no_client_auth(),
            })
        }
    }

    /// One handshake: returns (server side result: peer identity, client
    /// side: server leaf cert DER). Server errors come back as Err.
    async fn handshake(
        tls: &ReloadableTls,
        client: rustls::ClientConfig,
    ) -> R<(Option<String>, Vec<u8>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tls.acceptor();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut s = acceptor.accept(tcp).await?;
            let id = peer_identity(s.get_ref().1);
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            s.write_all(&buf).await?;
            s.flush().await?;
            Ok::<_, std::io::Error>(id)
        });
        let tcp = TcpStream::connect(addr).await?;
        let connector = TlsConnector::from(Arc::new(client));
        let client_side = async {
            let mut c = connector
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?;
            let leaf = c
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|v| v.first())
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default();
            c.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(leaf)
        };
        let client_res = client_side.await;
        let id = server.await??;
        Ok((id, client_res?))
    }

    #[tokio::test]
    async fn handshake_without_client_cert() -> R {
        let pki = Pki::new()?;
        let (cfg, server) = pki.server_config()?;
        let tls = ReloadableTls::new(cfg)?;
        let (id, leaf) = handshake(&tls, pki.client_config(None)?).await?;
        assert_eq!(id, None);
        assert_eq!(leaf, server.der);
        Ok(())
    }

    #[tokio::test]
    async fn tls12_only_client_is_accepted() -> R {
        let pki = Pki::new()?;
        let (cfg, _) = pki.server_config()?;
        let tls = ReloadableTls::new(cfg)?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        handshake(&tls, client).await?;
        Ok(())
    }

    #[tokio::test]
    async fn mtls_required_accepts_valid_and_refuses_missing_or_foreign() -> R {
        let pki = Pki::new()?;
        let (mut cfg, _) = pki.server_config()?;
        cfg.ca = Some(pki.dir.path().join("ca.pem"));
        cfg.require_client_cert = true;
        let tls = ReloadableTls::new(cfg)?;

        let dev = pki.issue(Some("device-7"), vec![], false)?;
        let (id, _) = handshake(&tls, pki.client_config(Some(&dev))?).await?;
        assert_eq!(id.as_deref(), Some("device-7"));

        assert!(handshake(&tls, pki.client_config(None)?).await.is_err());

        let other = Pki::new()?;
        let foreign = other.issue(Some("intruder"), vec![], false)?;
        assert!(handshake(&tls, pki.client_config(Some(&foreign))?)
            .await
            .is_err());
        Ok(())
    }

    #[tokio::test]
    async fn mtls_optional_allows_anonymous_but_verifies_presented() -> R {
        let pki = Pki::new()?;
        let (mut cfg, _) = pki.server_config()?;
        cfg.ca = Some(pki.dir.path().join("ca.pem"));
        let tls = ReloadableTls::new(cfg)?;
        let (id, _) = handshake(&tls, pki.client_config(None)?).await?;
        assert_eq!(id, None);
        let dev = pki.issue(
            None,
            vec![SanType::DnsName("dev.example".try_into()?)],
            false,
        )?;
        let (id, _) = handshake(&tls, pki.client_config(Some(&dev))?).await?;
        assert_eq!(id.as_deref(), Some("dev.example"));
        let other = Pki::new()?;
        let foreign = other.issue(Some("intruder"), vec![], false)?;
        assert!(handshake(&tls, pki.client_config(Some(&foreign))?)
            .await
            .is_err());
        Ok(())
    }

    #[test]
    fn require_client_cert_needs_ca() -> R {
        let pki = Pki::new()?;
        let (mut cfg, _) = pki.server_config()?;
        cfg.require_client_cert = true;
        assert!(matches!(build_server_config(&cfg), Err(TlsError::NoCa)));
        Ok(())
    }

    #[test]
    fn identity_extraction() -> R {
        let pki = Pki::new()?;
        let both = pki.issue(
            Some("cn-name"),
            vec![SanType::DnsName("dns-name".try_into()?)],
            false,
        )?;
        assert_eq!(cert_identity(&both.der).as_deref(), Some("cn-name"));
        let names = cert_names(&both.der).ok_or("parse")?;
        assert_eq!(names.dns, vec!["dns-name".to_string()]);
        let email = pki.issue(
            None,
            vec![SanType::Rfc822Name("dev@example.com".try_into()?)],
            false,
        )?;
        assert_eq!(
            cert_identity(&email.der).as_deref(),
            Some("dev@example.com")
        );
        let none = pki.issue(None, vec![], false)?;
        assert_eq!(cert_identity(&none.der), None);
        assert_eq!(cert_identity(b"not a certificate"), None);
        Ok(())
    }

    #[tokio::test]
    async fn reload_switches_certificate_and_keeps_old_on_error() -> R {
        let pki = Pki::new()?;
        let (cfg, first) = pki.server_config()?;
        let tls = Arc::new(ReloadableTls::new(cfg.clone())?);

        // An established connection that must survive the reload.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tls.acceptor();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut s = acceptor.accept(tcp).await?;
            let mut buf = [0u8; 1];
            loop {
                if s.read(&mut buf).await? == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                s.write_all(&buf).await?;
            }
        });
        let connector = TlsConnector::from(Arc::new(pki.client_config(None)?));
        let mut old = connector
            .connect(
                ServerName::try_from("localhost")?,
                TcpStream::connect(addr).await?,
            )
            .await?;
        old.write_all(b"a").await?;
        let mut b = [0u8; 1];
        old.read_exact(&mut b).await?;

        let (_, leaf) = handshake(&tls, pki.client_config(None)?).await?;
        assert_eq!(leaf, first.der);

        // New certificate: the next handshake sees it.
        let second = pki.issue(
            Some("localhost"),
            vec![SanType::DnsName("localhost".try_into()?)],
            true,
        )?;
        std::fs::write(&cfg.cert, &second.cert_pem)?;
        std::fs::write(&cfg.key, &second.key_pem)?;
        tls.reload()?;
        let (_, leaf) = handshake(&tls, pki.client_config(None)?).await?;
        assert_eq!(leaf, second.der);

        // Broken files: reload fails, the second certificate stays.
        std::fs::write(&cfg.cert, "garbage")?;
        assert!(tls.reload().is_err());
        let (_, leaf) = handshake(&tls, pki.client_config(None)?).await?;
        assert_eq!(leaf, second.der);

        // The old connection still works.
        old.write_all(b"z").await?;
        old.read_exact(&mut b).await?;
        assert_eq!(&b, b"z");
        old.shutdown().await?;
        drop(old);
        server.await??;
        Ok(())
    }

    #[tokio::test]
    async fn file_watch_reloads_on_change() -> R {
        let pki = Pki::new()?;
        let (cfg, _) = pki.server_config()?;
        let tls = ReloadableTls::new(cfg.clone())?;
        assert!(!tls.reload_if_changed());
        let second = pki.issue(
            Some("localhost"),
            vec![SanType::DnsName("localhost".try_into()?)],
            true,
        )?;
        // A different length guarantees a different stamp even within one mtime tick.
        std::fs::write(&cfg.cert, format!("{}\n\n", second.cert_pem))?;
        std::fs::write(&cfg.key, &second.key_pem)?;
        assert!(tls.reload_if_changed());
        let (_, leaf) = handshake(&tls, pki.client_config(None)?).await?;
        assert_eq!(leaf, second.der);
        Ok(())
    }
}
