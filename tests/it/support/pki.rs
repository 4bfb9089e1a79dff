//! Certificates for the TLS tests, minted with rcgen: a CA of a test's own and leaf
//! certificates it signs, written as PEM files in a directory removed with it; and a
//! TLS client of the test's own (rustls), which can present any of them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::net::TcpStream;

use super::docker::TempDir;

/// A subject alternative name of a leaf certificate.
pub enum San<'a> {
    Dns(&'a str),
    Uri(&'a str),
    Ip(IpAddr),
}

/// A leaf certificate's files.
#[derive(Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate as minted (the file may be replaced later).
    pub der: Vec<u8>,
}

impl Leaf {
    pub fn cert(&self) -> &str {
        self.cert.to_str().unwrap()
    }
    pub fn key(&self) -> &str {
        self.key.to_str().unwrap()
    }
}

/// A CA and the directory its files are written to.
pub struct Pki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    pub ca: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = TempDir::new(&format!("pki-{name}")).expect("a directory for certificates");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        Pki {
            issuer: Issuer::new(params, key),
            dir,
            ca,
        }
    }

    pub fn ca(&self) -> &str {
        self.ca.to_str().unwrap()
    }

    /// The flags of a `--tls-listen` route presenting `server` and requiring a client
    /// certificate from this CA.
    pub fn listen_args<'a>(&'a self, server: &'a Leaf) -> [&'a str; 7] {
        [
            "--tls-listen",
            "--tls-cert",
            server.cert(),
            "--tls-key",
            server.key(),
            "--tls-ca",
            self.ca(),
        ]
    }

    /// The flags of a `tls+` route's side: this CA, and `client` as its certificate.
    pub fn sender_args<'a>(&'a self, client: &'a Leaf) -> [&'a str; 6] {
        [
            "--tls-ca",
            self.ca(),
            "--tls-cert",
            client.cert(),
            "--tls-key",
            client.key(),
        ]
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate for `name` (its common name and file names) with `sans`, valid
    /// now, for both server and client use.
    pub fn leaf(&self, name: &str, sans: &[San]) -> Leaf {
        self.leaf_with(name, sans, |_| {})
    }

    /// One that expired in 2021.
    pub fn expired_leaf(&self, name: &str, sans: &[San]) -> Leaf {
        self.leaf_with(name, sans, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn leaf_with(
        &self,
        name: &str,
        sans: &[San],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s {
                San::Dns(d) => SanType::DnsName((*d).try_into().unwrap()),
                San::Uri(u) => SanType::URI((*u).try_into().unwrap()),
                San::Ip(ip) => SanType::IpAddress(*ip),
            })
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        adjust(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}

/// The test's own TLS client to `addr`: trusts `ca`, checks `name`, presents `leaf`
/// if given.
pub async fn connect(
    addr: SocketAddr,
    ca: &Path,
    name: &str,
    leaf: Option<&Leaf>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&leaf.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&leaf.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
}

/// Whether the certificate a TLS server presented is `leaf`'s, byte for byte.
pub fn presents(tls: &tokio_rustls::client::TlsStream<TcpStream>, leaf: &Leaf) -> bool {
    let presented = &tls.get_ref().1.peer_certificates().unwrap()[0];
    presented.as_ref() == leaf.der.as_slice()
}
