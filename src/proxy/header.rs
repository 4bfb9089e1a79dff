//! The PROXY protocol on a connection's sockets: reading a trusted upstream's header
//! from the client, and writing ours to the backend ahead of the client's first bytes.
//! The encoding itself is [`crate::proxy_protocol`].

use std::io;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpStream;

use crate::proxy_protocol::{self, Addresses, HeaderError, Parsed};

/// How long a trusted source has to send its whole header.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(3);

/// Why a trusted source's connection did not start with a usable header.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("PROXY protocol header: {0}")]
    Malformed(#[from] HeaderError),
    #[error("PROXY protocol header: the connection closed before a complete header ({0} bytes)")]
    Closed(usize),
    #[error("PROXY protocol header: none complete within {HEADER_DEADLINE:?} ({0} bytes)")]
    Slow(usize),
    #[error("PROXY protocol header: {0}")]
    Io(io::Error),
}

/// Reads the header a trusted source starts its connection with. Returns the addresses
/// it carries (`None`: the connection's own stand) and puts whatever the client sent
/// after it into `rest`, to go to the backend before anything else.
pub async fn read(
    client: &TcpStream,
    rest: &mut Vec<u8>,
) -> Result<Option<Addresses>, IncomingError> {
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let reading = async {
        loop {
            client.readable().await.map_err(IncomingError::Io)?;
            let spare = if buf.len() < proxy_protocol::V1_MAX {
                512
            } else {
                // A v2 header that says it is longer: read up to its end (bounded).
                proxy_protocol::V2_MAX + 512 - buf.len()
            };
            buf.reserve(spare);
            let start = buf.len();
            buf.resize(start + spare, 0);
            let n = match client.try_read(&mut buf[start..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    buf.truncate(start);
                    continue;
                }
                Err(e) => {
                    buf.truncate(start);
                    return Err(IncomingError::Io(e));
                }
            };
            buf.truncate(start + n);
            match proxy_protocol::parse(&buf)? {
                Parsed::Header { len, addrs } => return Ok((len, addrs)),
                Parsed::Incomplete if n == 0 => return Err(IncomingError::Closed(buf.len())),
                Parsed::Incomplete => {}
            }
        }
    };
    match tokio::time::timeout(HEADER_DEADLINE, reading).await {
        Ok(Ok((len, addrs))) => {
            rest.extend_from_slice(&buf[len..]);
            Ok(addrs)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(IncomingError::Slow(buf.len())),
    }
}

/// Writes to the backend what must come before the copy: our `header` (a version and
/// the addresses it names), then `pending` (client bytes that followed a trusted
/// header) or else whatever the client has already sent, all in one write. Returns how
/// many client bytes it wrote.
pub async fn send_ahead(
    backend: &TcpStream,
    client: &TcpStream,
    header: Option<(proxy_protocol::Version, Addresses)>,
    pending: Vec<u8>,
) -> io::Result<usize> {
    let mut out = Vec::new();
    if let Some((version, addrs)) = &header {
        proxy_protocol::encode(*version, addrs, &mut out);
    }
    let early = if pending.is_empty() {
        take_ready(client, &mut out)
    } else {
        out.extend_from_slice(&pending);
        pending.len()
    };
    write_all(backend, &out).await?;
    Ok(early)
}

/// Appends to `out` what the client has already sent, without waiting and without a
/// system call when nothing is known to be there (its readiness is already known: the
/// backend's connect took at least one turn of the event loop). Returns the count.
fn take_ready(client: &TcpStream, out: &mut Vec<u8>) -> usize {
    // Enough for a request's first flight; the copy reads whatever else there is.
    const EARLY: usize = 4 * 1024;
    if !matches!(client.readable().now_or_never(), Some(Ok(()))) {
        return 0;
    }
    let start = out.len();
    out.resize(start + EARLY, 0);
    let n = client.try_read(&mut out[start..]).unwrap_or(0);
    out.truncate(start + n);
    n
}

/// Writes all of `bytes` to `stream` (a fresh socket takes them in one write).
pub async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
