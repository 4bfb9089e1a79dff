//! The client-certificate check of a `--tls-listen` route: rustls's WebPKI verifier
//! against `--tls-ca`, then the route's `--tls-allow` names. Doing both inside the
//! handshake refuses a client with a TLS alert, before any byte is forwarded, and puts
//! what it presented in the error, so the refusal's log line can name it.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};

use super::names::{self, Name};

/// Why a client's certificate was refused, and the names it carried.
#[derive(Debug)]
pub struct Refused {
    pub names: Vec<Name>,
    pub why: Why,
}

#[derive(Debug)]
pub enum Why {
    /// The chain did not verify against `--tls-ca` (another CA, expired, not a client
    /// certificate, …).
    Invalid(rustls::Error),
    /// It verified, but none of its names is in `--tls-allow`.
    NotAllowed,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.why {
            Why::Invalid(e) => write!(f, "{}", super::describe_rustls(e))?,
            Why::NotAllowed => f.write_str("no name it presents is in tls_allow")?,
        }
        write!(f, " (presented {})", names::list(&self.names))
    }
}

impl std::error::Error for Refused {}

/// `inner` (the WebPKI verifier), then the allow list (empty: any verified client).
#[derive(Debug)]
pub struct Allowing {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub allow: Arc<[String]>,
}

impl Allowing {
    fn refuse(&self, end_entity: &CertificateDer<'_>, why: Why) -> rustls::Error {
        let names = names::of(end_entity).unwrap_or_default();
        CertificateError::Other(OtherError(Arc::new(Refused { names, why }))).into()
    }
}

impl ClientCertVerifier for Allowing {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| self.refuse(end_entity, Why::Invalid(e)))?;
        if self.allow.is_empty() {
            return Ok(verified);
        }
        let presented = names::of(end_entity)
            .map_err(|why| self.refuse(end_entity, Why::Invalid(bad_encoding(why))))?;
        if presented.iter().any(|n| self.allow.iter().any(|a| n.is(a))) {
            Ok(verified)
        } else {
            Err(self.refuse(end_entity, Why::NotAllowed))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn bad_encoding(why: &'static str) -> rustls::Error {
    rustls::Error::General(format!("its certificate cannot be read: {why}"))
}
