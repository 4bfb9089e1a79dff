//! The `--config` file: its TOML shape and reading it, the only file I/O in config.
//! Values stay strings here; validation names `FILE: key` for each one it refuses.

use std::path::Path;

/// The `--config` file: global options and `[[route]]` tables. Unknown keys are errors.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) connect_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) dns: Option<String>,
    pub(super) docker_host: Option<String>,
    pub(super) admin: Option<String>,
    pub(super) log_level: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) copy: Option<String>,
    pub(super) threads: Option<i64>,
    pub(super) eject_after: Option<i64>,
    pub(super) check: Option<String>,
    pub(super) check_interval: Option<String>,
    pub(super) check_fall: Option<i64>,
    pub(super) check_rise: Option<i64>,
    pub(super) check_send: Option<String>,
    pub(super) check_expect: Option<String>,
    pub(super) run_as: Option<String>,
    pub(super) proxy_protocol: Option<String>,
    pub(super) accept_proxy_protocol: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) tls_ca: Option<String>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
    pub(super) tls_server_name: Option<String>,
    pub(super) tls_listen: Option<bool>,
    pub(super) tls_allow: Option<String>,
    #[serde(default)]
    pub(super) route: Vec<FileRoute>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    /// `IP:PORT`, `[IPV6]:PORT`, `:PORT` or `PORT`; default: every address, the spec's port.
    pub(super) listen: Option<String>,
    pub(super) backend: Option<String>,
    #[serde(default)]
    pub(super) omni: bool,
    pub(super) check: Option<String>,
    pub(super) check_interval: Option<String>,
    pub(super) check_fall: Option<i64>,
    pub(super) check_rise: Option<i64>,
    pub(super) check_send: Option<String>,
    pub(super) check_expect: Option<String>,
    pub(super) proxy_protocol: Option<String>,
    pub(super) accept_proxy_protocol: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) tls_server_name: Option<String>,
    pub(super) tls_listen: Option<bool>,
    pub(super) tls_allow: Option<String>,
}

/// The check options as one place (the file's top level, or a route) gives them.
/// Bytes are TOML strings, with TOML's own escapes ("PING\r\n").
#[derive(Debug, Default, Clone)]
pub(super) struct FileCheck {
    pub(super) check: Option<String>,
    pub(super) check_interval: Option<String>,
    pub(super) check_fall: Option<i64>,
    pub(super) check_rise: Option<i64>,
    pub(super) check_send: Option<String>,
    pub(super) check_expect: Option<String>,
}

macro_rules! file_check {
    ($t:ty) => {
        impl $t {
            pub(super) fn check_options(&self) -> FileCheck {
                FileCheck {
                    check: self.check.clone(),
                    check_interval: self.check_interval.clone(),
                    check_fall: self.check_fall,
                    check_rise: self.check_rise,
                    check_send: self.check_send.clone(),
                    check_expect: self.check_expect.clone(),
                }
            }
        }
    };
}
file_check!(FileConfig);
file_check!(FileRoute);

/// Reads and parses the `--config` file; errors name the file and, from the TOML
/// parser, the line and the unknown or malformed key.
pub(super) fn read(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--config '{}': cannot read: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.trim_end().replace('\n', " ");
        format!("--config '{}': {msg}", path.display())
    })
}
