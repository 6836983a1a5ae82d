//! Integration-style tests of the security layer through its public API:
//! a full `Security` built from TOML with real files, the provider chain in
//! order, per-client ACL rules flowing into the ACL check, SCRAM as the
//! broker's `Authenticator`, and the `millet passwd` entry point.

use std::path::Path;
use std::sync::Arc;

use millet::auth::{AuthStep, Authenticator};
use millet::broker::AuthFailure;
use millet::security::acl::{Action, Rule};
use millet::security::scram::{ScramStore, SCRAM_SHA_256};
use millet::security::signature::{self, SignatureAlgorithm, SignatureEncoding};
use millet::security::{AuthResult, ConnectRequest, ListenerPolicy, Security, SecurityConfig};

type R = Result<(), Box<dyn std::error::Error>>;

fn req(client_id: &str, user: Option<&str>, pw: Option<&[u8]>) -> ConnectRequest {
    ConnectRequest {
        client_id: client_id.into(),
        username: user.map(String::from),
        password: pw.map(<[u8]>::to_vec),
        peer: "127.0.0.1:50000".parse().unwrap_or_else(|_| unreachable!()),
        protocol: 5,
        tls_identity: None,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String, std::io::Error> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.to_string_lossy().into_owned())
}

#[tokio::test]
async fn full_chain_from_toml() -> R {
    let dir = tempfile::tempdir()?;
    let passwd = dir.path().join("passwd");
    millet::security::passwd::run_passwd_cli_with(
        &[
            passwd.to_string_lossy().into_owned(),
            "alice".into(),
            "--password".into(),
            "wonderland".into(),
        ],
        &mut &b""[..],
    )?;
    let secrets = write(
        dir.path(),
        "secrets.toml",
        "[devices]\ndev-1 = \"dev-secret\"\n",
    )?;
    let acl = write(
        dir.path(),
        "acl.toml",
        r#"
[[rules]]
permission = "allow"
action = "all"
username = "alice"
topics = ["users/%u/#"]
"#,
    )?;
    let cfg = SecurityConfig::from_toml(&format!(
        r#"
[auth]
chain = ["password_file", "signature", "jwt"]
[auth.password_file]
path = "{}"
[auth.signature]
secrets = "{secrets}"
[auth.jwt]
algorithm = "HS256"
secret = "jwt-key"
[acl]
file = "{acl}"
[quota]
max_connections_per_user = 1
"#,
        passwd.display()
    ))?;
    let sec = Security::from_config(cfg)?;
    let lo = "127.0.0.1:1883".parse()?;
    assert_eq!(sec.listener_policy(lo), ListenerPolicy::Authenticated);

    // password file
    let (_, r) = sec
        .authenticate(req("c1", Some("alice"), Some(b"wonderland")), lo)
        .await;
    let AuthResult::Allow { acl: extra, .. } = r else {
        return Err("alice refused".into());
    };
    assert!(sec
        .acl
        .check_publish("c1", Some("alice"), &extra, "users/alice/x"));
    assert!(!sec
        .acl
        .check_publish("c1", Some("alice"), &extra, "users/bob/x"));
    let (_, r) = sec
        .authenticate(req("c1", Some("alice"), Some(b"wrong")), lo)
        .await;
    assert_eq!(r, AuthResult::Deny(None));

    // device signature
    let now = signature::unix_now_ms();
    let user = format!("dev-1||{now}");
    let pw = signature::sign(
        SignatureAlgorithm::HmacSha256,
        SignatureEncoding::Hex,
        "dev-secret",
        "dev-1",
        &user,
    )
    .ok_or("sign")?;
    let (_, r) = sec
        .authenticate(req("dev-1", Some(&user), Some(pw.as_bytes())), lo)
        .await;
    assert!(matches!(r, AuthResult::Allow { .. }));

    // JWT with topic claims → per-client rules
    let exp = now / 1000 + 60;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"exp": exp, "sub": "whoever", "publish": ["t/%c"]}),
        &jsonwebtoken::EncodingKey::from_secret(b"jwt-key"),
    )?;
    let (_, r) = sec
        .authenticate(req("j1", Some("whoever"), Some(token.as_bytes())), lo)
        .await;
    assert_eq!(
        r,
        AuthResult::Allow {
            acl: vec![Rule::allow(Action::Publish, vec!["t/%c".into()])],
            // the token's exp plus the default 30 s leeway: the connection
            // is closed then
            valid_until: Some(exp + 30),
        }
    );
    let AuthResult::Allow { acl: extra, .. } = r else {
        unreachable!()
    };
    assert!(sec.acl.check_publish("j1", Some("whoever"), &extra, "t/j1"));
    assert!(!sec
        .acl
        .check_subscribe("j1", Some("whoever"), &extra, "t/j1"));

    // refused tokens say why (the `reason` label of /metrics)
    for (key, exp, why) in [
        (&b"jwt-key"[..], now / 1000 - 3600, AuthFailure::JwtExpired),
        (&b"other-key"[..], now / 1000 + 60, AuthFailure::JwtInvalid),
    ] {
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"exp": exp, "sub": "whoever"}),
            &jsonwebtoken::EncodingKey::from_secret(key),
        )?;
        let (_, r) = sec
            .authenticate(req("j2", Some("whoever"), Some(token.as_bytes())), lo)
            .await;
        assert_eq!(r, AuthResult::Deny(Some(why)));
    }

    // nobody recognises plain unknown credentials → deny at end of chain
    let (_, r) = sec
        .authenticate(req("x", Some("eve"), Some(b"pw")), lo)
        .await;
    assert_eq!(r, AuthResult::Deny(Some(AuthFailure::NotAuthorized)));
    let (_, r) = sec.authenticate(req("x", None, None), lo).await;
    assert_eq!(r, AuthResult::Deny(Some(AuthFailure::NotAuthorized)));

    // per-user connection limit
    let permit = sec.user_connections.try_acquire("alice");
    assert!(permit.is_some());
    assert!(sec.user_connections.try_acquire("alice").is_none());
    drop(permit);
    assert!(sec.user_connections.try_acquire("alice").is_some());

    // reload: a broken ACL keeps the old rules, and reports the error
    std::fs::write(&acl, "[[[")?;
    let errs = sec.reload();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(sec
        .acl
        .check_publish("c1", Some("alice"), &[], "users/alice/x"));
    Ok(())
}

#[tokio::test]
async fn default_config_is_anonymous_on_loopback_only() -> R {
    let sec = Security::from_config(SecurityConfig::default())?;
    let (_, r) = sec
        .authenticate(req("c", None, None), "127.0.0.1:1883".parse()?)
        .await;
    assert_eq!(
        r,
        AuthResult::Allow {
            acl: vec![],
            valid_until: None
        }
    );
    let (_, r) = sec
        .authenticate(req("c", None, None), "0.0.0.0:1883".parse()?)
        .await;
    assert_eq!(r, AuthResult::Deny(Some(AuthFailure::NotAuthorized)));
    Ok(())
}

#[test]
fn scram_is_an_authenticator() -> R {
    let store = ScramStore::default();
    store.set_password("user", b"pencil", 4096)?;
    let auth: Arc<dyn Authenticator> = Arc::new(millet::security::scram::ScramAuthenticator::new(
        Arc::new(store),
    ));
    assert!(auth.start("PLAIN", "c").is_none());
    let mut ex = auth.start(SCRAM_SHA_256, "c").ok_or("no exchange")?;
    // A client-first with a bad gs2 header fails immediately.
    assert_eq!(ex.step(Some(b"x,,n=user,r=abc")), AuthStep::Failure);
    let mut ex = auth.start(SCRAM_SHA_256, "c").ok_or("no exchange")?;
    assert!(matches!(
        ex.step(Some(b"n,,n=user,r=abcdef")),
        AuthStep::Continue(_)
    ));
    Ok(())
}
