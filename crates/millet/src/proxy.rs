//! PROXY protocol v1 (text) and v2 (binary), HAProxy's header that an L4
//! load balancer puts before a connection's bytes to say who the client is.
//!
//! Opt-in per listener (`proxy_protocol_listeners`): on such a listener
//! every connection must start with a header (either version), read before
//! anything else (TLS, the WebSocket upgrade, MQTT) within `connect_timeout`;
//! a connection without one is closed. The header's source address then is
//! the client's address everywhere (logs, bans, the admin API). A v2 `LOCAL`
//! header (the balancer's own health check) and v1 `UNKNOWN` keep the
//! connection's own address. Parsing is `ppp`'s; this module only reads
//! exactly the header's bytes off the stream, never more.

use std::fmt;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (12 bytes); a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest v2 header we accept: addresses and TLVs, the 16-byte fixed
/// part included. Load balancers send a few dozen bytes of TLVs; this keeps
/// the header within a connection's free pre-authentication allowance.
pub const V2_MAX: usize = 4096;

/// Why a connection on a PROXY-protocol listener was refused.
#[derive(Debug)]
pub enum ProxyError {
    /// Closed before sending anything (a port probe, a TCP health check).
    Closed,
    /// The first bytes are no PROXY header.
    Missing,
    /// A header that does not parse, or is too long.
    Invalid(String),
    Io(std::io::Error),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Closed => write!(f, "closed before sending anything"),
            ProxyError::Missing => write!(f, "no PROXY protocol header"),
            ProxyError::Invalid(why) => write!(f, "invalid PROXY protocol header: {why}"),
            ProxyError::Io(e) => write!(f, "connection failed before its PROXY header: {e}"),
        }
    }
}

impl From<std::io::Error> for ProxyError {
    fn from(e: std::io::Error) -> Self {
        ProxyError::Io(e)
    }
}

/// Read a v1 or v2 header from `stream` (exactly its bytes) and return the
/// client's address: the header's source, or `peer` (the connection's own
/// address) for v2 `LOCAL`, v1 `UNKNOWN` and address families without one.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    // Both versions are at least 15 bytes long (v1 `PROXY UNKNOWN\r\n`):
    // 12 bytes tell them apart, and a first byte of neither ends the wait.
    let mut buf = vec![0u8; 12];
    let mut got = 0;
    while got < buf.len() {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                ProxyError::Closed
            } else {
                ProxyError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
        let seen = &buf[..got];
        let v1 = b"PROXY ";
        if !V2_SIGNATURE.starts_with(seen) && !v1.starts_with(&seen[..got.min(v1.len())]) {
            return Err(ProxyError::Missing);
        }
    }
    if buf == V2_SIGNATURE {
        buf.resize(16, 0);
        stream.read_exact(&mut buf[12..]).await?;
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > V2_MAX {
            return Err(ProxyError::Invalid(format!(
                "v2 header of {len} bytes (at most {V2_MAX})"
            )));
        }
        buf.resize(len, 0);
        stream.read_exact(&mut buf[16..]).await?;
        return v2_source(&buf, peer);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyError::Missing);
    }
    // v1: up to CRLF, a byte at a time so that nothing after it is read.
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Invalid(format!(
                "v1 header longer than {V1_MAX} bytes"
            )));
        }
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await?;
        buf.push(b[0]);
    }
    v1_source(&buf, peer)
}

fn v1_source(buf: &[u8], peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    use ppp::v1::{Addresses, Header};
    let h = Header::try_from(buf).map_err(|e| ProxyError::Invalid(format!("v1: {e}")))?;
    Ok(match h.addresses {
        Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::Unknown => peer,
    })
}

fn v2_source(buf: &[u8], peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    use ppp::v2::{Addresses, Command, Header};
    let h = Header::try_from(buf).map_err(|e| ProxyError::Invalid(format!("v2: {e}")))?;
    if h.command == Command::Local {
        return Ok(peer);
    }
    Ok(match h.addresses {
        Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::Unspecified | Addresses::Unix(_) => peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.1:9000".parse().unwrap()
    }

    async fn read(bytes: &[u8]) -> (Result<SocketAddr, ProxyError>, Vec<u8>) {
        let mut s = bytes;
        let r = read_header(&mut s, peer()).await;
        (r, s.to_vec())
    }

    fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[tokio::test]
    async fn v1_headers_give_the_source_and_leave_the_rest() {
        let (r, rest) = read(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 1883\r\n\x10\x0c").await;
        assert_eq!(r.unwrap(), "203.0.113.7:40000".parse().unwrap());
        assert_eq!(rest, b"\x10\x0c");
        let (r, _) = read(b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 1883\r\n").await;
        assert_eq!(r.unwrap(), "[2001:db8::5]:5555".parse().unwrap());
        let (r, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(r.unwrap(), peer());
    }

    #[tokio::test]
    async fn v2_headers_give_the_source_and_leave_the_rest() {
        let mut h = v2(
            1,
            0x11,
            &[203, 0, 113, 8, 192, 0, 2, 1, 0x9c, 0x40, 0x07, 0x5b],
        );
        h.extend_from_slice(b"\x10\x0c");
        let (r, rest) = read(&h).await;
        assert_eq!(r.unwrap(), "203.0.113.8:40000".parse().unwrap());
        assert_eq!(rest, b"\x10\x0c");
        // LOCAL (a health check): the connection's own address.
        let (r, _) = read(&v2(0, 0x00, &[])).await;
        assert_eq!(r.unwrap(), peer());
    }

    #[tokio::test]
    async fn missing_broken_and_oversized_headers_are_refused() {
        let (r, _) = read(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00").await;
        assert!(matches!(r, Err(ProxyError::Missing)), "{r:?}");
        let (r, _) = read(b"PROXY TCP4 nonsense here 1 2\r\n").await;
        assert!(matches!(r, Err(ProxyError::Invalid(_))), "{r:?}");
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        let (r, _) = read(&long).await;
        assert!(matches!(r, Err(ProxyError::Invalid(_))), "{r:?}");
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (r, _) = read(&big).await;
        assert!(matches!(r, Err(ProxyError::Invalid(_))), "{r:?}");
        let (r, _) = read(b"PROXY TCP4 1.2.3.4").await;
        assert!(matches!(r, Err(ProxyError::Io(_))), "{r:?}");
        let (r, _) = read(b"PRO").await;
        assert!(matches!(r, Err(ProxyError::Io(_))), "{r:?}");
        let (r, _) = read(b"").await;
        assert!(matches!(r, Err(ProxyError::Closed)), "{r:?}");
        // Refused from the first byte that fits neither version.
        let (r, _) = read(b"\x10").await;
        assert!(matches!(r, Err(ProxyError::Missing)), "{r:?}");
    }
}
