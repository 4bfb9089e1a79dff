//! TLS material: the CA, certificate and key files read into rustls configurations, and
//! the words for what went wrong in a handshake.
//!
//! Read whole when the configuration is built (at start and on every reload), so a file
//! that does not parse is a configuration error: exit 64 at start, a refused reload
//! later (the old material keeps serving). The crypto provider is rustls's *ring*: it
//! builds with a C compiler alone, offline, into the static binary (aws-lc-rs, rustls's
//! default, needs CMake and more at build time).
//!
//! Nothing here logs, and the key is never shown: [`Material`]'s Debug names the files.

mod names;
mod verify;

use verify::Refused;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};

/// The files TLS reads, as the configuration names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Files {
    /// `--tls-ca`: the authorities a peer's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// `--tls-cert` and `--tls-key`: what this ambassador presents, as a server on a
    /// `--tls-listen` route and as a client toward `tls+` backends.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A file that could not be used, named with the option it came from.
#[derive(Debug, thiserror::Error)]
#[error("{option} '{}': {why}", path.display())]
pub struct TlsError {
    pub option: &'static str,
    pub path: PathBuf,
    pub why: String,
}

/// The files, read and checked, and the configurations made from them.
pub struct Material {
    files: Files,
    roots: Option<Arc<RootCertStore>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    client: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("ca", &self.files.ca)
            .field("cert", &self.files.cert)
            .field("key", &self.files.key.as_ref().map(|_| "***"))
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    /// Reads every file `files` names. A certificate needs its key and the other way
    /// round (the caller has checked both or neither are given).
    pub fn load(files: &Files) -> Result<Material, TlsError> {
        let roots = match &files.ca {
            None => None,
            Some(path) => Some(Arc::new(read_roots(path)?)),
        };
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some((read_chain(cert)?, read_key(key)?)),
            _ => None,
        };
        let mut material = Material {
            files: files.clone(),
            roots,
            identity,
            client: None,
        };
        // Made once: every tls+ connection shares it (and its session cache).
        if let Some(roots) = &material.roots {
            let builder = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| material.cert_error(e.to_string()))?
                .with_root_certificates(roots.clone());
            let config = match &material.identity {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .map_err(|e| material.cert_error(describe_rustls(&e)))?,
                None => builder.with_no_client_auth(),
            };
            material.client = Some(Arc::new(config));
        }
        // A key that does not match its certificate is found now, not at the first
        // client.
        if material.identity.is_some() {
            material.server(&[])?;
        }
        Ok(material)
    }

    fn cert_error(&self, why: String) -> TlsError {
        TlsError {
            option: "--tls-cert",
            path: self.files.cert.clone().unwrap_or_default(),
            why,
        }
    }

    /// The client side (toward `tls+` backends): `None` without `--tls-ca`.
    pub fn client(&self) -> Option<Arc<ClientConfig>> {
        self.client.clone()
    }

    /// The server side of a `--tls-listen` route: this certificate; with `--tls-ca` a
    /// client certificate chaining to it is required, and with a non-empty `allow` it
    /// must also carry one of those DNS or URI names.
    pub fn server(&self, allow: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
        let Some((chain, key)) = &self.identity else {
            return Err(TlsError {
                option: "--tls-cert",
                path: PathBuf::new(),
                why: "not given: a --tls-listen route needs --tls-cert and --tls-key".into(),
            });
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.cert_error(e.to_string()))?;
        let builder = match &self.roots {
            Some(roots) => {
                let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                    .build()
                    .map_err(|e| TlsError {
                        option: "--tls-ca",
                        path: self.files.ca.clone().unwrap_or_default(),
                        why: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(Arc::new(verify::Allowing {
                    inner,
                    allow: allow.into(),
                }))
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| self.cert_error(describe_rustls(&e)))?;
        Ok(Arc::new(config))
    }
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let error = |why: String| TlsError {
        option: "--tls-ca",
        path: path.to_path_buf(),
        why,
    };
    let certs = read_certs(path).map_err(error)?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| error(format!("certificate {}: {}", i + 1, describe_rustls(&e))))?;
    }
    Ok(roots)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    read_certs(path).map_err(|why| TlsError {
        option: "--tls-cert",
        path: path.to_path_buf(),
        why,
    })
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it (a PEM block 'BEGIN CERTIFICATE')".into());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let error = |why: String| TlsError {
        option: "--tls-key",
        path: path.to_path_buf(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    // The PEM parser's own errors can quote what it read; a key file's content must
    // never reach a log, so they are not passed on.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        error("no private key in it (a PEM block 'BEGIN PRIVATE KEY', 'BEGIN EC PRIVATE KEY' or 'BEGIN RSA PRIVATE KEY')".into())
    })
}

/// Whether a failed handshake on a `--tls-listen` route was a verified client whose
/// names are not in `tls_allow` (the other failures are `tls_handshake`).
pub fn not_allowed(e: &io::Error) -> bool {
    refused(e).is_some_and(|r| matches!(r.why, verify::Why::NotAllowed))
}

fn refused(e: &io::Error) -> Option<&Refused> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<Refused>()
        }
        _ => None,
    }
}

/// A failed handshake, in a few words: what the peer presented and why it was refused,
/// or what the peer said.
pub fn describe(e: &io::Error) -> String {
    if let Some(refused) = refused(e) {
        return refused.to_string();
    }
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe_rustls(tls),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the handshake".into()
        }
        None => e.to_string(),
    }
}

/// What rustls said, when an I/O error on a TLS stream carries it (an alert from the
/// peer, a record that did not decrypt); `None` for a plain socket error.
pub fn cause(e: &io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(describe_rustls(tls))
}

/// rustls's errors, with the common certificate ones said plainly.
pub fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "its certificate is not signed by a --tls-ca authority".into()
        }
        E::InvalidCertificate(CertificateError::BadSignature) => {
            "its certificate has a bad signature".into()
        }
        E::InvalidCertificate(CertificateError::Other(other)) => other.0.to_string(),
        E::InvalidCertificate(c) => format!("its certificate: {c}"),
        E::NoCertificatesPresented => "it presented no certificate".into(),
        E::InconsistentKeys(_) => "--tls-key is not the key of this certificate".into(),
        E::AlertReceived(alert) => format!("the peer refused the handshake ({alert:?} alert)"),
        other => other.to_string(),
    }
}

/// The DNS and URI names of a DER certificate, for a log line.
pub fn names_of(der: &[u8]) -> String {
    match names::of(der) {
        Ok(found) => names::list(&found),
        Err(why) => format!("an unreadable certificate ({why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_the_files_and_never_the_key() {
        let dir = std::env::temp_dir().join(format!("ambassadord-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["b.test".to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join("b.pem"), dir.join("b.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let files = Files {
            ca: Some(cert_path.clone()),
            cert: Some(cert_path),
            key: Some(key_path),
        };
        let material = Material::load(&files).unwrap();
        assert!(material.client().is_some());
        assert!(material.server(&[]).is_ok());
        let shown = format!("{material:?}");
        assert!(shown.contains("b.pem") && shown.contains("***"), "{shown}");
        let pem = key.serialize_pem();
        let body = pem.lines().nth(1).unwrap();
        assert!(!shown.contains(body), "{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
