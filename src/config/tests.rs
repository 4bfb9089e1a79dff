//! The pipeline end to end: arguments (and files) in, a `Config` or one error line out.

use super::*;
use std::time::Duration;

/// Parses `args` after the program name; `--help` text and errors alike are `Err`.
fn command(args: &[&str]) -> Result<Command, String> {
    let args = std::iter::once("ambassadord").chain(args.iter().copied());
    Command::from_args(args).map_err(|e| e.to_string())
}

/// As [`command`], for arguments that serve.
fn parse(args: &[&str]) -> Result<Config, String> {
    match command(args)? {
        Command::Serve(config) => Ok(config),
        other => panic!("{args:?}: want Serve, got {other:?}"),
    }
}

/// As [`parse`], with `env` as the variables config reads itself (the link variables,
/// CONSUL_HTTP_TOKEN, RUST_LOG).
fn parse_in(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
    let args = std::iter::once("ambassadord").chain(args.iter().copied());
    let env = Environment(env.iter().map(|(k, v)| (k.into(), v.into())).collect());
    match Command::from_args_in(args, &env).map_err(|e| e.to_string())? {
        Command::Serve(config) => Ok(config),
        other => panic!("want Serve, got {other:?}"),
    }
}

#[test]
fn static_backend_listens_on_its_port() {
    let c = parse(&["192.168.1.100:8080"]).unwrap();
    assert_eq!(
        c.routes[0].listen,
        Listen {
            ip: None,
            port: 8080
        }
    );
    assert_eq!(c.settings.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.settings.idle_timeout, None);
}

#[test]
fn bind_and_port_override() {
    let c = parse(&["--bind", "127.0.0.1", "--port", "7000", "10.0.0.5:6379"]).unwrap();
    assert_eq!(
        c.routes[0].listen,
        Listen {
            ip: Some("127.0.0.1".parse().unwrap()),
            port: 7000
        }
    );
    let c = parse(&["--bind", "[::1]", "10.0.0.5:6379"]).unwrap();
    assert_eq!(c.routes[0].listen.ip, Some("::1".parse().unwrap()));
}

#[test]
fn discovery_specs_listen_on_10000_and_dns_parses() {
    let c = parse(&["--dns", "127.0.0.1:5353", "redis.service.consul"]).unwrap();
    assert_eq!(c.routes[0].listen.port, 10000);
    assert_eq!(c.dns, Some("127.0.0.1:5353".parse().unwrap()));
    let c = parse(&["--dns", "::1", "etcd://127.0.0.1:2379/nodes"]).unwrap();
    assert_eq!(c.dns, Some("[::1]:53".parse().unwrap()));
    assert_eq!(c.routes[0].listen.port, 10000);
    let c = parse(&["--port", "7000", "consul://127.0.0.1:8500/nodes"]).unwrap();
    assert_eq!(c.routes[0].listen.port, 7000);
}

#[test]
fn omnimode_listens_on_10000_and_takes_no_backend() {
    let c = parse(&["--omnimode"]).unwrap();
    assert_eq!(c.routes[0].target, RouteTarget::Omni);
    assert_eq!(c.routes[0].listen.port, 10000);
    let err = parse(&["--omnimode", "a:1"]).unwrap_err();
    assert!(
        err.contains("--omnimode takes no BACKEND (got 'a:1'"),
        "{err}"
    );
}

#[test]
fn several_backends_listen_on_the_first_port() {
    let c = parse(&["a:6379,b:6380"]).unwrap();
    assert_eq!(c.routes[0].listen.port, 6379);
}

#[test]
fn timeouts_parse() {
    let c = parse(&[
        "--connect-timeout",
        "250ms",
        "--idle-timeout",
        "2m",
        "--shutdown-grace",
        "0",
        "a:1",
    ])
    .unwrap();
    assert_eq!(c.settings.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.settings.idle_timeout, Some(Duration::from_secs(120)));
    assert_eq!(c.settings.shutdown_grace, Duration::ZERO);
}

#[test]
fn errors_name_the_flag_and_value() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "no backend given"),
        (&["10.0.0.5"], "backend '10.0.0.5': missing ':PORT'"),
        (
            &["--dns", "dns.example", "a:1"],
            "--dns 'dns.example': not an IP address",
        ),
        (&["--port", "abc", "a:1"], "--port 'abc': not a port number"),
        (
            &["--port", "70000", "a:1"],
            "--port '70000': not a port number",
        ),
        (
            &["--bind", "nowhere", "a:1"],
            "--bind 'nowhere': not an IP address",
        ),
        (
            &["--connect-timeout", "5x", "a:1"],
            "--connect-timeout '5x': unknown unit 'x'",
        ),
        (
            &["--connect-timeout", "0s", "a:1"],
            "--connect-timeout '0s': must be more than zero",
        ),
        (
            &["--idle-timeout", "soon", "a:1"],
            "--idle-timeout 'soon': not a duration",
        ),
        (
            &["--log-level", "ambassadord=loudest", "a:1"],
            "--log-level 'ambassadord=loudest': not a log level",
        ),
        (
            &["--log-level", "loud", "a:1"],
            "--log-level 'loud': not a log level",
        ),
        (
            &["--nope", "a:1"],
            "unexpected argument '--nope' found (see --help)",
        ),
        (
            &["--links", "a:1"],
            "the argument '--links' cannot be used with '[BACKEND]'",
        ),
        (
            &["--links", "--port", "80"],
            "the argument '--links' cannot be used with '--port <PORT>'",
        ),
    ];
    for (args, want) in cases {
        let err = command(args).expect_err(want);
        assert!(err.contains(want), "{args:?}: got {err:?}, want {want:?}");
        assert!(!err.contains('\n'), "{args:?}: not one line: {err:?}");
    }
}

/// The redirect actions need no BACKEND, default to the omni port, take --port, and
/// reject a port that cannot be redirected to or a BACKEND given with them.
#[test]
fn redirect_actions() {
    // A one-shot action has no routes: the type says so.
    let c = command(&["--setup-iptables"]).unwrap();
    assert!(
        matches!(c, Command::SetupRedirect { port: 10000, .. }),
        "{c:?}"
    );
    let c = command(&["--setup-iptables", "--port", "15001"]).unwrap();
    assert!(
        matches!(c, Command::SetupRedirect { port: 15001, .. }),
        "{c:?}"
    );
    // The omni ambassador's admin port stays out of the redirect only beyond loopback.
    for (admin, keep) in [
        ("0.0.0.0:10001", Some(10001)),
        ("[::]:9100", Some(9100)),
        ("172.17.0.2:10001", Some(10001)),
        ("127.0.0.1:10001", None),
        ("off", None),
    ] {
        let c = command(&["--setup-iptables", "--admin", admin]).unwrap();
        assert!(
            matches!(c, Command::SetupRedirect { keep: k, .. } if k == keep),
            "{admin}: {c:?}"
        );
    }
    let c = command(&["--setup-iptables"]).unwrap();
    assert!(
        matches!(c, Command::SetupRedirect { keep: None, .. }),
        "{c:?}"
    );
    let c = command(&["--remove-iptables"]).unwrap();
    assert!(matches!(c, Command::RemoveRedirect { .. }), "{c:?}");
    let c = command(&["a:1"]).unwrap();
    assert!(matches!(c, Command::Serve(_)), "{c:?}");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--setup-iptables", "--port", "0"],
            "--port '0': the redirect needs a real port",
        ),
        (
            &["--setup-iptables", "--port", "x"],
            "--port 'x': not a port number",
        ),
        (
            &["--setup-iptables", "a:1"],
            "--setup-iptables runs once and exits; it takes no BACKEND (got 'a:1')",
        ),
        (
            &["--setup-iptables", "--remove-iptables"],
            "cannot be used with",
        ),
    ];
    for (args, want) in cases {
        let err = command(args).expect_err(want);
        assert!(err.contains(want), "{args:?}: got {err:?}, want {want:?}");
        assert!(!err.contains('\n'), "{args:?}: not one line: {err:?}");
    }
}

fn file(text: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "ambassadord-config-{}-{}.toml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_file_routes_and_options_with_flags_overriding() {
    let path = file(
        "connect_timeout = \"2s\"\nidle_timeout = \"1m\"\nadmin = \"127.0.0.1:9999\"\n\n\
         [[route]]\nlisten = \"127.0.0.1:7000\"\nbackend = \"10.0.0.5:6379\"\n\n\
         [[route]]\nbackend = \"etcd://127.0.0.1:2379/nodes\"\n\n\
         [[route]]\nlisten = \":10001\"\nomni = true\n",
    );
    let p = path.to_str().unwrap();
    let c = parse(&["--config", p, "--idle-timeout", "off"]).unwrap();
    assert_eq!(c.routes.len(), 3);
    assert_eq!(
        c.routes[0].listen,
        Listen {
            ip: Some("127.0.0.1".parse().unwrap()),
            port: 7000
        }
    );
    assert_eq!(
        c.routes[1].listen,
        Listen {
            ip: None,
            port: 10000
        }
    );
    assert_eq!(c.routes[2].target, RouteTarget::Omni);
    assert_eq!(c.routes[2].listen.port, 10001);
    assert_eq!(c.settings.connect_timeout, Duration::from_secs(2));
    // The flag wins over the file.
    assert_eq!(c.settings.idle_timeout, None);
    assert_eq!(
        c.admin,
        Some(Admin {
            addr: "127.0.0.1:9999".parse().unwrap(),
            explicit: true
        })
    );
    assert_eq!(c.config_file.as_deref(), Some(path.as_path()));
    // copy and threads come from the file unless a flag says otherwise.
    let path = file("copy = \"splice\"\nthreads = 3\n[[route]]\nbackend = \"a:1\"\n");
    let p2 = path.to_str().unwrap();
    let c = parse(&["--config", p2]).unwrap();
    assert_eq!((c.settings.copy, c.threads), (CopyMode::Splice, Some(3)));
    let c = parse(&["--config", p2, "--copy", "userspace", "--threads", "1"]).unwrap();
    assert_eq!((c.settings.copy, c.threads), (CopyMode::Userspace, Some(1)));
    // A BACKEND on the command line is one more route.
    let c = parse(&["--config", p, "--port", "7001", "10.0.0.9:1"]).unwrap();
    assert_eq!(c.routes.len(), 4);
    assert_eq!(c.routes[3].listen.port, 7001);
}

#[test]
fn config_file_errors_name_the_file_and_key() {
    let cases: &[(&str, &str)] = &[
        ("bogus = 1\n", "bogus"),
        (
            "[[route]]\nbackend = \"a:1\"\nlisten_on = \":1\"\n",
            "listen_on",
        ),
        ("[[route]]\nbackend = \"a:x\"\n", "route 1: backend 'a:x'"),
        (
            "[[route]]\nlisten = \"x\"\nbackend = \"a:1\"\n",
            "route 1: listen 'x'",
        ),
        ("[[route]]\nlisten = \":1\"\n", "route 1: needs backend"),
        (
            "connect_timeout = \"fast\"\n[[route]]\nbackend = \"a:1\"\n",
            "connect_timeout 'fast'",
        ),
        ("", "no routes"),
        ("threads = 0\n[[route]]\nbackend = \"a:1\"\n", "threads '0'"),
        (
            "copy = \"fast\"\n[[route]]\nbackend = \"a:1\"\n",
            "copy 'fast'",
        ),
        (
            "[[route]]\nlisten=\":5\"\nbackend = \"a:1\"\n[[route]]\nlisten=\":5\"\nbackend = \"b:1\"\n",
            "two routes listen on *:5",
        ),
    ];
    for (text, want) in cases {
        let path = file(text);
        let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.contains(want), "{text:?}: {err}");
        assert!(
            err.contains(path.to_str().unwrap()) || want.starts_with("two"),
            "{err}"
        );
    }
    let err = parse(&["--admin", "nowhere", "a:1"]).unwrap_err();
    assert!(err.contains("--admin 'nowhere'"), "{err}");
    assert_eq!(parse(&["--admin", "off", "a:1"]).unwrap().admin, None);
    let c = parse(&["a:1"]).unwrap();
    assert_eq!(
        c.admin,
        Some(Admin {
            addr: DEFAULT_ADMIN.parse().unwrap(),
            explicit: false
        })
    );
}

/// The Consul token is read once, into the config, and never shown by its Debug (which
/// a log line or a panic may print); an empty one is no token.
#[test]
fn the_consul_token_is_kept_and_masked() {
    let c = parse_in(
        &["consul://127.0.0.1:8500/nodes"],
        &[("CONSUL_HTTP_TOKEN", "s3cr3t-token")],
    )
    .unwrap();
    assert_eq!(
        c.consul_token.as_ref().map(Secret::expose),
        Some("s3cr3t-token")
    );
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("consul_token: Some(***)"), "{shown}");
    assert_eq!(format!("{:?}", Secret::new("x")), "***");
    let c = parse_in(&["a:1"], &[("CONSUL_HTTP_TOKEN", "")]).unwrap();
    assert_eq!(c.consul_token, None);
}

/// --links reads the link variables from the environment config was given, and a
/// malformed one is a warning, not an error.
#[test]
fn links_come_from_the_environment_snapshot() {
    let c = parse_in(
        &["--links", "--bind", "127.0.0.1"],
        &[
            ("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
            ("BAD_PORT_80_TCP", "tcp://172.17.0.3"),
        ],
    )
    .unwrap();
    assert_eq!(c.routes.len(), 1);
    assert_eq!(
        c.routes[0].listen,
        Listen {
            ip: Some("127.0.0.1".parse().unwrap()),
            port: 6379
        }
    );
    assert_eq!(c.routes[0].target.to_string(), "172.17.0.2:6379");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("BAD_PORT_80_TCP"),
        "{:?}",
        c.warnings
    );
    let err = parse_in(&["--links"], &[]).unwrap_err();
    assert!(err.contains("no Docker link in the environment"), "{err}");
}

/// RUST_LOG is the filter when --log-level is not set.
#[test]
fn rust_log_is_the_fallback_filter() {
    let c = parse_in(&["a:1"], &[("RUST_LOG", "debug")]).unwrap();
    assert_eq!(c.log.filter.as_deref(), Some("debug"));
    let c = parse_in(&["--log-level", "warn", "a:1"], &[("RUST_LOG", "debug")]).unwrap();
    assert_eq!(c.log.filter.as_deref(), Some("warn"));
    assert_eq!(parse_in(&["a:1"], &[]).unwrap().log.filter, None);
}

/// A bad Docker host is bad usage wherever omni mode would use it, named by its
/// origin; where no route is in omni mode it is not read at all.
#[test]
fn docker_host_is_checked_when_omni_mode_uses_it() {
    let err = parse(&["--omnimode", "--docker-host", "ftp://x"]).unwrap_err();
    assert!(
        err.starts_with("--docker-host 'ftp://x': not unix:///PATH or tcp://HOST:PORT"),
        "{err}"
    );
    let err = parse(&["--omnimode", "--docker-host", "unix://"]).unwrap_err();
    assert!(err.contains("--docker-host 'unix://'"), "{err}");
    let err = parse(&["--omnimode", "--docker-host", "tcp://"]).unwrap_err();
    assert!(err.contains("--docker-host 'tcp://'"), "{err}");
    let path = file("docker_host = \"ftp://x\"\n[[route]]\nomni = true\n");
    let p = path.to_str().unwrap();
    let err = parse(&["--config", p]).unwrap_err();
    assert!(
        err.contains(&format!("{p}: docker_host 'ftp://x'")),
        "{err}"
    );
    // The flag wins over the file, as for every option.
    let c = parse(&["--config", p, "--docker-host", "tcp://127.0.0.1:2375"]).unwrap();
    assert_eq!(
        c.docker_host,
        Some(DockerHost::Tcp("127.0.0.1:2375".to_string()))
    );
    // No omni route: not validated, and not kept.
    let c = parse(&["--docker-host", "ftp://x", "a:1"]).unwrap();
    assert_eq!(c.docker_host, None);
    let c = parse(&["--omnimode", "--docker-host", "unix:///run/docker.sock"]).unwrap();
    assert_eq!(
        c.docker_host,
        Some(DockerHost::Unix("/run/docker.sock".into()))
    );
}

/// A docker:// route needs the Docker host as omni mode does; `--run-as` is UID or
/// UID:GID, numbers, from the flag or the file, and a bad one names its origin
/// (the image's AMBASSADORD_RUN_AS is tested against the real engine).
#[test]
fn docker_specs_and_run_as() {
    let c = parse(&["docker://web:80"]).unwrap();
    assert_eq!(
        c.docker_host,
        Some(DockerHost::Unix("/var/run/docker.sock".into()))
    );
    let err = parse(&["--docker-host", "ftp://x", "docker://web:80"]).unwrap_err();
    assert!(err.starts_with("--docker-host 'ftp://x'"), "{err}");

    assert_eq!(parse(&["a:1"]).unwrap().run_as, None);
    for (given, uid, gid) in [
        ("65534", 65534, 65534),
        ("1000:100", 1000, 100),
        (" 0 ", 0, 0),
    ] {
        let c = parse(&["--run-as", given, "a:1"]).unwrap();
        assert_eq!(c.run_as, Some(RunAs { uid, gid }), "{given}");
    }
    let err = parse(&["--run-as", "nobody", "a:1"]).unwrap_err();
    assert!(
        err.starts_with("--run-as 'nobody': user 'nobody' is not a number"),
        "{err}"
    );
    let err = parse(&["--run-as", "", "a:1"]).unwrap_err();
    assert!(
        err.starts_with("--run-as '': user '' is not a number"),
        "{err}"
    );
    let path = file("run_as = \"1:x\"\n");
    let p = path.to_str().unwrap();
    let err = parse(&["--config", p, "a:1"]).unwrap_err();
    assert!(
        err.contains(&format!("{p}: run_as '1:x': group 'x'")),
        "{err}"
    );
}

/// Checks are off unless asked; the flags set every route's, a `[[route]]` overrides
/// the file's top level for itself, escapes work on the command line, and bad values
/// name their origin.
#[test]
fn check_options() {
    assert_eq!(parse(&["a:1"]).unwrap().routes[0].check, None);
    let c = parse(&[
        "--check",
        "tcp",
        "--check-interval",
        "500ms",
        "--check-fall",
        "4",
        "--check-rise",
        "1",
        "--check-send",
        "PING\\r\\n",
        "--check-expect",
        "+PONG",
        "a:1",
    ])
    .unwrap();
    assert_eq!(
        c.routes[0].check,
        Some(CheckConfig {
            interval: Duration::from_millis(500),
            fall: 4,
            rise: 1,
            send: Some(b"PING\r\n".to_vec()),
            expect: Some(b"+PONG".to_vec()),
        })
    );
    let path = file(
        "check = \"tcp\"\ncheck_interval = \"1s\"\n\
         [[route]]\nbackend = \"a:1\"\n\
         [[route]]\nbackend = \"b:2\"\ncheck_fall = 5\ncheck_send = \"PING\\r\\n\"\n\
         [[route]]\nbackend = \"c:3\"\ncheck = \"off\"\n",
    );
    let p = path.to_str().unwrap();
    let c = parse(&["--config", p]).unwrap();
    let checks: Vec<_> = c.routes.iter().map(|r| r.check.clone()).collect();
    let first = checks[0].clone().expect("on from the top level");
    assert_eq!(
        (first.interval, first.fall, first.rise),
        (Duration::from_secs(1), 3, 2)
    );
    let second = checks[1].clone().expect("on");
    assert_eq!(
        (second.fall, second.send.as_deref()),
        (5, Some(&b"PING\r\n"[..]))
    );
    assert_eq!(checks[2], None);
    for (args, want) in [
        (
            &["--check", "http", "a:1"][..],
            "--check 'http': not a check kind: tcp or off",
        ),
        (
            &["--check-interval", "10ms", "a:1"][..],
            "--check-interval '10ms': must be at least 100ms",
        ),
        (
            &["--check-send", "a\\q", "a:1"][..],
            "--check-send 'a\\q': unknown escape",
        ),
    ] {
        let err = parse(args).unwrap_err();
        assert!(err.starts_with(want), "{args:?}: {err}");
    }
    let path = file("[[route]]\nbackend = \"a:1\"\ncheck_rise = 0\n");
    let p = path.to_str().unwrap();
    let err = parse(&["--config", p]).unwrap_err();
    assert!(err.contains("route 1: check_rise '0'"), "{err}");
}

/// `--eject-after` defaults to 3, 0 turns ejection off, and the file's value is checked.
#[test]
fn eject_after_from_flag_and_file() {
    assert_eq!(parse(&["a:1"]).unwrap().settings.eject_after, 3);
    let c = parse(&["--eject-after", "0", "a:1"]).unwrap();
    assert_eq!(c.settings.eject_after, 0);
    let err = parse(&["--eject-after", "x", "a:1"]).unwrap_err();
    assert!(err.contains("--eject-after"), "{err}");
    let path = file("eject_after = 5\n");
    let p = path.to_str().unwrap();
    assert_eq!(
        parse(&["--config", p, "a:1"]).unwrap().settings.eject_after,
        5
    );
    let path = file("eject_after = -1\n");
    let p = path.to_str().unwrap();
    let err = parse(&["--config", p, "a:1"]).unwrap_err();
    assert!(err.contains(&format!("{p}: eject_after '-1'")), "{err}");
}

/// A copy mode in the file is taken in any case; as a flag clap takes it exactly, and
/// its error names the flag and the value.
#[test]
fn copy_modes_in_the_file_and_as_flags() {
    assert_eq!("Splice".parse::<CopyMode>(), Ok(CopyMode::Splice));
    assert_eq!("userspace".parse::<CopyMode>(), Ok(CopyMode::Userspace));
    assert!("zerocopy".parse::<CopyMode>().is_err());
    let path = file("copy = \"USERSPACE\"\n[[route]]\nbackend = \"a:1\"\n");
    let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.settings.copy, CopyMode::Userspace);
    let err = parse(&["--copy", "zerocopy", "a:1"]).unwrap_err();
    assert_eq!(
        err,
        "invalid value 'zerocopy' for '--copy <MODE>' (see --help)"
    );
}

/// A `consul-service://` route in a config file is a Consul catalog route listening on
/// 10000 unless told otherwise; a bad one is refused naming the file, route and value.
#[test]
fn config_file_consul_service_routes() {
    let path = file(
        "[[route]]\nbackend = \"consul-service://127.0.0.1:8500/redis?tag=primary\"\n\n\
         [[route]]\nlisten = \"127.0.0.1:7001\"\nbackend = \"consul-service://consul/web?dc=dc2\"\n",
    );
    let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].listen.port, 10000);
    let RouteTarget::Spec(BackendSpec {
        spec: Spec::ConsulService(svc),
        ..
    }) = &c.routes[0].target
    else {
        panic!("not a consul-service route: {:?}", c.routes[0].target)
    };
    assert_eq!(
        (svc.name.as_str(), svc.tag.as_deref(), svc.dc.as_deref()),
        ("redis", Some("primary"), None)
    );
    assert_eq!(svc.server.to_string(), "127.0.0.1:8500");
    let RouteTarget::Spec(web) = &c.routes[1].target else {
        panic!("not a spec route")
    };
    assert_eq!(web.to_string(), "consul-service://consul:8500/web?dc=dc2");
    assert_eq!(c.routes[1].listen.port, 7001);

    let bad = file("[[route]]\nbackend = \"consul-service://127.0.0.1/redis?tag=\"\n");
    let err = parse(&["--config", bad.to_str().unwrap()]).unwrap_err();
    assert!(
        err.contains(bad.to_str().unwrap())
            && err.contains(
                "route 1: backend 'consul-service://127.0.0.1/redis?tag=': 'tag=' has an empty value"
            ),
        "{err}"
    );
}

#[test]
fn route_options_from_flags_env_and_file() {
    use crate::proxy_protocol::Version;
    let c = parse(&["10.0.0.5:6379"]).unwrap();
    assert_eq!(c.routes[0].options, RouteOptions::default());
    let c = parse(&[
        "--proxy-protocol",
        "v2",
        "--accept-proxy-protocol",
        "10.0.0.0/8, 2001:db8::/32,192.0.2.7",
        "--max-connections",
        "10",
        "10.0.0.5:6379",
    ])
    .unwrap();
    let o = &c.routes[0].options;
    assert_eq!(o.proxy_protocol, Version::V2);
    assert_eq!(o.max_connections, Some(10));
    assert_eq!(o.accept_proxy.len(), 3);
    assert!(o.trusts("10.1.2.3".parse().unwrap()));
    assert!(o.trusts("::ffff:10.1.2.3".parse().unwrap()));
    assert!(o.trusts("2001:db8::5".parse().unwrap()));
    assert!(o.trusts("192.0.2.7".parse().unwrap()));
    assert!(!o.trusts("192.0.2.8".parse().unwrap()));
    assert!(!o.trusts("11.0.0.1".parse().unwrap()));

    // The file's top level is every route's default; a route's own keys win; flags win
    // over the file's top level.
    let path = file(
        "proxy_protocol = \"v1\"\nmax_connections = 5\n\
         [[route]]\nlisten = \"127.0.0.1:7001\"\nbackend = \"10.0.0.1:1\"\n\
         [[route]]\nlisten = \"127.0.0.1:7002\"\nbackend = \"10.0.0.2:1\"\n\
         proxy_protocol = \"off\"\nmax_connections = 2\naccept_proxy_protocol = \"127.0.0.1\"\n",
    );
    let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.routes[0].options.proxy_protocol, Version::V1);
    assert_eq!(c.routes[0].options.max_connections, Some(5));
    assert!(c.routes[0].options.accept_proxy.is_empty());
    assert_eq!(c.routes[1].options.proxy_protocol, Version::Off);
    assert_eq!(c.routes[1].options.max_connections, Some(2));
    assert!(c.routes[1].options.trusts("127.0.0.1".parse().unwrap()));
    let c = parse(&["--config", path.to_str().unwrap(), "--proxy-protocol", "v2"]).unwrap();
    assert_eq!(c.routes[0].options.proxy_protocol, Version::V2);
    assert_eq!(c.routes[1].options.proxy_protocol, Version::Off);

    let c = parse_in(&["10.0.0.5:6379"], &[]).unwrap();
    assert_eq!(c.routes[0].options.max_connections, None);
}

#[test]
fn route_option_errors_name_the_value() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--proxy-protocol", "v3", "a:1"],
            "--proxy-protocol 'v3': not a PROXY protocol version (off, v1, v2)",
        ),
        (
            &["--max-connections", "0", "a:1"],
            "--max-connections '0': must be at least 1",
        ),
        (
            &["--max-connections", "x", "a:1"],
            "--max-connections 'x': not a count of connections",
        ),
        (
            &["--accept-proxy-protocol", "10.0.0.0/33", "a:1"],
            "--accept-proxy-protocol '10.0.0.0/33': '10.0.0.0/33': '/33' is not a prefix length (0-32)",
        ),
        (
            &["--accept-proxy-protocol", "10.0.0.1/8", "a:1"],
            "has host bits set: the block starts at 10.0.0.0/8",
        ),
        (
            &["--accept-proxy-protocol", "ten/8", "a:1"],
            "'ten/8': 'ten' is not an IP address",
        ),
        (
            &["--accept-proxy-protocol", "10.0.0.0/8,", "a:1"],
            "an empty entry",
        ),
        (
            &["--accept-proxy-protocol", "127.0.0.1", "--omnimode"],
            "--accept-proxy-protocol: omni mode routes by the connecting container's own address",
        ),
    ];
    for (args, want) in cases {
        let err = parse(args).unwrap_err();
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let path = file("[[route]]\nbackend = \"a:1\"\nproxy_protocol = \"v9\"\n");
    let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(
        err.contains(": route 1: proxy_protocol 'v9': not a PROXY protocol version"),
        "{err}"
    );
    let path = file("[[route]]\nbackend = \"a:1\"\nmax_connections = -1\n");
    let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(err.contains(": route 1: max_connections '-1':"), "{err}");
    let path = file("[[route]]\nomni = true\naccept_proxy_protocol = \"10.0.0.0/8\"\n");
    let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(
        err.contains(": route 1: accept_proxy_protocol: omni mode routes by"),
        "{err}"
    );
}

/// A CA certificate and its key as PEM files (also usable as a listener's certificate
/// for config purposes).
fn tls_files() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["b.test".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let cert = file(&cert.pem());
    let key = file(&key.serialize_pem());
    (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

#[test]
fn a_global_tls_allow_is_for_the_routes_that_listen_with_tls() {
    let (pem, key) = tls_files();
    let path = file(&format!(
        "tls_ca = \"{pem}\"\ntls_cert = \"{pem}\"\ntls_key = \"{key}\"\ntls_allow = \"a.test\"\n\
         [[route]]\nlisten = \"127.0.0.1:7001\"\nbackend = \"127.0.0.1:6379\"\ntls_listen = true\n\
         [[route]]\nlisten = \"127.0.0.1:7002\"\nbackend = \"tls+10.0.0.2:6380\"\n"
    ));
    let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.routes[0].options.tls.allow, vec!["a.test"]);
    assert!(c.routes[0].options.tls.listen);
    assert!(c.routes[1].options.tls.allow.is_empty());
    assert!(c.tls.is_some());
    // A route's own tls_allow without tls_listen is a mistake, and named.
    let path = file(&format!(
        "tls_ca = \"{pem}\"\n[[route]]\nlisten = \"127.0.0.1:7002\"\nbackend = \"tls+10.0.0.2:6380\"\ntls_allow = \"a.test\"\n"
    ));
    let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(
        e.contains("route 1: tls_allow is for a tls_listen route"),
        "{e}"
    );
    // A global one with no route listening with TLS, too.
    let e = parse(&["--tls-ca", &pem, "--tls-allow", "a.test", "127.0.0.1:6379"]).unwrap_err();
    assert!(
        e.contains("--tls-allow: tls_allow is for a tls_listen route"),
        "{e}"
    );
}

#[test]
fn tls_options_refuse_what_can_never_match() {
    let (pem, _) = tls_files();
    for (allow, why) in [
        ("10.0.0.9", "is an IP address"),
        ("web.internal.", "ends with a dot"),
    ] {
        let e = parse(&["--tls-ca", &pem, "--tls-allow", allow, "127.0.0.1:6379"]).unwrap_err();
        assert!(e.contains(why), "{allow}: {e}");
    }
    let e = parse(&[
        "--tls-ca",
        &pem,
        "--check",
        "tcp",
        "--check-send",
        "PING\\r\\n",
        "tls+10.0.0.2:6380",
    ])
    .unwrap_err();
    assert!(
        e.contains("check_send and check_expect speak plain TCP"),
        "{e}"
    );
    assert!(parse(&["--tls-ca", &pem, "--check", "tcp", "tls+10.0.0.2:6380"]).is_ok());
}
