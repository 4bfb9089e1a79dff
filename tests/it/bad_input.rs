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
