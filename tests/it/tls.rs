//! Mutual TLS between ambassadors: `tls+` backends and `--tls-listen` routes, with
//! certificates minted per test (rcgen), real peers nobody here wrote (openssl
//! s_server and s_client), refusals and their log lines, and rotation on SIGHUP. The
//! two-host test (two network namespaces, a veth pair, tcpdump on it) is
//! `tls_hosts.rs`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::pki::{self, Leaf, Pki, San};
use crate::support::*;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The `--tls-listen` side: `backend` behind a listener that requires a client
/// certificate from `pki`'s CA, presenting `server`.
fn tls_listener(pki: &Pki, server: &Leaf, extra: &[&str], backend: SocketAddr) -> Ambassador {
    let backend = backend.to_string();
    let mut args = vec!["--admin", "127.0.0.1:0"];
    args.extend(pki.listen_args(server));
    args.extend_from_slice(extra);
    args.push(&backend);
    Ambassador::on_loopback(&args)
}

/// The `tls+` side: a plaintext listener whose backend is `remote`, over TLS with
/// `client` as its certificate.
fn tls_sender(pki: &Pki, client: &Leaf, extra: &[&str], remote: SocketAddr) -> Ambassador {
    let target = format!("tls+{remote}");
    let mut args = vec!["--admin", "127.0.0.1:0"];
    args.extend(pki.sender_args(client));
    args.extend_from_slice(extra);
    args.push(&target);
    Ambassador::on_loopback(&args)
}

fn server_leaf(pki: &Pki, name: &str) -> Leaf {
    pki.leaf(name, &[San::Dns("b.test"), San::Ip(LOCALHOST)])
}

/// Plaintext in, TLS between the two ambassadors, plaintext out: a megabyte each way
/// with half-close arrives intact; the listener side logs the client certificate's
/// names; the backend's address is the name checked by default (an IP SAN).
#[tokio::test(flavor = "multi_thread")]
async fn two_ambassadors_carry_a_connection_over_mutual_tls() {
    let pki = Pki::new("pair");
    let b_leaf = server_leaf(&pki, "b");
    let a_leaf = pki.leaf("a", &[San::Dns("a.test"), San::Uri("spiffe://test/a")]);
    let backend = integrity_backend().await;
    let mut b = tls_listener(
        &pki,
        &b_leaf,
        &["--tls-allow", "spiffe://test/a"],
        backend.addr,
    );
    let mut a = tls_sender(&pki, &a_leaf, &[], b.addr);
    integrity_exchange(a.addr, 7, 1 << 20).await;
    concurrent_exchanges(a.addr, 8, 100, 20_000).await;
    let line = b.wait_for_log("connection closed");
    assert!(
        line.contains("tls_peer=DNS:a.test,URI:spiffe://test/a"),
        "{line}"
    );
    let line = a.wait_for_log("connection closed");
    assert!(line.contains(&format!("backend={}", b.addr)), "{line}");
    assert_eq!(a.count_log("connection refused"), 0, "{:#?}", a.log());
}

/// Connects with the test's own client presenting `leaf` and expects no byte of the
/// backend's: the handshake fails, or (TLS 1.3, where the client finishes first) the
/// first read ends in the server's alert.
async fn expect_refused(addr: SocketAddr, pki: &Pki, leaf: Option<&Leaf>) {
    let Ok(mut tls) = pki::connect(addr, &pki.ca, "b.test", leaf).await else {
        return;
    };
    let mut got = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the refused connection stayed open");
    assert!(got.is_empty(), "a refused client got {got:?}");
}

/// Each refusal on a `--tls-listen` route is one line naming the client, what its
/// certificate presented and why, and counted: another CA, an expired certificate, no
/// certificate (`tls_handshake`), a name not in `--tls-allow` (`tls_not_allowed`).
/// None of them reaches the backend; an allowed client then does.
#[tokio::test(flavor = "multi_thread")]
async fn refused_clients_are_named_with_what_they_presented() {
    let pki = Pki::new("refusals");
    let other = Pki::new("other");
    let b_leaf = server_leaf(&pki, "b");
    let backend = named_backend("127.0.0.1:0", "served").await;
    let mut b = tls_listener(&pki, &b_leaf, &["--tls-allow", "a.test"], backend.addr);
    let admin = b.admin_addr();

    let cases: [(Option<Leaf>, &str, &str); 4] = [
        (
            Some(other.leaf("a", &[San::Dns("a.test")])),
            "its certificate is not signed by a --tls-ca authority (presented DNS:a.test)",
            "tls_handshake",
        ),
        (
            Some(pki.expired_leaf("old", &[San::Dns("a.test")])),
            "certificate expired",
            "tls_handshake",
        ),
        (None, "it presented no certificate", "tls_handshake"),
        (
            Some(pki.leaf("c", &[San::Dns("c.test"), San::Uri("spiffe://test/c")])),
            "no name it presents is in tls_allow (presented DNS:c.test, URI:spiffe://test/c)",
            "tls_not_allowed",
        ),
    ];
    for (i, (leaf, why, _)) in cases.iter().enumerate() {
        expect_refused(b.addr, &pki, leaf.as_ref()).await;
        let line =
            b.wait_for_log_where(why, |l| l.contains("connection refused") && l.contains(why));
        assert!(line.contains("client=127.0.0.1:"), "case {i}: {line}");
        assert!(line.contains("close=refused"), "case {i}: {line}");
        assert!(line.contains("error=TLS handshake: "), "case {i}: {line}");
    }
    // A client that connects and closes without a byte (a port probe, a TCP health
    // check) failed no handshake: it is logged as closed, not refused.
    drop(tokio::net::TcpStream::connect(b.addr).await.unwrap());
    let line = b.wait_for_log("connection closed before a TLS handshake");
    assert!(line.contains("close=client_closed"), "{line}");
    assert_eq!(admin::refused(admin, b.addr, "tls_handshake"), 3.0);
    assert_eq!(admin::refused(admin, b.addr, "tls_not_allowed"), 1.0);
    assert_eq!(b.count_log("connection closed listen"), 0, "{:#?}", b.log());

    let a_leaf = pki.leaf("a", &[San::Dns("a.test")]);
    let mut tls = pki::connect(b.addr, &pki.ca, "b.test", Some(&a_leaf))
        .await
        .expect("an allowed client's handshake");
    let mut got = String::new();
    tls.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "served\n");
}

/// When the remote `--tls-listen` ambassador refuses this one's certificate (TLS 1.3:
/// after the client's side of the handshake), the local log says what the remote
/// said, not only that the data was invalid.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_by_the_remote_is_named_in_the_local_log() {
    let pki = Pki::new("remote-refusal");
    let b_leaf = server_leaf(&pki, "b");
    let c_leaf = pki.leaf("c", &[San::Dns("c.test")]);
    let backend = named_backend("127.0.0.1:0", "served").await;
    let mut b = tls_listener(&pki, &b_leaf, &["--tls-allow", "a.test"], backend.addr);
    let mut a = tls_sender(&pki, &c_leaf, &[], b.addr);
    assert_eq!(served_by(a.addr).await, None);
    b.wait_for_log("no name it presents is in tls_allow (presented DNS:c.test)");
    let line = a.wait_for_log_where("the remote's alert", |l| {
        l.contains("connection aborted") || l.contains("every backend failed")
    });
    assert!(
        line.contains("the peer refused the handshake") && line.contains("alert"),
        "{line}"
    );
}

/// A `tls+` backend whose certificate is not valid for the name checked
/// (`--tls-server-name`) is not connected to: the client is refused with the name and
/// the reason, counted as a `tls` connect failure of that backend.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_certificate_for_another_name_is_refused() {
    let pki = Pki::new("names");
    let b_leaf = server_leaf(&pki, "b");
    let a_leaf = pki.leaf("a", &[San::Dns("a.test")]);
    let backend = named_backend("127.0.0.1:0", "served").await;
    let b = tls_listener(&pki, &b_leaf, &[], backend.addr);
    let mut a = tls_sender(&pki, &a_leaf, &["--tls-server-name", "wrong.test"], b.addr);
    let admin = a.admin_addr();
    assert_eq!(served_by(a.addr).await, None);
    let line = a.wait_for_log("every backend failed");
    assert!(line.contains("name checked: wrong.test"), "{line}");
    assert!(
        line.contains("certificate not valid for name \\\"wrong.test\\\"")
            || line.contains("certificate not valid for name \"wrong.test\""),
        "{line}"
    );
    let series = format!(
        "ambassadord_connect_failures_total{{route=\"{}\",backend=\"{}\",reason=\"tls\"}}",
        a.addr, b.addr
    );
    assert!(admin::metric(admin, &series) >= 1.0);
    // The right name is served.
    let good = tls_sender(&pki, &a_leaf, &["--tls-server-name", "b.test"], b.addr);
    assert_eq!(served_by(good.addr).await.as_deref(), Some("served"));
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// OpenSSL's own server, requiring a client certificate (`-Verify`), as the backend
/// of a `tls+` route: it answers each line reversed (`-rev`), so a reply proves the
/// handshake, our client certificate and the bytes both ways.
#[tokio::test(flavor = "multi_thread")]
async fn openssl_s_server_requiring_a_client_certificate_is_a_tls_backend() {
    let pki = Pki::new("s-server");
    let b_leaf = server_leaf(&pki, "b");
    let a_leaf = pki.leaf("a", &[San::Dns("a.test")]);
    let port = free_port();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-naccept",
            "1",
        ])
        .args([
            "-cert",
            b_leaf.cert(),
            "-key",
            b_leaf.key(),
            "-CAfile",
            pki.ca(),
        ])
        .args(["-Verify", "1", "-verify_return_error", "-rev"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (scripts/test installs it)");
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    for out in [
        Box::new(server.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(server.stderr.take().unwrap()),
    ] {
        let said = said.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let mut said = said.lock().unwrap();
                said.push_str(&line);
                said.push('\n');
            }
        });
    }
    eventually("openssl s_server to say ACCEPT", || async {
        said.lock().unwrap().contains("ACCEPT").then_some(())
    })
    .await;
    let addr = SocketAddr::new(LOCALHOST, port);
    let a = tls_sender(&pki, &a_leaf, &[], addr);
    let mut client = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    client.write_all(b"hello through s_server\n").await.unwrap();
    let mut reply = vec![0u8; 64];
    let n = tokio::time::timeout(DEADLINE, client.read(&mut reply))
        .await
        .expect("a reply from s_server")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).to_string();
    assert!(reply.contains("revres_s hguorht olleh"), "{reply:?}");
    drop(client);
    let _ = server.kill();
    let _ = server.wait();
    let said = said.lock().unwrap().clone();
    assert!(
        said.contains("CN=a") || said.contains("CN = a"),
        "s_server did not see our certificate: {said}"
    );
}

/// OpenSSL's own client, presenting a certificate (`-cert`), against a `--tls-listen`
/// route: it is served; without a certificate it is not, and the refusal says so.
#[tokio::test(flavor = "multi_thread")]
async fn openssl_s_client_with_a_certificate_is_served_by_a_tls_listener() {
    let pki = Pki::new("s-client");
    let b_leaf = server_leaf(&pki, "b");
    let a_leaf = pki.leaf("a", &[San::Dns("a.test")]);
    let backend = named_backend("127.0.0.1:0", "served-to-openssl").await;
    let mut b = tls_listener(&pki, &b_leaf, &["--tls-allow", "a.test"], backend.addr);
    let s_client = |cert: Option<&Leaf>| {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &b.addr.to_string(),
            "-CAfile",
            pki.ca(),
        ])
        .args([
            "-verify_return_error",
            "-verify_hostname",
            "b.test",
            "-quiet",
        ]);
        if let Some(leaf) = cert {
            cmd.args(["-cert", leaf.cert(), "-key", leaf.key()]);
        }
        cmd.stdin(Stdio::null()).output().expect("openssl")
    };
    let out = s_client(Some(&a_leaf));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("served-to-openssl"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s_client(None);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("served-to-openssl"));
    b.wait_for_log("it presented no certificate");
}

/// Writes `bytes` through an echo backend and reads them back.
async fn echo(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, bytes: Vec<u8>) {
    tls.write_all(&bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, bytes);
}

/// SIGHUP reads the certificate files again (flags only: no `--config` is needed): an
/// open connection keeps going, the next one is shown the new certificate; a file that
/// no longer parses is a rejected reload, and the material in force keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_the_certificate_for_new_connections() {
    let pki = Pki::new("rotation");
    let first = server_leaf(&pki, "b1");
    let second = server_leaf(&pki, "b2");
    let a_leaf = pki.leaf("a", &[San::Dns("a.test")]);
    let live = Leaf {
        cert: pki.dir().join("live.pem"),
        key: pki.dir().join("live.key"),
        der: Vec::new(),
    };
    let install = |leaf: &Leaf| {
        std::fs::copy(&leaf.cert, &live.cert).unwrap();
        std::fs::copy(&leaf.key, &live.key).unwrap();
    };
    install(&first);
    let backend = tagged_echo("echo").await;
    // A port of its own: a reload keeps a route by its listen address, and port 0
    // would be a new one each time.
    let port = free_port().to_string();
    let backend_addr = backend.addr.to_string();
    let mut args = vec!["--bind", "127.0.0.1", "--port", &port];
    args.extend(pki.listen_args(&live));
    args.push(&backend_addr);
    let mut b = Ambassador::start(&args);

    let mut open = pki::connect(b.addr, &pki.ca, "b.test", Some(&a_leaf))
        .await
        .unwrap();
    assert!(pki::presents(&open, &first));
    let mut greeting = [0u8; 5];
    open.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"echo\n");
    echo(&mut open, pattern(1, 100_000)).await;

    install(&second);
    b.signal("HUP");
    b.wait_for_log("TLS files read again");
    echo(&mut open, pattern(2, 100_000)).await;
    let next = pki::connect(b.addr, &pki.ca, "b.test", Some(&a_leaf))
        .await
        .unwrap();
    assert!(
        pki::presents(&next, &second),
        "the new connection got the old certificate"
    );
    drop(next);

    std::fs::write(&live.cert, "not a certificate\n").unwrap();
    b.signal("HUP");
    let line = b.wait_for_log("reload rejected");
    assert!(line.contains("live.pem"), "{line}");
    assert!(line.contains("no certificate in it"), "{line}");
    let after = pki::connect(b.addr, &pki.ca, "b.test", Some(&a_leaf))
        .await
        .unwrap();
    assert!(pki::presents(&after, &second));
    echo(&mut open, pattern(3, 100_000)).await;
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// The README's one command for certificates (scripts/make-certs) makes a CA and
/// certificates two ambassadors accept from each other, a URI name checked by
/// `--tls-allow` and a DNS name by `--tls-server-name`.
#[tokio::test(flavor = "multi_thread")]
async fn make_certs_makes_what_a_pair_of_ambassadors_accepts() {
    let dir = crate::support::docker::TempDir::new("make-certs").unwrap();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/make-certs"))
        .arg(dir.path())
        .args([
            "host-a=URI:spiffe://example.org/host-a",
            "host-b=DNS:host-b.internal,IP:127.0.0.1",
        ])
        .output()
        .expect("scripts/make-certs runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let backend = named_backend("127.0.0.1:0", "made").await;
    let backend_addr = backend.addr.to_string();
    let (ca, a_cert, a_key, b_cert, b_key) = (
        file("ca.pem"),
        file("host-a.pem"),
        file("host-a.key"),
        file("host-b.pem"),
        file("host-b.key"),
    );
    let b = Ambassador::on_loopback(&[
        "--tls-listen",
        "--tls-cert",
        &b_cert,
        "--tls-key",
        &b_key,
        "--tls-ca",
        &ca,
        "--tls-allow",
        "spiffe://example.org/host-a",
        &backend_addr,
    ]);
    let remote = format!("tls+{}", b.addr);
    let a = Ambassador::on_loopback(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &a_cert,
        "--tls-key",
        &a_key,
        "--tls-server-name",
        "host-b.internal",
        &remote,
    ]);
    assert_eq!(served_by(a.addr).await.as_deref(), Some("made"));
}
