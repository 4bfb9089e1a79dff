//! The PROXY protocol (HAProxy's specification, versions 1 and 2): the header that tells
//! a backend who the client really is. Pure encoding and parsing, no I/O.
//!
//! ambassadord writes a header toward a backend (`--proxy-protocol v1|v2`), always with
//! the `PROXY` command and TCP over IPv4 or IPv6, never `LOCAL`; and it reads one from
//! a trusted upstream (`--accept-proxy-protocol`), in either version.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The twelve bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A version 1 header is at most 107 bytes, CRLF included (the specification's bound:
/// `PROXY UNKNOWN` followed by two full IPv6 addresses and ports).
pub const V1_MAX: usize = 107;

/// The largest version 2 header accepted: the 16 fixed bytes and what its length field
/// may add (addresses and TLVs). The specification allows 65,535 bytes of them; HAProxy
/// needs the header to fit its 16 KiB buffer, and so do we.
pub const V2_MAX: usize = 16 * 1024;

/// Which header to write toward backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Version {
    /// None: the backend sees the ambassador's address.
    #[default]
    Off,
    /// The text form: `PROXY TCP4 192.0.2.1 198.51.100.2 51000 6379\r\n`.
    V1,
    /// The binary form.
    V2,
}

impl Version {
    pub fn as_str(&self) -> &'static str {
        match self {
            Version::Off => "off",
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a PROXY protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PROXY protocol version (off, v1, v2)")]
pub struct UnknownVersion;

impl std::str::FromStr for Version {
    type Err = UnknownVersion;

    /// `off`, `v1` or `v2`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Version::Off, Version::V1, Version::V2]
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or(UnknownVersion)
    }
}

/// The connection a header describes: who connected, and to what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

impl Addresses {
    /// Both addresses in one family, as a header needs them: IPv4 where both are IPv4
    /// (IPv4-mapped IPv6 addresses included), IPv6 (IPv4 addresses mapped) otherwise.
    fn one_family(&self) -> (SocketAddr, SocketAddr) {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let (s, d) = (canon(self.source), canon(self.destination));
        if s.is_ipv4() == d.is_ipv4() {
            return (s, d);
        }
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
            IpAddr::V6(_) => a,
        };
        (v6(s), v6(d))
    }
}

/// Appends the header of `version` for `addrs` to `out` (nothing for [`Version::Off`]).
pub fn encode(version: Version, addrs: &Addresses, out: &mut Vec<u8>) {
    let (src, dst) = addrs.one_family();
    match version {
        Version::Off => {}
        Version::V1 => {
            use std::io::Write;
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            // Writing to a Vec cannot fail.
            let _ = write!(
                out,
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            );
        }
        Version::V2 => {
            out.extend_from_slice(&V2_SIGNATURE);
            // Version 2, command PROXY.
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    // AF_INET, STREAM; 12 bytes of addresses.
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V6(ip) => ip,
                        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                    };
                    // AF_INET6, STREAM; 36 bytes of addresses.
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
}

/// What the start of a connection's bytes holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A header may still be arriving: read more and parse again.
    Incomplete,
    /// A complete header of `len` bytes. `addrs` is `None` when it carries no addresses
    /// to use (v2 `LOCAL`, v1 `UNKNOWN`, a non-IP family): the connection's own stand.
    Header {
        len: usize,
        addrs: Option<Addresses>,
    },
}

/// Why the bytes are not a valid header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("does not start with a PROXY protocol header (v1 'PROXY ' or the v2 signature)")]
    NotAHeader,
    #[error("v1 header has no CRLF within {V1_MAX} bytes")]
    V1TooLong,
    #[error("v1 header '{0}' is malformed")]
    V1Malformed(String),
    #[error("v2 header has version {0}, not 2")]
    V2Version(u8),
    #[error("v2 header has command {0}, neither LOCAL (0) nor PROXY (1)")]
    V2Command(u8),
    #[error("v2 header has address family {0}, not one of 0-3")]
    V2Family(u8),
    #[error("v2 header has transport {0}, not TCP (STREAM)")]
    V2Transport(u8),
    #[error("v2 header is {0} bytes long, more than {V2_MAX}")]
    V2TooLong(usize),
    #[error("v2 header's {len} bytes of addresses are too few for its family (needs {needs})")]
    V2Short { len: usize, needs: usize },
}

/// Parses the header at the start of `buf`, the bytes received so far.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < V2_SIGNATURE.len() && V2_SIGNATURE.starts_with(buf) && !buf.is_empty() {
        // Could be either version yet ("\r\n" starts neither v1's "PROXY ").
        return Ok(Parsed::Incomplete);
    }
    if buf.starts_with(&V2_SIGNATURE) {
        return parse_v2(buf);
    }
    const V1_START: &[u8] = b"PROXY ";
    let n = buf.len().min(V1_START.len());
    if buf.is_empty() || buf[..n] != V1_START[..n] {
        return Err(HeaderError::NotAHeader);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = end + 2;
    let line = &buf[..end];
    let malformed = || {
        HeaderError::V1Malformed(
            crate::logsafe::outside(&String::from_utf8_lossy(line)).to_string(),
        )
    };
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let mut words = text.split(' ');
    words.next(); // "PROXY"
    let family = words.next().ok_or_else(malformed)?;
    let v4 = match family {
        // Whatever follows UNKNOWN up to the CRLF is to be ignored.
        "UNKNOWN" => return Ok(Parsed::Header { len, addrs: None }),
        "TCP4" => true,
        "TCP6" => false,
        _ => return Err(malformed()),
    };
    let fields: Vec<&str> = words.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(malformed());
    };
    let ip = |s: &str| -> Result<IpAddr, HeaderError> {
        if v4 {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        } else {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        }
        .map_err(|_| malformed())
    };
    let port = |s: &str| -> Result<u16, HeaderError> {
        // Decimal digits only: no sign, no leading zero (but "0" itself).
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits || (s.len() > 1 && s.starts_with('0')) {
            return Err(malformed());
        }
        s.parse().map_err(|_| malformed())
    };
    Ok(Parsed::Header {
        len,
        addrs: Some(Addresses {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        }),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(HeaderError::V2Version(version));
    }
    if command > 1 {
        return Err(HeaderError::V2Command(command));
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    if family > 3 {
        return Err(HeaderError::V2Family(family));
    }
    let extra = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + extra;
    if len > V2_MAX {
        return Err(HeaderError::V2TooLong(len));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    // LOCAL: the upstream's own connection (a health check); its addresses stand.
    // UNSPEC and UNIX families carry no IP addresses to use either.
    if command == 0 || family == 0 || family == 3 {
        return Ok(Parsed::Header { len, addrs: None });
    }
    if transport != 1 {
        return Err(HeaderError::V2Transport(transport));
    }
    // IPv4: two 4-byte addresses, then the ports; IPv6: two 16-byte ones.
    let size = if family == 1 { 4 } else { 16 };
    let needs = 2 * size + 4;
    if extra < needs {
        return Err(HeaderError::V2Short { len: extra, needs });
    }
    let body = &buf[16..len];
    let ip = |at: usize| -> IpAddr {
        let b = &body[at..at + size];
        if size == 4 {
            Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
        } else {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(b);
            Ipv6Addr::from(octets).into()
        }
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let addrs = Addresses {
        source: SocketAddr::new(ip(0), port(2 * size)),
        destination: SocketAddr::new(ip(size), port(2 * size + 2)),
    };
    // What follows the addresses (TLVs) is skipped: nothing here uses it.
    Ok(Parsed::Header {
        len,
        addrs: Some(addrs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(src: &str, dst: &str) -> Addresses {
        Addresses {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
    }

    fn encoded(version: Version, a: &Addresses) -> Vec<u8> {
        let mut out = Vec::new();
        encode(version, a, &mut out);
        out
    }

    /// The specification's examples, byte for byte.
    #[test]
    fn v1_is_the_specified_text() {
        let a = addrs("192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(
            encoded(Version::V1, &a),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let a = addrs("[2001:db8::1]:56324", "[2001:db8::11]:443");
        assert_eq!(
            encoded(Version::V1, &a),
            b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 443\r\n"
        );
        assert!(encoded(Version::Off, &a).is_empty());
    }

    #[test]
    fn v2_is_the_specified_binary() {
        let a = addrs("172.19.0.1:42578", "172.19.0.3:80");
        let want: Vec<u8> = [
            &V2_SIGNATURE[..],
            &[0x21, 0x11, 0x00, 0x0c],
            &[172, 19, 0, 1, 172, 19, 0, 3],
            &[0xa6, 0x52, 0x00, 0x50],
        ]
        .concat();
        assert_eq!(encoded(Version::V2, &a), want);
        let a = addrs("[2001:db8::1]:1", "[::1]:2");
        let got = encoded(Version::V2, &a);
        assert_eq!(got.len(), 16 + 36);
        assert_eq!(&got[12..16], &[0x21, 0x21, 0x00, 36]);
        assert_eq!(&got[48..], &[0, 1, 0, 2]);
    }

    /// Mapped IPv4 addresses (a dual-stack listener's) are written as IPv4; a pair of
    /// two families as IPv6, the IPv4 one mapped.
    #[test]
    fn families_are_made_one() {
        let a = addrs("[::ffff:10.0.0.1]:5", "[::ffff:10.0.0.2]:6");
        assert_eq!(
            encoded(Version::V1, &a),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n"
        );
        let a = addrs("10.0.0.1:5", "[2001:db8::2]:6");
        assert_eq!(
            encoded(Version::V1, &a),
            b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 5 6\r\n"
        );
    }

    /// What is written parses back to the same addresses, every prefix of it is
    /// incomplete, and the bytes after it are left alone.
    #[test]
    fn round_trips_and_prefixes() {
        for a in [
            addrs("192.0.2.1:65535", "198.51.100.2:1"),
            addrs("[2001:db8::1]:0", "[2001:db8::ffff]:6379"),
        ] {
            for v in [Version::V1, Version::V2] {
                let mut bytes = encoded(v, &a);
                let len = bytes.len();
                for cut in 1..len {
                    assert_eq!(parse(&bytes[..cut]), Ok(Parsed::Incomplete), "{v} {cut}");
                }
                bytes.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
                assert_eq!(
                    parse(&bytes),
                    Ok(Parsed::Header {
                        len,
                        addrs: Some(a)
                    }),
                    "{v}"
                );
            }
        }
    }

    #[test]
    fn local_and_unknown_carry_no_addresses() {
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\ndata"),
            Ok(Parsed::Header {
                len: 33,
                addrs: None
            })
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Header {
                len: 15,
                addrs: None
            })
        );
        // LOCAL, UNSPEC: no addresses; with a TLV of 3 bytes skipped.
        let local = [&V2_SIGNATURE[..], &[0x20, 0x00, 0, 3, 1, 2, 3]].concat();
        assert_eq!(
            parse(&local),
            Ok(Parsed::Header {
                len: 19,
                addrs: None
            })
        );
    }

    #[test]
    fn tlvs_after_the_addresses_are_skipped() {
        let mut h = encoded(Version::V2, &addrs("10.0.0.1:1", "10.0.0.2:2"));
        h[15] = 12 + 5;
        h.extend_from_slice(&[0x04, 0, 2, 0xab, 0xcd]); // PP2_TYPE_NOOP
        h.extend_from_slice(b"rest");
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                len: 16 + 17,
                addrs: Some(addrs("10.0.0.1:1", "10.0.0.2:2"))
            })
        );
    }

    #[test]
    fn malformed_headers_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"GET / HTTP/1.1\r\n",
                "does not start with a PROXY protocol header",
            ),
            (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 3\r\n", "malformed"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "malformed"),
            (b"PROXY TCP6 1.2.3.4 1.2.3.5 1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.5 01 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.5 +1 2\r\n", "malformed"),
            (b"PROXY TCP4  1.2.3.4 1.2.3.5 1 2\r\n", "malformed"),
        ];
        for (bytes, why) in cases {
            let err = parse(bytes).unwrap_err().to_string();
            assert!(
                err.contains(why),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long), Err(HeaderError::V1TooLong));

        let v2 = |b12: u8, b13: u8, len: u16| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[b12, b13]);
            h.extend_from_slice(&len.to_be_bytes());
            h.resize(16 + len as usize, 0);
            h
        };
        assert_eq!(parse(&v2(0x11, 0x11, 12)), Err(HeaderError::V2Version(1)));
        assert_eq!(parse(&v2(0x22, 0x11, 12)), Err(HeaderError::V2Command(2)));
        assert_eq!(parse(&v2(0x21, 0x41, 12)), Err(HeaderError::V2Family(4)));
        assert_eq!(parse(&v2(0x21, 0x12, 12)), Err(HeaderError::V2Transport(2)));
        assert_eq!(
            parse(&v2(0x21, 0x11, 8)),
            Err(HeaderError::V2Short { len: 8, needs: 12 })
        );
        assert_eq!(
            parse(&v2(0x21, 0x21, 12)),
            Err(HeaderError::V2Short { len: 12, needs: 36 })
        );
        assert_eq!(
            parse(&v2(0x21, 0x11, 20_000)[..16]),
            Err(HeaderError::V2TooLong(20_016))
        );
    }

    #[test]
    fn versions_parse_by_name() {
        assert_eq!("V2".parse(), Ok(Version::V2));
        assert_eq!("off".parse(), Ok(Version::Off));
        assert_eq!("v3".parse::<Version>(), Err(UnknownVersion));
    }
}
