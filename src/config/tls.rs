//! The TLS options: the route options (`tls_listen`, `tls_allow`, `tls_server_name`)
//! through the layers, and the files (`tls_ca`, `tls_cert`, `tls_key`) read into
//! [`Material`] once the routes say TLS is used, with every combination that cannot
//! work refused by name.

use std::path::PathBuf;
use std::sync::Arc;

use super::cli::Cli;
use super::file::{FileConfig, FileRoute};
use super::layer::{Layered, Layers, at, some_text};
use super::{RouteConfig, RouteTarget, TlsOptions};
use crate::tls::{Files, Material};

/// The TLS route options every route starts from: flags and environment over the
/// file's top level over the defaults.
pub(super) fn defaults(
    cli: &Cli,
    file: &FileConfig,
    layers: &Layers,
) -> Result<TlsOptions, String> {
    let listen = layers
        .pick(
            "tls_listen",
            cli.tls_listen,
            file.tls_listen.as_ref(),
            |b| Ok(*b),
        )?
        .value;
    let allow = match layers
        .pick(
            "tls_allow",
            cli.tls_allow.clone(),
            file.tls_allow.as_deref(),
            some_text,
        )?
        .transpose()
    {
        None => Vec::new(),
        Some(v) => v.parse(parse_names)?,
    };
    let server_name = layers
        .pick(
            "tls_server_name",
            cli.tls_server_name.clone(),
            file.tls_server_name.as_deref(),
            some_text,
        )?
        .transpose()
        .map(|v| v.trimmed().parse(parse_server_name))
        .transpose()?;
    Ok(TlsOptions {
        listen,
        allow,
        server_name,
    })
}

/// A `[[route]]`'s TLS options: its own over `defaults`. A route that does not listen
/// with TLS leaves an inherited allow list aside; one of its own is an error.
pub(super) fn route(
    defaults: &TlsOptions,
    r: &FileRoute,
    place: &str,
) -> Result<TlsOptions, String> {
    let mut options = defaults.clone();
    if let Some(listen) = r.tls_listen {
        options.listen = listen;
    }
    if let Some(v) = &r.tls_allow {
        options.allow =
            parse_names(v).map_err(|why| at(&format!("{place}: tls_allow"), v, &why))?;
        if !options.listen {
            return Err(format!(
                "{place}: tls_allow is for a tls_listen route (it names the client certificates it accepts)"
            ));
        }
    }
    without_allow_unless_listening(&mut options);
    if let Some(v) = &r.tls_server_name {
        options.server_name = Some(
            parse_server_name(v.trim())
                .map_err(|why| at(&format!("{place}: tls_server_name"), v, &why))?,
        );
    }
    Ok(options)
}

/// A global allow list names the client certificates of the routes that listen with
/// TLS: with none of them it is a mistake.
pub(super) fn check_global_allow(
    global: &TlsOptions,
    routes: &[RouteConfig],
    layers: &Layers,
) -> Result<(), String> {
    if !global.allow.is_empty() && !routes.iter().any(|r| r.options.tls.listen) {
        return Err(format!(
            "{}: tls_allow is for a tls_listen route (it names the client certificates it accepts), and no route listens with TLS",
            layers.origin("tls_allow")
        ));
    }
    Ok(())
}

/// A route that does not listen with TLS checks no client certificate: a global
/// allow list (meant for the routes that do) does not apply to it.
pub(super) fn without_allow_unless_listening(options: &mut TlsOptions) {
    if !options.listen {
        options.allow.clear();
    }
}

/// `NAME[,NAME…]`: DNS names or URIs (`spiffe://trust-domain/path`), as a client
/// certificate's subject alternative names are compared with them.
fn parse_names(raw: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for (i, name) in raw.split(',').map(str::trim).enumerate() {
        if name.is_empty() {
            return Err(format!("name {} of the list is empty", i + 1));
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("'{name}' has a space or control character in it"));
        }
        if !name.contains("://") {
            if name.parse::<std::net::IpAddr>().is_ok() {
                return Err(format!(
                    "'{name}' is an IP address: certificates are matched by their DNS and URI names only"
                ));
            }
            if name.ends_with('.') {
                return Err(format!(
                    "'{name}' ends with a dot: write the name without it"
                ));
            }
            parse_server_name(name)
                .map_err(|why| format!("'{name}': {why} (or write a URI such as spiffe://…)"))?;
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// A DNS name or an IP address, as a certificate can be valid for it.
fn parse_server_name(raw: &str) -> Result<String, String> {
    rustls::pki_types::ServerName::try_from(raw)
        .map(|_| raw.to_string())
        .map_err(|_| "not a DNS name or an IP address".to_string())
}

/// The TLS files, read, when any route uses TLS or any file is given (an omni route's
/// `tls+` declarations arrive later, and need the CA). `None` otherwise.
pub(super) fn material(
    cli: &Cli,
    file: &FileConfig,
    layers: &Layers,
    routes: &[RouteConfig],
) -> Result<Option<Arc<Material>>, String> {
    let path = |id: &str, cli: &Option<String>, file: &Option<String>| {
        layers
            .pick(id, cli.clone(), file.as_deref(), some_text)
            .map(|l| l.transpose())
    };
    let ca = path("tls_ca", &cli.tls_ca, &file.tls_ca)?;
    let cert = path("tls_cert", &cli.tls_cert, &file.tls_cert)?;
    let key = path("tls_key", &cli.tls_key, &file.tls_key)?;
    let named = |l: &Option<Layered<String>>| l.as_ref().map(|l| l.origin.clone());

    match (&cert, &key) {
        (Some(c), None) => {
            return Err(format!(
                "{} is given but no key: add --tls-key FILE",
                c.origin
            ));
        }
        (None, Some(k)) => {
            return Err(format!(
                "{} is given but no certificate: add --tls-cert FILE",
                k.origin
            ));
        }
        _ => {}
    }
    for r in routes {
        let route = route_name(r);
        let tls_backend = matches!(&r.target, RouteTarget::Spec(b) if b.tls);
        if tls_backend && ca.is_none() {
            return Err(format!(
                "{route}: a tls+ backend needs --tls-ca FILE, the authority its certificate must chain to"
            ));
        }
        let options = &r.options.tls;
        let speaks = r
            .check
            .as_ref()
            .is_some_and(|c| c.send.is_some() || c.expect.is_some());
        if tls_backend && speaks {
            return Err(format!(
                "{route}: check_send and check_expect speak plain TCP, which a tls+ backend does not: on a tls+ route the check is the TCP connect alone"
            ));
        }
        if options.listen && r.target == RouteTarget::Omni {
            return Err(format!(
                "{route}: omni mode takes no tls_listen: containers speak plain TCP to their ambassador; declare BACKEND_<port>=tls+… to reach a --tls-listen one"
            ));
        }
        if options.listen && cert.is_none() {
            return Err(format!(
                "{route}: tls_listen needs --tls-cert FILE and --tls-key FILE"
            ));
        }
        if !options.allow.is_empty() && ca.is_none() {
            return Err(format!(
                "{route}: tls_allow needs --tls-ca FILE: only a certificate that CA signed is checked for names"
            ));
        }
    }
    if ca.is_none() && cert.is_none() {
        return Ok(None);
    }
    let files = Files {
        ca: ca.as_ref().map(|l| PathBuf::from(&l.value)),
        cert: cert.as_ref().map(|l| PathBuf::from(&l.value)),
        key: key.as_ref().map(|l| PathBuf::from(&l.value)),
    };
    let material = Material::load(&files).map(Arc::new).map_err(|e| {
        // Named as the user gave it: the flag, its variable, or the file's key.
        let origin = match e.option {
            "--tls-ca" => named(&ca),
            "--tls-cert" => named(&cert),
            _ => named(&key),
        };
        at(
            &origin.unwrap_or_else(|| e.option.to_string()),
            &e.path.display().to_string(),
            &e.why,
        )
    })?;
    Ok(Some(material))
}

fn route_name(r: &RouteConfig) -> String {
    format!("the route on {} ({})", r.listen, r.target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_names_or_uris() {
        assert_eq!(
            parse_names("web.internal, spiffe://example.org/ns/web").unwrap(),
            vec!["web.internal", "spiffe://example.org/ns/web"]
        );
        assert!(parse_names("a,,b").unwrap_err().contains("name 2"));
        assert!(parse_names("bad name").unwrap_err().contains("space"));
        assert!(parse_names("-x-.").is_err());
        assert_eq!(parse_server_name("10.0.0.5").unwrap(), "10.0.0.5");
        assert!(parse_server_name("a b").is_err());
    }
}
