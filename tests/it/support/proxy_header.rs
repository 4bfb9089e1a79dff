//! A backend that reads the PROXY protocol header (HAProxy's specification, v1 and v2)
//! each connection starts with and answers with what it says, then echoes the rest.
//! Written for the tests from the specification, apart from the product's own parser,
//! so a mistake in one is not hidden by the same mistake in the other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Backend;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What one connection's header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// "v1" or "v2".
    pub version: &'static str,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Reads one header from `s`; returns it and the bytes read past it.
async fn read_header(s: &mut TcpStream) -> Result<(Seen, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "closed before a header: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((version, source, destination, len)) = parse(&buf)? {
            let seen = Seen {
                version,
                source,
                destination,
            };
            return Ok((seen, buf[len..].to_vec()));
        }
    }
}

/// `Some((version, source, destination, header length))` once a whole header is in.
fn parse(buf: &[u8]) -> Result<Option<(&'static str, SocketAddr, SocketAddr, usize)>, String> {
    if buf.len() >= 12 && &buf[..12] == SIGNATURE {
        if buf.len() < 16 {
            return Ok(None);
        }
        if buf[12] != 0x21 {
            return Err(format!(
                "v2 version/command byte {:#04x}, not PROXY (0x21)",
                buf[12]
            ));
        }
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if buf.len() < 16 + len {
            return Ok(None);
        }
        let a = &buf[16..16 + len];
        let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
        let (src, dst) = match buf[13] {
            0x11 if len >= 12 => (
                SocketAddr::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(), port(8)),
                SocketAddr::new(Ipv4Addr::new(a[4], a[5], a[6], a[7]).into(), port(10)),
            ),
            0x21 if len >= 36 => {
                let ip = |i: usize| {
                    let o: [u8; 16] = a[i..i + 16].try_into().unwrap();
                    IpAddr::V6(Ipv6Addr::from(o))
                };
                (
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                )
            }
            other => {
                return Err(format!(
                    "v2 family/transport byte {other:#04x} with {len} bytes"
                ));
            }
        };
        return Ok(Some(("v2", src, dst, 16 + len)));
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > 107 {
            return Err("no CRLF within 107 bytes".into());
        }
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
    let parts: Vec<&str> = line.split(' ').collect();
    let [proxy, family, src, dst, sport, dport] = parts[..] else {
        return Err(format!("v1 line {line:?} has not six fields"));
    };
    let ip: IpAddr = match (proxy, family) {
        ("PROXY", "TCP4") => src
            .parse::<Ipv4Addr>()
            .map_err(|e| format!("{line:?}: {e}"))?
            .into(),
        ("PROXY", "TCP6") => src
            .parse::<Ipv6Addr>()
            .map_err(|e| format!("{line:?}: {e}"))?
            .into(),
        _ => return Err(format!("v1 line {line:?}")),
    };
    let dip: IpAddr = dst.parse().map_err(|e| format!("{line:?}: {e}"))?;
    if ip.is_ipv4() != dip.is_ipv4() {
        return Err(format!("v1 line {line:?} mixes families"));
    }
    let p = |s: &str| s.parse::<u16>().map_err(|e| format!("{line:?}: {e}"));
    Ok(Some((
        "v1",
        SocketAddr::new(ip, p(sport)?),
        SocketAddr::new(dip, p(dport)?),
        end + 2,
    )))
}

/// A backend on `bind` that expects a PROXY header on every connection: it answers
/// `SRC <source> DST <destination> <version>\n`, then echoes what follows until EOF. A
/// connection without a valid header is answered `BAD <why>\n` and closed. Every
/// connection's header is also recorded, in order.
pub async fn backend(bind: &str) -> (Backend, Arc<Mutex<Vec<Result<Seen, String>>>>) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                match read_header(&mut s).await {
                    Ok((header, rest)) => {
                        let line = format!(
                            "SRC {} DST {} {}\n",
                            header.source, header.destination, header.version
                        );
                        record.lock().unwrap().push(Ok(header));
                        if s.write_all(line.as_bytes()).await.is_err()
                            || s.write_all(&rest).await.is_err()
                        {
                            return;
                        }
                        let (mut rd, mut wr) = s.split();
                        let _ = tokio::io::copy(&mut rd, &mut wr).await;
                        let _ = wr.shutdown().await;
                    }
                    Err(why) => {
                        record.lock().unwrap().push(Err(why.clone()));
                        let _ = s.write_all(format!("BAD {why}\n").as_bytes()).await;
                    }
                }
            });
        }
    });
    (Backend::from_task(addr, task), seen)
}
