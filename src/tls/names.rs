//! The names a certificate is for: its subject alternative names of the two kinds
//! `--tls-allow` matches (DNS names and URIs such as `spiffe://…`), read from the DER.
//!
//! Only the path to the extension is walked (RFC 5280: Certificate → tbsCertificate →
//! extensions → subjectAltName → GeneralNames), with every length checked against what
//! holds it; anything else is skipped unread. A certificate reaches this only after the
//! verifier accepted its chain, but the reader does not rely on that: bad DER is an
//! error, never a panic.

use std::fmt;

/// One subject alternative name, as `--tls-allow` matches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    Dns(String),
    Uri(String),
}

impl Name {
    /// Whether an allow-list entry names this: an entry with `://` is a URI and
    /// compares exactly with URI names only; any other is a DNS name and compares
    /// without regard to case (RFC 4343) with DNS names only.
    pub fn is(&self, allowed: &str) -> bool {
        match self {
            Name::Dns(d) => !allowed.contains("://") && d.eq_ignore_ascii_case(allowed),
            Name::Uri(u) => allowed.contains("://") && u == allowed,
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Dns(d) => write!(f, "DNS:{}", crate::logsafe::outside(d)),
            Name::Uri(u) => write!(f, "URI:{}", crate::logsafe::outside(u)),
        }
    }
}

/// The names presented, for a log line: `DNS:a, URI:spiffe://b`, or `no DNS or URI
/// name` when there is none.
pub fn list(names: &[Name]) -> String {
    if names.is_empty() {
        return "no DNS or URI name".into();
    }
    names
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The DNS and URI subject alternative names of a DER certificate, in their order.
pub fn of(cert: &[u8]) -> Result<Vec<Name>, &'static str> {
    let (cert, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    // version [0] is optional; then serial, signature, issuer, validity, subject,
    // subjectPublicKeyInfo; then optional [1] and [2] unique ids, and [3] extensions.
    let mut extensions = None;
    while !rest.is_empty() {
        let (tag, body, after) = element(rest)?;
        if tag == EXTENSIONS {
            extensions = Some(body);
        }
        rest = after;
    }
    let Some(extensions) = extensions else {
        return Ok(Vec::new());
    };
    let (mut list, _) = expect(extensions, SEQUENCE)?;
    while !list.is_empty() {
        let (extension, after) = expect(list, SEQUENCE)?;
        list = after;
        let (oid, mut fields) = expect(extension, OID)?;
        if oid != SUBJECT_ALT_NAME {
            continue;
        }
        // critical BOOLEAN DEFAULT FALSE, then the value as an OCTET STRING.
        let (tag, _, after) = element(fields)?;
        if tag == BOOLEAN {
            fields = after;
        }
        let (value, _) = expect(fields, OCTET_STRING)?;
        return general_names(value);
    }
    Ok(Vec::new())
}

fn general_names(value: &[u8]) -> Result<Vec<Name>, &'static str> {
    let (mut names, _) = expect(value, SEQUENCE)?;
    let mut found = Vec::new();
    while !names.is_empty() {
        let (tag, body, after) = element(names)?;
        names = after;
        let text = || {
            std::str::from_utf8(body)
                .map(str::to_string)
                .map_err(|_| "a subject alternative name that is not IA5 text")
        };
        match tag {
            DNS_NAME => found.push(Name::Dns(text()?)),
            URI => found.push(Name::Uri(text()?)),
            _ => {}
        }
    }
    Ok(found)
}

const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
/// `[3] EXPLICIT Extensions` in tbsCertificate.
const EXTENSIONS: u8 = 0xa3;
/// GeneralName `dNSName [2] IA5String` and `uniformResourceIdentifier [6] IA5String`.
const DNS_NAME: u8 = 0x82;
const URI: u8 = 0x86;
/// 2.5.29.17, id-ce-subjectAltName.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The first element of `der`, which must have tag `tag`: its contents and what follows.
fn expect(der: &[u8], tag: u8) -> Result<(&[u8], &[u8]), &'static str> {
    let (found, body, rest) = element(der)?;
    if found != tag {
        return Err("not the certificate structure of RFC 5280");
    }
    Ok((body, rest))
}

/// One DER element (single-byte tags, definite lengths): its tag, its contents and
/// what follows it.
fn element(der: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    const CUT: &str = "truncated DER";
    let (&tag, rest) = der.split_first().ok_or(CUT)?;
    if tag & 0x1f == 0x1f {
        return Err("a multi-byte DER tag");
    }
    let (&first, mut rest) = rest.split_first().ok_or(CUT)?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let bytes = (first & 0x7f) as usize;
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return Err("a DER length this reader does not take");
        }
        let (len, after) = rest.split_at(bytes);
        rest = after;
        len.iter().fold(0usize, |n, b| (n << 8) | *b as usize)
    };
    if rest.len() < len {
        return Err(CUT);
    }
    let (body, after) = rest.split_at(len);
    Ok((tag, body, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = names;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_dns_and_uri_names_in_order_and_skips_others() {
        let der = cert(vec![
            rcgen::SanType::DnsName("web.internal".try_into().unwrap()),
            rcgen::SanType::IpAddress("10.0.0.5".parse().unwrap()),
            rcgen::SanType::URI("spiffe://example.org/web".try_into().unwrap()),
            rcgen::SanType::Rfc822Name("ops@example.org".try_into().unwrap()),
        ]);
        assert_eq!(
            of(&der).unwrap(),
            vec![
                Name::Dns("web.internal".into()),
                Name::Uri("spiffe://example.org/web".into())
            ]
        );
    }

    #[test]
    fn a_certificate_without_the_extension_has_no_names() {
        let der = cert(Vec::new());
        assert_eq!(of(&der).unwrap(), Vec::new());
        assert_eq!(list(&[]), "no DNS or URI name");
    }

    #[test]
    fn bad_der_is_an_error_at_every_cut() {
        let der = cert(vec![rcgen::SanType::DnsName("a.b".try_into().unwrap())]);
        for len in 0..der.len() {
            // Every prefix either fails or (a cut inside trailing fields) yields no more
            // than the whole does; none panics.
            if let Ok(names) = of(&der[..len]) {
                assert!(names.len() <= 1, "{len}");
            }
        }
        assert!(of(b"\x30\x85\x01\x02\x03\x04\x05").is_err());
        assert!(of(b"\x1f\x01\x00").is_err());
    }

    #[test]
    fn dns_names_match_without_case_and_uris_exactly() {
        assert!(Name::Dns("Web.Internal".into()).is("web.internal"));
        assert!(!Name::Dns("web.internal".into()).is("api.internal"));
        assert!(Name::Uri("spiffe://x/y".into()).is("spiffe://x/y"));
        assert!(!Name::Uri("spiffe://x/y".into()).is("SPIFFE://x/y"));
        // A name of one kind never stands for the other, whatever its text.
        assert!(!Name::Dns("spiffe://x/y".into()).is("spiffe://x/y"));
        assert!(!Name::Uri("web.internal".into()).is("web.internal"));
        assert_eq!(
            list(&[Name::Dns("a".into()), Name::Uri("spiffe://t/b".into())]),
            "DNS:a, URI:spiffe://t/b"
        );
    }
}
