//! `--setup-iptables` / `--remove-iptables` against the real kernel: the real binary runs
//! in a network namespace each test creates (`ip netns exec`), `nft` (used only here, never
//! by the product) reads back what it programmed, and real TCP connections over a veth pair
//! between this namespace and the test's prove the redirect works. Needs root (the test
//! command runs as root); without it each test fails saying so.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::sync::mpsc;

use serde_json::Value;
use socket2::{Domain, SockRef, Socket, Type};

use crate::support::DEADLINE;
use crate::support::netns::Netns;

/// The namespace's whole nf_tables ruleset, as `nft -j` reports it.
fn ruleset(ns: &Netns) -> Vec<Value> {
    let out = ns.exec("nft", &["-j", "list", "ruleset"]);
    assert!(
        out.status.success(),
        "nft -j list ruleset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("nft -j output is JSON");
    json["nftables"].as_array().cloned().unwrap_or_default()
}

/// The `inet ambassadord` table's chains and rules (empty when it does not exist).
fn ours(ns: &Netns) -> (Vec<Value>, Vec<Value>) {
    let mine = |v: &Value, kind: &str| {
        let o = &v[kind];
        o.is_object() && o["family"] == "inet" && o["table"] == "ambassadord"
    };
    let all = ruleset(ns);
    let chains = all.iter().filter(|v| mine(v, "chain")).cloned().collect();
    let rules = all.iter().filter(|v| mine(v, "rule")).cloned().collect();
    (chains, rules)
}

fn has_table(ns: &Netns, family: &str, name: &str) -> bool {
    ruleset(ns)
        .iter()
        .any(|v| v["table"]["family"] == family && v["table"]["name"] == name)
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts the table holds exactly the plan: a nat chain hooked at prerouting with the
/// one rule redirecting TCP to `port` (but to `keep`), and a nat output chain with the
/// one probe rule (the ambassador's own 127.0.0.1:1 to `port`), both at dstnat priority.
fn assert_one_redirect(ns: &Netns, port: u16, keep: Option<u16>) {
    let (chains, rules) = ours(ns);
    let chain = |name: &str| {
        let found: Vec<&Value> = chains
            .iter()
            .filter(|c| c["chain"]["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "chain {name}: {chains:?}");
        let c = &found[0]["chain"];
        (
            c["type"].clone(),
            c["hook"].clone(),
            c["prio"].clone(),
            c["policy"].clone(),
        )
    };
    let nat = |hook: &str| {
        (
            Value::from("nat"),
            Value::from(hook),
            Value::from(-100),
            Value::from("accept"),
        )
    };
    assert_eq!(chains.len(), 2, "chains: {chains:?}");
    assert_eq!(chain("prerouting"), nat("prerouting"));
    assert_eq!(chain("output"), nat("output"));
    assert_eq!(rules.len(), 2, "rules: {rules:?}");
    let rule = |chain: &str| {
        rules
            .iter()
            .find(|r| r["rule"]["chain"] == chain)
            .map(|r| r["rule"]["expr"].clone())
            .unwrap_or_else(|| panic!("no rule in {chain}: {rules:?}"))
    };
    let tcp_dport = |op: &str, p: u16| serde_json::json!({"match": {"op": op, "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": p}});
    // nft shows `meta l4proto tcp` + `tcp dport != P` as the dport match alone.
    let mut want = match keep {
        None => vec![
            serde_json::json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}),
        ],
        Some(k) => vec![tcp_dport("!=", k)],
    };
    want.push(serde_json::json!({"redirect": {"port": port}}));
    assert_eq!(rule("prerouting"), Value::from(want));
    let probe = serde_json::json!([
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "127.0.0.1"}},
        tcp_dport("==", 1),
        {"redirect": {"port": port}}
    ]);
    assert_eq!(rule("output"), probe);
}

/// `--setup-iptables --port P` installs exactly one redirect to P; running it again (same
/// port, then without --port, so the default 10000) still leaves exactly one rule.
#[test]
fn setup_installs_one_redirect_and_running_again_keeps_one() {
    let ns = Netns::new();
    assert_ok(
        &ns.ambassadord(&["--setup-iptables", "--port", "15001"]),
        "setup",
    );
    assert_one_redirect(&ns, 15001, None);
    assert_ok(
        &ns.ambassadord(&["--setup-iptables", "--port", "15001"]),
        "setup again",
    );
    assert_one_redirect(&ns, 15001, None);
    assert_ok(
        &ns.ambassadord(&["--setup-iptables"]),
        "setup with the default port",
    );
    assert_one_redirect(&ns, 10000, None);
}

/// `--remove-iptables` removes the table, succeeds when there is nothing to remove, and
/// leaves other tables in the namespace alone (setup does too).
#[test]
fn remove_deletes_only_our_table_and_is_harmless_when_absent() {
    let ns = Netns::new();
    assert_ok(
        &ns.ambassadord(&["--remove-iptables"]),
        "remove with nothing there",
    );
    assert_ok(
        &ns.exec("nft", &["add", "table", "inet", "someone_else"]),
        "nft add table",
    );
    assert_ok(&ns.ambassadord(&["--setup-iptables"]), "setup");
    assert!(has_table(&ns, "inet", "ambassadord"));
    assert_ok(&ns.ambassadord(&["--remove-iptables"]), "remove");
    assert!(!has_table(&ns, "inet", "ambassadord"), "{:?}", ruleset(&ns));
    assert!(has_table(&ns, "inet", "someone_else"), "{:?}", ruleset(&ns));
    assert_ok(&ns.ambassadord(&["--remove-iptables"]), "remove again");
}

/// Without CAP_NET_ADMIN both actions exit 1 with the one-line message that says which
/// capability is missing and how to grant it, and change nothing.
#[test]
fn without_cap_net_admin_exits_1_with_a_clear_message() {
    let ns = Netns::new();
    let bin = env!("CARGO_BIN_EXE_ambassadord");
    for (flag, doing) in [
        ("--setup-iptables", "setting up the redirect"),
        ("--remove-iptables", "removing the redirect"),
    ] {
        let out = ns.exec(
            "setpriv",
            &[
                "--inh-caps=-all",
                "--bounding-set=-net_admin",
                "--",
                bin,
                flag,
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        let want = format!(
            "{doing} needs CAP_NET_ADMIN (run the container with --privileged or --cap-add NET_ADMIN)"
        );
        assert!(stderr.contains(&want), "{flag}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{flag}: {stderr}");
    }
    assert!(!has_table(&ns, "inet", "ambassadord"));
}

/// A listener on `port` inside the namespace, IPv4 or IPv6 only (so each family's
/// redirect is proven on its own).
fn listen_inside(ns: &Netns, ip: IpAddr, port: u16) -> TcpListener {
    ns.inside(move || {
        let addr = SocketAddr::new(ip, port);
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        if ip.is_ipv6() {
            socket.set_only_v6(true).unwrap();
        }
        socket.set_reuse_address(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(16).unwrap();
        socket.into()
    })
}

/// Accepts one connection, or fails the test at the deadline.
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let listener = listener.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept());
    });
    rx.recv_timeout(DEADLINE)
        .expect("no connection arrived at the omni port")
        .expect("accept")
}

/// Connects to `to` and exchanges a line each way with the accepted end, then returns
/// the original destination the accepted socket reports.
fn connect_through(listener: &TcpListener, to: SocketAddr) -> SocketAddr {
    let mut client = TcpStream::connect_timeout(&to, DEADLINE)
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    let (mut server, peer) = accept(listener);
    server.set_read_timeout(Some(DEADLINE)).unwrap();
    // A dual-stack listener sees an IPv4 peer v4-mapped.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    assert_eq!(peer, client.local_addr().unwrap());
    client.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    server.write_all(b"pong\n").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong\n");
    let sock = SockRef::from(&server);
    let orig = if to.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    orig.expect("SO_ORIGINAL_DST")
        .as_socket()
        .expect("an IP address")
}

/// With the redirect installed, a TCP connection from outside the namespace (over a veth
/// pair) to an arbitrary port on the namespace's address, IPv4 and IPv6, arrives at the
/// listener on the omni port, data flows both ways, and SO_ORIGINAL_DST on the accepted
/// socket returns the address and port the client asked for (what omni mode routes by).
/// Before setup and after `--remove-iptables` the same connection is refused.
#[test]
fn redirected_connection_reaches_the_omni_port_with_its_original_destination() {
    let mut ns = Netns::new();
    let (v4, v6) = ns.veth();
    let omni = 15002;
    let l4 = listen_inside(&ns, Ipv4Addr::UNSPECIFIED.into(), omni);
    let l6 = listen_inside(&ns, Ipv6Addr::UNSPECIFIED.into(), omni);
    let targets = [
        SocketAddr::new(v4.into(), 4242),
        SocketAddr::new(v6.into(), 6379),
    ];

    for to in targets {
        let e = TcpStream::connect_timeout(&to, DEADLINE).expect_err("nothing listens there yet");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{to}: {e}");
    }

    let port = omni.to_string();
    assert_ok(
        &ns.ambassadord(&["--setup-iptables", "--port", &port]),
        "setup",
    );
    assert_eq!(connect_through(&l4, targets[0]), targets[0]);
    assert_eq!(connect_through(&l6, targets[1]), targets[1]);
    // Another port, and the omni port itself (redirected onto itself: harmless).
    let other = SocketAddr::new(v4.into(), 80);
    assert_eq!(connect_through(&l4, other), other);
    let itself = SocketAddr::new(v4.into(), omni);
    assert_eq!(connect_through(&l4, itself), itself);

    assert_ok(&ns.ambassadord(&["--remove-iptables"]), "remove");
    for to in targets {
        let e = TcpStream::connect_timeout(&to, DEADLINE).expect_err("redirect removed");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{to}: {e}");
    }
}

/// Given the omni ambassador's admin address beyond loopback, `--setup-iptables` keeps
/// that port out of the redirect: a connection to it reaches the admin listener itself,
/// any other port still goes to the omni port. An admin address on loopback keeps
/// nothing (nothing from outside can reach it anyway).
#[test]
fn a_non_loopback_admin_port_is_kept_out_of_the_redirect() {
    let mut ns = Netns::new();
    let (v4, _) = ns.veth();
    let omni = 15003;
    let admin = 15004;
    let l_omni = listen_inside(&ns, Ipv4Addr::UNSPECIFIED.into(), omni);
    let l_admin = listen_inside(&ns, Ipv4Addr::UNSPECIFIED.into(), admin);
    let (port, admin_at) = (omni.to_string(), format!("0.0.0.0:{admin}"));
    assert_ok(
        &ns.ambassadord(&["--setup-iptables", "--port", &port, "--admin", &admin_at]),
        "setup keeping the admin port",
    );
    assert_one_redirect(&ns, omni, Some(admin));
    let to_admin = SocketAddr::new(v4.into(), admin);
    assert_eq!(connect_through(&l_admin, to_admin), to_admin);
    let other = SocketAddr::new(v4.into(), 6379);
    assert_eq!(connect_through(&l_omni, other), other);

    // The environment the omni container has works the same.
    let out = ns.exec(
        "env",
        &[
            &format!("AMBASSADORD_ADMIN=[::]:{admin}"),
            env!("CARGO_BIN_EXE_ambassadord"),
            "--setup-iptables",
            "--port",
            &port,
        ],
    );
    assert_ok(&out, "setup with AMBASSADORD_ADMIN");
    assert_one_redirect(&ns, omni, Some(admin));

    let loopback = format!("127.0.0.1:{admin}");
    assert_ok(
        &ns.ambassadord(&["--setup-iptables", "--port", &port, "--admin", &loopback]),
        "setup with a loopback admin",
    );
    assert_one_redirect(&ns, omni, None);
}

/// Omni mode listens on one dual-stack socket ([::] accepting IPv4 too, as
/// `proxy::listen::bind` does). Through it, an IPv4 connection arrives v4-mapped and
/// SO_ORIGINAL_DST at the IPv4 level still returns its original address and port, and an
/// IPv6 one answers at the IPv6 level.
#[test]
fn dual_stack_listener_gets_the_original_destination_of_both_families() {
    let mut ns = Netns::new();
    let (v4, v6) = ns.veth();
    let omni = 10000;
    let listener = ns.inside(move || {
        let addr = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), omni);
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        socket.set_only_v6(false).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(16).unwrap();
        TcpListener::from(socket)
    });
    assert_ok(&ns.ambassadord(&["--setup-iptables"]), "setup");
    let to = SocketAddr::new(v4.into(), 5432);
    assert_eq!(connect_through(&listener, to), to);
    let to = SocketAddr::new(v6.into(), 5432);
    assert_eq!(connect_through(&listener, to), to);
}
