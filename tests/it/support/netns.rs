//! Network namespaces of a test's own: a test host on this machine, with loopback up,
//! optionally joined to the test's namespace by a veth pair, deleted when dropped even
//! when the test fails (which also deletes the veth pair, whose other end lives in it).
//!
//! Creating one needs root: the test command runs as root, so a test without it fails
//! saying so rather than passing without having run.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output};

use nix::sched::CloneFlags;

/// Runs a command, panicking with its output when it cannot run or fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails the test unless it runs as root (namespaces, nf_tables, setns).
pub fn require_root(what: &str) {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    });
    assert!(
        root,
        "{what} needs root (run the tests as root, as scripts/test and CI do)"
    );
}

pub struct Netns {
    pub name: String,
    veth: Option<String>,
}

impl Netns {
    /// Creates the namespace with loopback up.
    pub fn new() -> Netns {
        require_root("creating a network namespace");
        let name = format!("amb-test-{}", fastrand::u32(..));
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name, veth: None };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip netns exec NS program args...` and returns its output, failing or not.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Runs the real binary in the namespace to completion.
    pub fn ambassadord(&self, args: &[&str]) -> Output {
        self.exec(env!("CARGO_BIN_EXE_ambassadord"), args)
    }

    /// Connects this namespace to the test's own with a veth pair, addresses in the
    /// benchmarking ranges (198.18.0.0/15, and a ULA prefix for IPv6) used only between
    /// the two. Returns the namespace side's IPv4 and IPv6 addresses.
    pub fn veth(&mut self) -> (Ipv4Addr, Ipv6Addr) {
        let tag = fastrand::u32(..0x100_0000);
        let (host, inner) = (format!("ambh{tag:06x}"), format!("ambn{tag:06x}"));
        run(
            "ip",
            &[
                "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", &self.name,
            ],
        );
        self.veth = Some(host.clone());
        let (a, b) = ((tag >> 8) as u8, (tag as u8) & 0xfc);
        let v4 = |last: u8| Ipv4Addr::new(198, 18, a, b + last);
        let v6 = |last: u16| {
            Ipv6Addr::new(
                0xfd61,
                0x6d62,
                (tag >> 16) as u16,
                tag as u16,
                0,
                0,
                0,
                last,
            )
        };
        let v4_net = |last| format!("{}/30", v4(last));
        let v6_net = |last| format!("{}/64", v6(last));
        run("ip", &["addr", "add", &v4_net(1), "dev", &host]);
        run(
            "ip",
            &["-6", "addr", "add", &v6_net(1), "dev", &host, "nodad"],
        );
        run("ip", &["link", "set", &host, "up"]);
        let ns = |args: &[&str]| run("ip", &[&["-n", &self.name][..], args].concat());
        ns(&["addr", "add", &v4_net(2), "dev", &inner]);
        ns(&["-6", "addr", "add", &v6_net(2), "dev", &inner, "nodad"]);
        ns(&["link", "set", &inner, "up"]);
        (v4(2), v6(2))
    }

    /// Joins this namespace to `other` with a veth pair of their own (two hosts on one
    /// link, 198.18.0.0/15 addresses, /30). Returns this side's interface name and
    /// address, and the other side's address.
    pub fn join(&mut self, other: &Netns) -> (String, Ipv4Addr, Ipv4Addr) {
        let tag = fastrand::u32(..0x100_0000);
        let (here, there) = (format!("amba{tag:06x}"), format!("ambb{tag:06x}"));
        run(
            "ip",
            &[
                "link",
                "add",
                &here,
                "netns",
                &self.name,
                "type",
                "veth",
                "peer",
                "name",
                &there,
                "netns",
                &other.name,
            ],
        );
        let (a, b) = ((tag >> 8) as u8 | 0x80, (tag as u8) & 0xfc);
        let ip = |last: u8| Ipv4Addr::new(198, 19, a, b + last);
        for (ns, dev, last) in [(&self.name, &here, 1), (&other.name, &there, 2)] {
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/30", ip(last)),
                    "dev",
                    dev,
                ],
            );
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        (here, ip(1), ip(2))
    }

    /// Runs `f` on a thread that has entered the namespace, so sockets it creates live
    /// there (sockets keep their namespace when used from any other thread afterwards).
    pub fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread inside the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(veth) = &self.veth {
            let _ = Command::new("ip").args(["link", "del", veth]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
