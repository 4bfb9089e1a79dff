//! Bad input is rejected with one line naming the value and the right exit code
//! (64 for bad usage, 1 for a runtime failure), never a panic.

use crate::support::run_to_exit;

fn assert_rejected(args: &[&str], env: &[(&str, &str)], code: i32, needle: &str) {
    let (got, stderr) = run_to_exit(args, env);
    assert_eq!(got, code, "{args:?} {env:?}: exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one line, got {stderr:?}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

#[test]
fn malformed_backends_exit_64_naming_the_value() {
    let cases: &[(&str, &str)] = &[
        ("10.0.0.5", "backend '10.0.0.5': missing ':PORT'"),
        (
            "redis:0",
            "backend 'redis:0': port 0 is not a valid backend port",
        ),
        (
            "redis:65536",
            "backend 'redis:65536': port 65536 is out of range",
        ),
        (
            "redis:abc",
            "backend 'redis:abc': port 'abc' is not a number",
        ),
        ("", "backend '': the backend is empty"),
        (
            "a:1,,b:2",
            "backend 'a:1,,b:2': element 2 of the list is empty",
        ),
        ("a:1,", "element 2 of the list is empty"),
        ("bad host:80", "host 'bad host' contains the character ' '"),
        ("exa$mple.com:80", "contains the character '$'"),
    ];
    for (spec, needle) in cases {
        assert_rejected(&[spec], &[], 64, needle);
    }
}

/// A `consul-service://` spec whose query Consul would not be asked (an empty tag, a
/// key other than tag and dc, a key twice, a '#') is bad usage at start, named in one
/// line, before anything listens.
#[test]
fn consul_service_bad_query_exits_64_naming_the_spec() {
    let cases: &[(&str, &str)] = &[
        (
            "consul-service://127.0.0.1:8500/redis?tag=",
            "backend 'consul-service://127.0.0.1:8500/redis?tag=': 'tag=' has an empty value",
        ),
        (
            "consul-service://127.0.0.1:8500/redis?color=red",
            "backend 'consul-service://127.0.0.1:8500/redis?color=red': unknown query parameter 'color' (only tag and dc are understood)",
        ),
        (
            "consul-service://127.0.0.1:8500/redis?dc=a&dc=b",
            "'dc' is given twice",
        ),
        (
            "consul-service://127.0.0.1:8500/redis#x",
            "backend 'consul-service://127.0.0.1:8500/redis#x': contains '#'",
        ),
        (
            "consul-service://127.0.0.1:8500/",
            "the service name is empty",
        ),
    ];
    for (spec, needle) in cases {
        assert_rejected(
            &["--bind", "127.0.0.1", "--port", "0", spec],
            &[],
            64,
            needle,
        );
    }
}

#[test]
fn backend_from_the_environment_is_named_as_such() {
    assert_rejected(
        &[],
        &[("AMBASSADORD_BACKEND", "redis:x")],
        64,
        "(from AMBASSADORD_BACKEND)",
    );
    assert_rejected(
        &["a:1"],
        &[("AMBASSADORD_PORT", "nine")],
        64,
        "AMBASSADORD_PORT 'nine'",
    );
}

#[test]
fn no_backend_at_all_exits_64() {
    assert_rejected(&[], &[], 64, "no backend given");
}

#[test]
fn bad_flags_exit_64() {
    assert_rejected(&["--port", "99999", "a:1"], &[], 64, "--port '99999'");
    assert_rejected(
        &["--bind", "somewhere", "a:1"],
        &[],
        64,
        "--bind 'somewhere'",
    );
    assert_rejected(
        &["--connect-timeout", "fast", "a:1"],
        &[],
        64,
        "--connect-timeout 'fast'",
    );
    assert_rejected(&["--log-format", "xml", "a:1"], &[], 64, "'xml'");
    assert_rejected(&["--frobnicate", "a:1"], &[], 64, "--frobnicate");
}

/// Each bad route option is bad usage at start, named with where it came from.
#[test]
fn bad_route_options_exit_64_naming_the_value() {
    assert_rejected(
        &["--proxy-protocol", "v3", "a:1"],
        &[],
        64,
        "--proxy-protocol 'v3': not a PROXY protocol version (off, v1, v2)",
    );
    assert_rejected(
        &["a:1"],
        &[("AMBASSADORD_PROXY_PROTOCOL", "yes")],
        64,
        "AMBASSADORD_PROXY_PROTOCOL 'yes'",
    );
    assert_rejected(
        &["--accept-proxy-protocol", "10.0.0.0/40", "a:1"],
        &[],
        64,
        "'/40' is not a prefix length (0-32)",
    );
    assert_rejected(
        &["--accept-proxy-protocol", "localhost", "a:1"],
        &[],
        64,
        "'localhost' is not an IP address",
    );
    assert_rejected(
        &["--max-connections", "0", "a:1"],
        &[],
        64,
        "--max-connections '0': must be at least 1 (leave it out for no limit)",
    );
    assert_rejected(
        &["a:1"],
        &[("AMBASSADORD_MAX_CONNECTIONS", "x")],
        64,
        "AMBASSADORD_MAX_CONNECTIONS 'x': not a count of connections",
    );
}

/// A Docker host omni mode cannot use is bad usage at start, named with where it came
/// from, not a failure once the index first connects.
#[test]
fn bad_docker_host_with_omnimode_exits_64_naming_it() {
    assert_rejected(
        &["--omnimode", "--docker-host", "ftp://x"],
        &[],
        64,
        "--docker-host 'ftp://x': not unix:///PATH or tcp://HOST:PORT",
    );
    assert_rejected(
        &["--omnimode"],
        &[("DOCKER_HOST", "ftp://x")],
        64,
        "DOCKER_HOST 'ftp://x': not unix:///PATH or tcp://HOST:PORT",
    );
}

#[test]
fn port_in_use_exits_1_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    assert_rejected(
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "127.0.0.1:9",
        ],
        &[],
        1,
        &format!("cannot listen on 127.0.0.1:{port}"),
    );
}

#[test]
fn help_lists_the_environment_variables() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ambassadord"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "AMBASSADORD_BACKEND",
        "AMBASSADORD_BIND",
        "AMBASSADORD_PORT",
        "AMBASSADORD_CONNECT_TIMEOUT",
        "AMBASSADORD_IDLE_TIMEOUT",
        "AMBASSADORD_SHUTDOWN_GRACE",
        "AMBASSADORD_LOG_LEVEL",
        "AMBASSADORD_LOG_FORMAT",
    ] {
        assert!(help.contains(var), "--help lacks {var}:\n{help}");
    }
}

/// Bad usage an adversarial run found exiting 1, retrying forever or passing silently:
/// each now exits 64 with one line naming the value.
#[test]
fn bad_usage_found_by_the_adversarial_run_exits_64_in_one_line() {
    // A Docker host with an empty path or no HOST:PORT.
    assert_rejected(
        &["--omnimode", "--docker-host", "unix://"],
        &[],
        64,
        "--docker-host 'unix://': not unix:///PATH or tcp://HOST:PORT: the socket path is missing",
    );
    assert_rejected(
        &["--omnimode", "--docker-host", "tcp://"],
        &[],
        64,
        "--docker-host 'tcp://': not unix:///PATH or tcp://HOST:PORT: HOST:PORT is missing",
    );
    // A newline inside a backend value: still one line, the newline shown escaped.
    assert_rejected(&["a:1\nb:x"], &[], 64, "backend 'a:1\\nb:x'");
    // An empty admin address is a mistake, not "off".
    assert_rejected(
        &["a:1"],
        &[("AMBASSADORD_ADMIN", "")],
        64,
        "AMBASSADORD_ADMIN '': empty: give IP:PORT, or off",
    );
    let dir = std::env::temp_dir().join(format!("ambassadord-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    // `listen = ""` is not the default listen address.
    let empty = file(
        "empty-listen.toml",
        "[[route]]\nlisten = \"\"\nbackend = \"a:1\"\n",
    );
    assert_rejected(&["--config", &empty], &[], 64, "route 1: listen '': empty");
    // Two routes that cannot both listen are refused before anything binds: no
    // "listening" line, exit 64 rather than 1 after the first had started.
    let port = crate::support::etcd::free_port();
    let overlap = file(
        "overlap.toml",
        &format!(
            "[[route]]\nlisten = \"0.0.0.0:{port}\"\nbackend = \"a:1\"\n\
             [[route]]\nlisten = \"127.0.0.1:{port}\"\nbackend = \"b:1\"\n"
        ),
    );
    assert_rejected(
        &["--config", &overlap],
        &[],
        64,
        &format!("routes listen on 0.0.0.0:{port} and 127.0.0.1:{port}: one covers the other"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each TLS option that cannot work is refused at start with one line naming it, and
/// a key file's content never appears in the message.
#[test]
fn tls_options_that_cannot_work_exit_64_naming_them() {
    use crate::support::pki::{Pki, San};
    let pki = Pki::new("bad-input");
    let leaf = pki.leaf("b", &[San::Dns("b.test")]);
    let other = pki.leaf("c", &[San::Dns("c.test")]);
    let dir = pki.dir();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "SECRET-LOOKING-BYTES not PEM at all\n").unwrap();
    let junk = junk.to_str().unwrap();
    let (ca, cert, key) = (pki.ca(), leaf.cert(), leaf.key());
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["tls+127.0.0.1:6379"],
            "a tls+ backend needs --tls-ca FILE".into(),
        ),
        (
            vec!["--tls-listen", "127.0.0.1:6379"],
            "tls_listen needs --tls-cert FILE and --tls-key FILE".into(),
        ),
        (
            vec!["--tls-cert", cert, "127.0.0.1:6379"],
            "--tls-cert is given but no key".into(),
        ),
        (
            vec!["--tls-ca", "/nonexistent/ca.pem", "tls+127.0.0.1:6379"],
            "--tls-ca '/nonexistent/ca.pem': No such file or directory".into(),
        ),
        (
            vec!["--tls-ca", junk, "tls+127.0.0.1:6379"],
            format!("--tls-ca '{junk}': no certificate in it"),
        ),
        (
            vec![
                "--tls-listen",
                "--tls-cert",
                cert,
                "--tls-key",
                junk,
                "127.0.0.1:6379",
            ],
            format!("--tls-key '{junk}': no private key in it"),
        ),
        (
            vec![
                "--tls-listen",
                "--tls-cert",
                cert,
                "--tls-key",
                other.key(),
                "127.0.0.1:6379",
            ],
            format!("--tls-cert '{cert}': --tls-key is not the key of this certificate"),
        ),
        (
            vec!["--tls-ca", ca, "--tls-allow", "a.test", "127.0.0.1:6379"],
            "tls_allow is for a tls_listen route".into(),
        ),
        (
            vec![
                "--tls-listen",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--tls-allow",
                "a.test",
                "127.0.0.1:6379",
            ],
            "tls_allow needs --tls-ca FILE".into(),
        ),
        (
            vec!["--tls-ca", ca, "--tls-allow", "a test", "127.0.0.1:6379"],
            "--tls-allow 'a test': 'a test' has a space".into(),
        ),
        (
            vec![
                "--tls-ca",
                ca,
                "--tls-server-name",
                "not a name",
                "tls+127.0.0.1:6379",
            ],
            "--tls-server-name 'not a name': not a DNS name or an IP address".into(),
        ),
        (
            vec![
                "--omnimode",
                "--tls-listen",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
            "omni mode takes no tls_listen".into(),
        ),
    ];
    for (args, needle) in &cases {
        assert_rejected(args, &[], 64, needle);
        let (_, stderr) = crate::support::run_to_exit(args, &[]);
        assert!(!stderr.contains("SECRET-LOOKING"), "{args:?}: {stderr}");
    }
    // The environment names itself.
    assert_rejected(
        &["tls+127.0.0.1:6379"],
        &[("AMBASSADORD_TLS_CA", "/nonexistent/ca.pem")],
        64,
        "AMBASSADORD_TLS_CA '/nonexistent/ca.pem'",
    );
}
