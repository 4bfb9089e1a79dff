//! Omni mode's redirect, kept with the ambassador: installed by the ambassador itself at
//! every start when it may, and watched for as long as it runs.
//!
//! A container's network namespace, and the nat table in it, is new at every start, so a
//! redirect set up once by `--setup-iptables` is gone after `docker restart`. Given
//! CAP_NET_ADMIN, omni mode therefore installs the same plan ([`crate::netfilter`]) in its
//! own namespace as it starts. It does so only where the namespace is plainly its own: in
//! a container (`/.dockerenv`, `/run/.containerenv`) where nothing else listens beyond
//! loopback. On a host, or beside other services, a redirect of every incoming TCP
//! connection would take theirs (ssh among them), so there it says why it did not.
//!
//! Whether a redirect is in place (ours, or one `--setup-iptables` installed) is learnt
//! by the probe rule: a connection to 127.0.0.1:[`PROBE_PORT`] reaches the omni listener
//! only through the table. This needs no privilege, so an ambassador without the
//! capability still knows; nf_tables itself cannot even be read without CAP_NET_ADMIN.
//! The probe runs every second while the redirect is missing and every ten while it is
//! in place; each change is logged once, and `/readyz` is 503 while it is missing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::netfilter::{self, NetfilterError, PROBE_PORT, Plan};
use crate::status::RedirectState;

/// How long a probe connection may take. On loopback it is answered in microseconds
/// either way (accepted through the table, or refused without it).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_WHILE_MISSING: Duration = Duration::from_secs(1);
const PROBE_WHILE_IN_PLACE: Duration = Duration::from_secs(10);

/// What the ambassador did about the redirect as it started, for the missing warning.
#[derive(Debug)]
enum Attempt {
    Installed,
    NotInContainer,
    /// A link only a host's namespace has (a Docker bridge, a veth end): a container
    /// run with `--network host`.
    HostNamespace(String),
    OthersListen(Vec<u16>),
    Failed(NetfilterError),
}

/// The redirect of one omni listener: its plan, what was done at start, and what the
/// probe last saw.
pub struct Redirect {
    plan: Plan,
    state: Mutex<(RedirectState, Option<String>)>,
}

impl Redirect {
    /// Installs the redirect where the ambassador may and watches it until `stop`.
    /// `listen` is the omni listener's bound address; `ours` the omni and admin ports
    /// (their listeners do not stop it installing); `routes` the ports the process's
    /// other routes listen on beyond loopback, bound yet or not: the redirect would take
    /// their connections, so they stop it as another service's listener would.
    pub fn start(
        plan: Plan,
        listen: SocketAddr,
        ours: Vec<u16>,
        routes: Vec<u16>,
        stop: CancellationToken,
    ) -> std::sync::Arc<Redirect> {
        let redirect = std::sync::Arc::new(Redirect {
            plan,
            state: Mutex::new((RedirectState::Unknown, None)),
        });
        let attempt = install(plan, &ours, &routes);
        if let Attempt::Installed = attempt {
            match plan.keep {
                Some(admin) => info!(
                    port = plan.port,
                    kept = admin,
                    "omni: installed the redirect of incoming TCP in this network namespace (the admin port is kept out of it)"
                ),
                None => info!(
                    port = plan.port,
                    "omni: installed the redirect of incoming TCP in this network namespace"
                ),
            }
        }
        // The probe reaches the listener at 127.0.0.1, as redirected incoming traffic
        // reaches it at the interface's address: only a listener on every address
        // gets both, so only one can be probed. Elsewhere the redirect stays unknown
        // (and does not hold readiness back).
        if listen.ip().is_unspecified() {
            tokio::spawn(watch(redirect.clone(), attempt, stop));
        }
        redirect
    }

    pub fn state(&self) -> RedirectState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// `Err` with why, while the probe finds no redirect.
    pub fn check(&self) -> Result<(), String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match (state.0, &state.1) {
            (RedirectState::Missing, why) => Err(format!(
                "no redirect of incoming TCP to port {} is installed{}",
                self.plan.port,
                why.as_deref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }

    fn set(&self, state: RedirectState, why: Option<String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (state, why);
    }
}

/// Installs the plan if this namespace is plainly the ambassador's own.
fn install(plan: Plan, ours: &[u16], routes: &[u16]) -> Attempt {
    let refused = refusal(
        in_container(),
        host_link(),
        foreign_listeners(ours),
        ours,
        routes,
    );
    if let Some(refused) = refused {
        return refused;
    }
    match netfilter::setup_redirect(plan) {
        Ok(()) => Attempt::Installed,
        Err(e) => Attempt::Failed(e),
    }
}

/// Why the redirect must not be installed here, if it must not: not in a container, a
/// host's namespace, or ports beyond `ours` that listen (`listening`) or that the
/// process's own other routes listen on (`routes`, bound yet or not).
fn refusal(
    in_container: bool,
    host_link: Option<String>,
    mut listening: Vec<u16>,
    ours: &[u16],
    routes: &[u16],
) -> Option<Attempt> {
    if !in_container {
        return Some(Attempt::NotInContainer);
    }
    if let Some(link) = host_link {
        return Some(Attempt::HostNamespace(link));
    }
    listening.extend(routes.iter().filter(|p| !ours.contains(p)));
    listening.sort_unstable();
    listening.dedup();
    (!listening.is_empty()).then_some(Attempt::OthersListen(listening))
}

/// The warning for a missing redirect: what happened at start and what to do, one line,
/// and the short reason `/readyz` gives.
fn missing(attempt: &Attempt) -> (String, &'static str) {
    const FIX: &str = "run this container with --cap-add NET_ADMIN (it then installs the redirect at every start), or run `ambassadord --setup-iptables` with NET_ADMIN in its network namespace after every start";
    match attempt {
        Attempt::Failed(NetfilterError::Permission { .. }) => (
            format!(
                "omni: no redirect of incoming TCP is installed in this network namespace, and this process lacks CAP_NET_ADMIN to install one: only connections to the omni port itself arrive; {FIX}"
            ),
            "no CAP_NET_ADMIN to install it",
        ),
        Attempt::Failed(e) => (
            format!("omni: no redirect of incoming TCP is installed: {e}"),
            "installing it failed",
        ),
        Attempt::NotInContainer => (
            "omni: no redirect of incoming TCP is installed, and not in a container, so the ambassador does not install one (on a host it would take every service's connections); run `ambassadord --setup-iptables` in a network namespace that is the ambassador's alone".to_string(),
            "not installed outside a container",
        ),
        Attempt::HostNamespace(link) => (
            format!(
                "omni: no redirect of incoming TCP is installed, and this network namespace has the link '{}', so it is the host's (--network host?): the ambassador does not install a redirect that would take every service's connections; run it in a network namespace of its own, or run `ambassadord --setup-iptables` where that is what you want",
                crate::logsafe::outside(link)
            ),
            "the namespace is the host's",
        ),
        Attempt::OthersListen(ports) => (
            format!(
                "omni: no redirect of incoming TCP is installed, and other services listen in this network namespace (port {}), so the ambassador does not install one that would take their connections; give the ambassador a namespace of its own, or run `ambassadord --setup-iptables` there if that is what you want",
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "other services listen in this namespace",
        ),
        Attempt::Installed => (
            "omni: the redirect this process installed does not answer its probe".to_string(),
            "installed, but the probe does not pass",
        ),
    }
}

/// Probes until `stop`, logging each change once.
async fn watch(redirect: std::sync::Arc<Redirect>, attempt: Attempt, stop: CancellationToken) {
    let mut last = RedirectState::Unknown;
    loop {
        let now = if probe().await {
            RedirectState::InPlace
        } else {
            RedirectState::Missing
        };
        if now != last {
            match (last, now) {
                (_, RedirectState::Missing) => {
                    let (line, why) = if last == RedirectState::Unknown {
                        missing(&attempt)
                    } else {
                        (
                            "omni: the redirect of incoming TCP is gone from this network namespace (removed, or the table replaced); only connections to the omni port itself arrive".to_string(),
                            "it was removed",
                        )
                    };
                    warn!("{line}");
                    redirect.set(now, Some(why.to_string()));
                }
                (RedirectState::Unknown, RedirectState::InPlace)
                    if matches!(attempt, Attempt::Installed) =>
                {
                    redirect.set(now, None);
                }
                _ => {
                    info!(
                        port = redirect.plan.port,
                        "omni: a redirect of incoming TCP is in place in this network namespace"
                    );
                    redirect.set(now, None);
                }
            }
            last = now;
        }
        let every = match now {
            RedirectState::InPlace => PROBE_WHILE_IN_PLACE,
            _ => PROBE_WHILE_MISSING,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Whether a connection to the probe port reaches the omni listener, which only the
/// table's probe rule makes happen.
async fn probe() -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, PROBE_PORT));
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Whether `peer` connecting to original port `port` is this process's own probe.
pub fn is_probe(peer: IpAddr, port: u16) -> bool {
    port == PROBE_PORT && peer.is_loopback()
}

/// Whether this process runs in a container: the marker files Docker and Podman put at
/// the root of every container's file system.
fn in_container() -> bool {
    ["/.dockerenv", "/run/.containerenv"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}

/// The first network link that only a host's namespace has: a Docker bridge (`docker0`,
/// `br-…`) or the host end of a container's veth pair.
fn host_link() -> Option<String> {
    let links = std::fs::read_dir("/sys/class/net").ok()?;
    links
        .filter_map(|l| l.ok()?.file_name().into_string().ok())
        .find(|name| name == "docker0" || name.starts_with("br-") || name.starts_with("veth"))
}

/// Ports other than `ours` with a TCP listener beyond loopback in this network namespace
/// (sorted, each once): the connections a redirect of everything would take from them.
fn foreign_listeners(ours: &[u16]) -> Vec<u16> {
    let mut ports: Vec<u16> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|table| listeners(&table))
        .filter(|(ip, port)| !ip.is_loopback() && !ours.contains(port))
        .map(|(_, port)| port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The listening sockets in a `/proc/net/tcp` or `/proc/net/tcp6` table. Addresses are
/// printed as 32-bit words in host byte order; a line that does not parse is skipped.
fn listeners(table: &str) -> Vec<(IpAddr, u16)> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != LISTEN {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let words = (0..ip.len() / 8)
                .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
                .collect::<Option<Vec<u32>>>()?;
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let ip = match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
                16 => {
                    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
                    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
                }
                _ => return None,
            };
            Some((ip, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as Linux prints them (x86-64, little-endian): sshd on 0.0.0.0:22, a resolver
    /// on 127.0.0.53:53, an established connection, and over IPv6 a listener on [::]:80,
    /// on [::1]:631 and on ::ffff:127.0.0.1:8080.
    #[test]
    fn listeners_are_read_from_proc_net_tcp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 3500007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 2 1 0 100 0 0 10 5
   2: 0100007F:A1B2 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: garbage
";
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6 1 0 100 0 0 10 0
";
        if cfg!(target_endian = "little") {
            assert_eq!(
                listeners(tcp),
                [
                    ("0.0.0.0".parse().unwrap(), 22),
                    ("127.0.0.53".parse().unwrap(), 53)
                ]
            );
            assert_eq!(
                listeners(tcp6),
                [
                    ("::".parse().unwrap(), 80),
                    ("::1".parse().unwrap(), 631),
                    ("127.0.0.1".parse().unwrap(), 8080)
                ]
            );
        }
    }

    /// This machine's own table parses, and every listener the test opens is found.
    #[test]
    fn a_listener_of_this_process_is_found() {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(foreign_listeners(&[]).contains(&port));
        assert!(!foreign_listeners(&[port]).contains(&port));
        let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lo_port = lo.local_addr().unwrap().port();
        assert!(
            !foreign_listeners(&[]).contains(&lo_port),
            "loopback ignored"
        );
    }

    #[test]
    fn missing_lines_are_one_line_and_say_what_to_do() {
        for attempt in [
            Attempt::Failed(NetfilterError::Permission {
                op: netfilter::Op::Setup,
            }),
            Attempt::NotInContainer,
            Attempt::HostNamespace("docker0".into()),
            Attempt::OthersListen(vec![22, 80]),
        ] {
            let (line, why) = missing(&attempt);
            assert!(!line.contains('\n'), "{line}");
            assert!(line.contains("--setup-iptables"), "{line}");
            assert!(!why.is_empty());
        }
        let (line, _) = missing(&Attempt::OthersListen(vec![22, 80]));
        assert!(line.contains("port 22, 80"), "{line}");
    }

    /// The process's own other routes stop the install even before they are bound
    /// (they are bound after the omni route when they come after it); the omni and
    /// admin ports do not; a host's namespace and a plain process never install.
    #[test]
    fn other_routes_and_hosts_refuse_the_install() {
        let ours = [10000, 10001];
        let refused = |c, link: Option<&str>, listening: Vec<u16>, routes: &[u16]| {
            refusal(c, link.map(str::to_string), listening, &ours, routes)
        };
        assert!(refused(true, None, vec![], &[]).is_none());
        assert!(refused(true, None, vec![], &[10000]).is_none());
        assert!(matches!(
            refused(true, None, vec![], &[6379]),
            Some(Attempt::OthersListen(p)) if p == [6379]
        ));
        assert!(matches!(
            refused(true, None, vec![22, 6379], &[6379]),
            Some(Attempt::OthersListen(p)) if p == [22, 6379]
        ));
        assert!(matches!(
            refused(true, Some("docker0"), vec![], &[]),
            Some(Attempt::HostNamespace(l)) if l == "docker0"
        ));
        assert!(matches!(
            refused(false, None, vec![], &[]),
            Some(Attempt::NotInContainer)
        ));
    }
}
