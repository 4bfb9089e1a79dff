//! `--setup-iptables` / `--remove-iptables`: the nat prerouting REDIRECT that sends every
//! incoming TCP connection in this network namespace to the omni port, programmed through
//! nf_tables over netlink so that it works from a FROM-scratch image with no iptables or
//! nft binary.
//!
//! The rule plan is the nft equivalent of
//!
//! ```text
//! table inet ambassadord {
//!   chain prerouting {
//!     type nat hook prerouting priority dstnat; policy accept;
//!     meta l4proto tcp redirect to :PORT        # or, keeping the admin port:
//!     tcp dport != ADMIN redirect to :PORT
//!   }
//!   chain output {
//!     type nat hook output priority -100; policy accept;
//!     ip daddr 127.0.0.1 tcp dport 1 redirect to :PORT
//!   }
//! }
//! ```
//!
//! The admin port is kept out of the redirect when the admin endpoint listens beyond
//! loopback, so a scraper on the network reaches it. The output rule is the probe: it
//! catches only the ambassador's own connections to 127.0.0.1:[`PROBE_PORT`], which lets
//! a process without CAP_NET_ADMIN (which cannot read nf_tables at all) learn whether the
//! redirect is in place by connecting there (see src/redirect.rs).
//!
//! It is sent as one atomic nfnetlink batch: add table, delete table, add table, add the
//! two chains, add the two rules. Adding a table that exists is not an error, so the first
//! two steps remove any earlier copy whatever state it was in; the batch is applied all or
//! nothing, so running it twice leaves exactly one copy and never a moment with none or
//! two. Removal is the same trick: add table, delete table.
//!
//! The `inet` family covers IPv4 and IPv6 with one chain; nat chains in it need Linux 5.2
//! or later. Only the first packet of a connection passes nat chains, so replies to the
//! ambassador's own outgoing connections and traffic it sends itself (OUTPUT, even over
//! loopback) are not touched. Every other incoming TCP connection is, including ones to
//! other services sharing the namespace: put nothing else in it.

use std::io::{self, Read};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// The nf_tables table (and so the whole plan) this module owns.
pub const TABLE: &str = "ambassadord";
/// The chain in [`TABLE`] that redirects incoming connections.
pub const CHAIN: &str = "prerouting";
/// The chain in [`TABLE`] that holds the probe rule.
pub const PROBE_CHAIN: &str = "output";
/// The ambassador's own connections to 127.0.0.1 on this port are redirected too: a
/// connection that succeeds proves the table is in place. Port 1 (tcpmux) has no
/// listener in an ambassador's namespace, so without the table it is refused at once.
pub const PROBE_PORT: u16 = 1;

/// What the redirect does: every incoming TCP connection goes to `port`, except those to
/// `keep` (the admin port, when the admin endpoint listens beyond loopback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub port: u16,
    pub keep: Option<u16>,
}

/// How long to wait for the kernel's answer before giving up (it answers in microseconds;
/// this only guards against hanging forever on a kernel that never replies).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

// Linux UAPI numbers (linux/netlink.h, linux/netfilter/nfnetlink.h, nf_tables.h). They are
// fixed ABI, so they are spelled out here rather than pulled in with a libc dependency.
const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_HDRLEN: usize = 16;
const NLA_F_NESTED: u16 = 0x8000;

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNETLINK_V0: u8 = 0;
const AF_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;

const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
/// `priority dstnat` (NF_IP_PRI_NAT_DST): where iptables' nat PREROUTING sits too.
const NF_IP_PRI_NAT_DST: i32 = -100;
const NF_ACCEPT: u32 = 1;
const NFT_REG_1: u32 = 1;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFPROTO_IPV4: u8 = 2;
const IPPROTO_TCP: u8 = 6;
/// Where the destination address and port sit in their headers.
const IPV4_DADDR_OFFSET: u32 = 16;
const TCP_DPORT_OFFSET: u32 = 2;
/// NF_NAT_RANGE_PROTO_SPECIFIED: the redirect names a port (nft sets it; so do we).
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EOPNOTSUPP: i32 = 95;
const EPROTONOSUPPORT: i32 = 93;
const EAFNOSUPPORT: i32 = 97;

/// What the caller asked for, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Setup,
    Remove,
}

impl Op {
    fn doing(self) -> &'static str {
        match self {
            Op::Setup => "setting up the redirect",
            Op::Remove => "removing the redirect",
        }
    }
}

/// Why the redirect could not be set up or removed. Each message is one line and says
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error(
        "{} needs CAP_NET_ADMIN (run the container with --privileged or --cap-add NET_ADMIN)",
        .op.doing()
    )]
    Permission { op: Op },
    #[error(
        "{}: this kernel has no nf_tables (CONFIG_NF_TABLES, module nf_tables): {source}",
        .op.doing()
    )]
    NoNfTables { op: Op, source: io::Error },
    #[error("{}: cannot talk to nf_tables over netlink: {source}", .op.doing())]
    Socket { op: Op, source: io::Error },
    #[error(
        "{}: the kernel refused to {step}: {source}{hint}",
        .op.doing(),
        hint = hint(.source)
    )]
    Kernel {
        op: Op,
        step: &'static str,
        source: io::Error,
    },
    #[error("{}: no answer from nf_tables within {:?}", .op.doing(), REPLY_TIMEOUT)]
    NoAnswer { op: Op },
    #[error("{}: unreadable netlink reply from the kernel: {why}", .op.doing())]
    BadReply { op: Op, why: String },
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(ENOENT) | Some(EOPNOTSUPP) => {
            " (inet nat chains and redirect need Linux 5.2 or later with nft_chain_nat and nft_redir)"
        }
        _ => "",
    }
}

/// Installs (or replaces) the redirect of every incoming TCP connection in the current
/// network namespace to `plan.port` (but those to `plan.keep`), with the probe rule.
pub fn setup_redirect(plan: Plan) -> Result<(), NetfilterError> {
    apply(Op::Setup, &setup_batch(plan, initial_seq()))
}

/// Removes the redirect; succeeds when there is none.
pub fn remove_redirect() -> Result<(), NetfilterError> {
    apply(Op::Remove, &remove_batch(initial_seq()))
}

/// A starting sequence number that differs between runs, so a stray reply to an earlier
/// process on a reused port id is not mistaken for ours.
fn initial_seq() -> u32 {
    fastrand::u32(1..u32::MAX / 2)
}

/// One nfnetlink batch, ready to send, and what each of its messages does (by sequence
/// number) so an error can say which step failed.
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    steps: Vec<(u32, &'static str, bool)>,
}

impl Batch {
    fn new(seq: u32) -> Batch {
        let mut b = Batch {
            bytes: Vec::new(),
            steps: Vec::new(),
        };
        // Batch begin/end carry the subsystem in res_id and ask for no ACK: the kernel
        // answers the members, and an error about the batch itself (EPERM) arrives
        // against the begin message's sequence number.
        let m = Msg::start(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        b.push(m.finish(), seq, "start a netlink batch", false);
        b
    }

    fn push(&mut self, bytes: Vec<u8>, seq: u32, step: &'static str, acked: bool) {
        self.bytes.extend_from_slice(&bytes);
        self.steps.push((seq, step, acked));
    }

    fn next_seq(&self) -> u32 {
        self.steps.last().map_or(0, |s| s.0.wrapping_add(1))
    }

    /// Adds one nf_tables message, asking for an ACK so every step is confirmed.
    fn member(&mut self, kind: u16, flags: u16, step: &'static str, body: impl FnOnce(&mut Msg)) {
        let seq = self.next_seq();
        let mut m = Msg::start(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_INET,
            0,
        );
        body(&mut m);
        self.push(m.finish(), seq, step, true);
    }

    fn end(mut self) -> Batch {
        let seq = self.next_seq();
        let m = Msg::start(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.push(m.finish(), seq, "commit the netlink batch", false);
        self
    }

    fn step(&self, seq: u32) -> Option<&'static str> {
        self.steps.iter().find(|s| s.0 == seq).map(|s| s.1)
    }
}

/// `table inet ambassadord` (created if missing, left alone if present).
fn add_table(b: &mut Batch) {
    b.member(NFT_MSG_NEWTABLE, 0, "create the ambassadord table", |m| {
        m.str(NFTA_TABLE_NAME, TABLE);
        m.u32(NFTA_TABLE_FLAGS, 0);
    });
}

fn delete_table(b: &mut Batch) {
    b.member(NFT_MSG_DELTABLE, 0, "delete the ambassadord table", |m| {
        m.str(NFTA_TABLE_NAME, TABLE);
    });
}

/// The batch for `--setup-iptables`: replaces any earlier table with a fresh one holding
/// the two nat chains and their rules, in the order nft sends them.
pub fn setup_batch(plan: Plan, seq: u32) -> Batch {
    let mut b = Batch::new(seq);
    add_table(&mut b);
    delete_table(&mut b);
    add_table(&mut b);
    add_nat_chain(
        &mut b,
        CHAIN,
        NF_INET_PRE_ROUTING,
        "create the nat prerouting chain",
    );
    add_nat_chain(
        &mut b,
        PROBE_CHAIN,
        NF_INET_LOCAL_OUT,
        "create the nat output chain",
    );
    b.member(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        "add the redirect rule",
        |m| {
            m.str(NFTA_RULE_TABLE, TABLE);
            m.str(NFTA_RULE_CHAIN, CHAIN);
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                match_byte(m, NFT_META_L4PROTO, IPPROTO_TCP);
                if let Some(keep) = plan.keep {
                    match_payload(m, TCP_PORT, NFT_CMP_NEQ, &keep.to_be_bytes());
                }
                redirect_to(m, plan.port);
            });
        },
    );
    b.member(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        "add the probe rule",
        |m| {
            m.str(NFTA_RULE_TABLE, TABLE);
            m.str(NFTA_RULE_CHAIN, PROBE_CHAIN);
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                match_byte(m, NFT_META_NFPROTO, NFPROTO_IPV4);
                match_payload(m, IPV4_DADDR, NFT_CMP_EQ, &[127, 0, 0, 1]);
                match_byte(m, NFT_META_L4PROTO, IPPROTO_TCP);
                match_payload(m, TCP_PORT, NFT_CMP_EQ, &PROBE_PORT.to_be_bytes());
                redirect_to(m, plan.port);
            });
        },
    );
    b.end()
}

/// A base chain of type nat on `hook` at the dstnat priority, accepting by default.
fn add_nat_chain(b: &mut Batch, name: &str, hook: u32, step: &'static str) {
    b.member(NFT_MSG_NEWCHAIN, NLM_F_CREATE, step, |m| {
        m.str(NFTA_CHAIN_TABLE, TABLE);
        m.str(NFTA_CHAIN_NAME, name);
        m.str(NFTA_CHAIN_TYPE, "nat");
        m.u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        m.nest(NFTA_CHAIN_HOOK, |m| {
            m.u32(NFTA_HOOK_HOOKNUM, hook);
            m.u32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_DST as u32);
        });
    });
}

/// `meta load KEY => reg 1; cmp eq reg 1 VALUE`: l4proto or nfproto, one byte each.
fn match_byte(m: &mut Msg, key: u32, value: u8) {
    m.expr("meta", |m| {
        m.u32(NFTA_META_KEY, key);
        m.u32(NFTA_META_DREG, NFT_REG_1);
    });
    compare(m, NFT_CMP_EQ, &[value]);
}

/// A header field: its base and its offset in that header.
struct Field {
    base: u32,
    offset: u32,
}

const TCP_PORT: Field = Field {
    base: NFT_PAYLOAD_TRANSPORT_HEADER,
    offset: TCP_DPORT_OFFSET,
};
const IPV4_DADDR: Field = Field {
    base: NFT_PAYLOAD_NETWORK_HEADER,
    offset: IPV4_DADDR_OFFSET,
};

/// `payload load LEN @ BASE + OFFSET => reg 1; cmp OP reg 1 VALUE` (network byte order).
fn match_payload(m: &mut Msg, field: Field, op: u32, value: &[u8]) {
    m.expr("payload", |m| {
        m.u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        m.u32(NFTA_PAYLOAD_BASE, field.base);
        m.u32(NFTA_PAYLOAD_OFFSET, field.offset);
        m.u32(NFTA_PAYLOAD_LEN, value.len() as u32);
    });
    compare(m, op, value);
}

fn compare(m: &mut Msg, op: u32, value: &[u8]) {
    m.expr("cmp", |m| {
        m.u32(NFTA_CMP_SREG, NFT_REG_1);
        m.u32(NFTA_CMP_OP, op);
        m.nest(NFTA_CMP_DATA, |m| m.bytes(NFTA_DATA_VALUE, value));
    });
}

/// `immediate reg 1 PORT; redir proto_min reg 1`.
fn redirect_to(m: &mut Msg, port: u16) {
    m.expr("immediate", |m| {
        m.u32(NFTA_IMMEDIATE_DREG, NFT_REG_1);
        m.nest(NFTA_IMMEDIATE_DATA, |m| {
            m.bytes(NFTA_DATA_VALUE, &port.to_be_bytes())
        });
    });
    m.expr("redir", |m| {
        m.u32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1);
        m.u32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
    });
}

/// The batch for `--remove-iptables`: add-then-delete, so a missing table is no error.
pub fn remove_batch(seq: u32) -> Batch {
    let mut b = Batch::new(seq);
    add_table(&mut b);
    delete_table(&mut b);
    b.end()
}

/// One netlink message being built: nlmsghdr + nfgenmsg + attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn start(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.push(family);
        buf.push(NFNETLINK_V0);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }

    /// An attribute: nlattr header in host order, payload, zero padding to 4 bytes. The
    /// header's length counts the payload but not the padding.
    fn bytes(&mut self, kind: u16, payload: &[u8]) {
        let len = (4 + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A NUL-terminated string, as nf_tables' NLA_STRING attributes expect.
    fn str(&mut self, kind: u16, s: &str) {
        let mut payload = Vec::with_capacity(s.len() + 1);
        payload.extend_from_slice(s.as_bytes());
        payload.push(0);
        self.bytes(kind, &payload);
    }

    /// nf_tables takes its integers in network byte order.
    fn u32(&mut self, kind: u16, v: u32) {
        self.bytes(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, body: impl FnOnce(&mut Msg)) {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        body(self);
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// One element of a rule's expression list: its name and its data.
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Msg)) {
        self.nest(NFTA_LIST_ELEM, |m| {
            m.str(NFTA_EXPR_NAME, name);
            m.nest(NFTA_EXPR_DATA, data);
        });
    }
}

/// Sends the batch and waits for the kernel to confirm every member, or reports the first
/// error it sends back (with the step it belongs to).
fn apply(op: Op, batch: &Batch) -> Result<(), NetfilterError> {
    let socket = Socket::new(
        Domain::from(AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(NETLINK_NETFILTER)),
    )
    .map_err(|source| match source.raw_os_error() {
        Some(EPROTONOSUPPORT) | Some(EAFNOSUPPORT) => NetfilterError::NoNfTables { op, source },
        _ => NetfilterError::Socket { op, source },
    })?;
    socket
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|source| NetfilterError::Socket { op, source })?;
    // With no address, a netlink socket sends to the kernel (port id 0) and is bound to
    // a port id of its own on the first send.
    socket
        .send(&batch.bytes)
        .map_err(|source| NetfilterError::Socket { op, source })?;

    let mut pending: Vec<u32> = batch.steps.iter().filter(|s| s.2).map(|s| s.0).collect();
    let mut buf = vec![0u8; 64 * 1024];
    while !pending.is_empty() {
        let n = match (&socket).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(NetfilterError::NoAnswer { op });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(NetfilterError::Socket { op, source }),
        };
        for reply in parse_replies(&buf[..n]).map_err(|why| NetfilterError::BadReply { op, why })? {
            let Reply::Ack { seq, errno } = reply else {
                continue;
            };
            if errno == 0 {
                pending.retain(|&s| s != seq);
                continue;
            }
            if errno == EPERM {
                return Err(NetfilterError::Permission { op });
            }
            // nfnetlink refuses the batch itself when the nf_tables subsystem is missing.
            if errno == EOPNOTSUPP && Some(&seq) == batch.steps.first().map(|s| &s.0) {
                return Err(NetfilterError::NoNfTables {
                    op,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
            return Err(NetfilterError::Kernel {
                op,
                step: batch.step(seq).unwrap_or("apply the netlink batch"),
                source: io::Error::from_raw_os_error(errno),
            });
        }
    }
    Ok(())
}

/// What the kernel said about one of our messages.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// NLMSG_ERROR: `errno` 0 is an ACK, otherwise the positive errno of the failure.
    Ack {
        seq: u32,
        errno: i32,
    },
    Other,
}

/// Splits a datagram into netlink messages and decodes the NLMSG_ERROR ones.
fn parse_replies(mut data: &[u8]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes"));
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(format!(
                "message length {len} with {} bytes left",
                data.len()
            ));
        }
        if kind == NLMSG_ERROR {
            let Some(code) = data.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4) else {
                return Err("error message without an error code".into());
            };
            let code = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
            out.push(Reply::Ack {
                seq,
                errno: code.saturating_neg(),
            });
        } else {
            out.push(Reply::Other);
        }
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `nft -f` sent for the plan in the module doc with port 10000 and no kept port
    /// (captured with `strace -e trace=sendmsg -e write=all -xx nft -f plan.nft` from
    /// nftables 1.0.6 on Linux 6.18, sequence numbers starting at 0): begin, add table,
    /// delete table, add table, add the prerouting and output chains, add their rules, end.
    const NFT_SETUP_10000: &str = "\
        14000000100001000000000000000000\
        0000000a2c000000000a010001000000\
        000000000100000010000100616d6261\
        737361646f7264000800020000000000\
        24000000020a01000200000000000000\
        0100000010000100616d626173736164\
        6f7264002c000000000a010003000000\
        000000000100000010000100616d6261\
        737361646f7264000800020000000000\
        58000000030a01040400000000000000\
        0100000010000100616d626173736164\
        6f7264000f000300707265726f757469\
        6e670000080007006e61740008000500\
        00000001140004800800010000000000\
        08000200ffffff9c54000000030a0104\
        05000000000000000100000010000100\
        616d6261737361646f7264000b000300\
        6f75747075740000080007006e617400\
        08000500000000011400048008000100\
        0000000308000200ffffff9cd8000000\
        060a010c060000000000000001000000\
        10000100616d6261737361646f726400\
        0f000200707265726f7574696e670000\
        a400048024000180090001006d657461\
        00000000140002800800020000000010\
        08000100000000012c00018008000100\
        636d7000200002800800010000000001\
        08000200000000000c00038005000100\
        060000002c0001800e000100696d6d65\
        64696174650000001800028008000100\
        000000010c0002800600010027100000\
        240001800a0001007265646972000000\
        14000280080001000000000108000300\
        00000002e4010000060a010c07000000\
        000000000100000010000100616d6261\
        737361646f7264000b0002006f757470\
        75740000b40104802400018009000100\
        6d657461000000001400028008000200\
        0000000f08000100000000012c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        0500010002000000340001800c000100\
        7061796c6f6164002400028008000100\
        00000001080002000000000108000300\
        0000001008000400000000042c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        080001007f0000012400018009000100\
        6d657461000000001400028008000200\
        0000001008000100000000012c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        0500010006000000340001800c000100\
        7061796c6f6164002400028008000100\
        00000001080002000000000208000300\
        0000000208000400000000022c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        06000100000100002c0001800e000100\
        696d6d65646961746500000018000280\
        08000100000000010c00028006000100\
        27100000240001800a00010072656469\
        72000000140002800800010000000001\
        08000300000000021400000011000100\
        08000000000000000000000a";

    /// The same plan keeping port 9090 out: `tcp dport != 9090 redirect to :10000`.
    const NFT_SETUP_10000_KEEP_9090: &str = "\
        14000000100001000000000000000000\
        0000000a2c000000000a010001000000\
        000000000100000010000100616d6261\
        737361646f7264000800020000000000\
        24000000020a01000200000000000000\
        0100000010000100616d626173736164\
        6f7264002c000000000a010003000000\
        000000000100000010000100616d6261\
        737361646f7264000800020000000000\
        58000000030a01040400000000000000\
        0100000010000100616d626173736164\
        6f7264000f000300707265726f757469\
        6e670000080007006e61740008000500\
        00000001140004800800010000000000\
        08000200ffffff9c54000000030a0104\
        05000000000000000100000010000100\
        616d6261737361646f7264000b000300\
        6f75747075740000080007006e617400\
        08000500000000011400048008000100\
        0000000308000200ffffff9c38010000\
        060a010c060000000000000001000000\
        10000100616d6261737361646f726400\
        0f000200707265726f7574696e670000\
        0401048024000180090001006d657461\
        00000000140002800800020000000010\
        08000100000000012c00018008000100\
        636d7000200002800800010000000001\
        08000200000000000c00038005000100\
        06000000340001800c0001007061796c\
        6f616400240002800800010000000001\
        08000200000000020800030000000002\
        08000400000000022c00018008000100\
        636d7000200002800800010000000001\
        08000200000000010c00038006000100\
        238200002c0001800e000100696d6d65\
        64696174650000001800028008000100\
        000000010c0002800600010027100000\
        240001800a0001007265646972000000\
        14000280080001000000000108000300\
        00000002e4010000060a010c07000000\
        000000000100000010000100616d6261\
        737361646f7264000b0002006f757470\
        75740000b40104802400018009000100\
        6d657461000000001400028008000200\
        0000000f08000100000000012c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        0500010002000000340001800c000100\
        7061796c6f6164002400028008000100\
        00000001080002000000000108000300\
        0000001008000400000000042c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        080001007f0000012400018009000100\
        6d657461000000001400028008000200\
        0000001008000100000000012c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        0500010006000000340001800c000100\
        7061796c6f6164002400028008000100\
        00000001080002000000000208000300\
        0000000208000400000000022c000180\
        08000100636d70002000028008000100\
        0000000108000200000000000c000380\
        06000100000100002c0001800e000100\
        696d6d65646961746500000018000280\
        08000100000000010c00028006000100\
        27100000240001800a00010072656469\
        72000000140002800800010000000001\
        08000300000000021400000011000100\
        08000000000000000000000a";

    /// What `nft -f` sent for `table inet ambassadord; delete table inet ambassadord`.
    const NFT_REMOVE: &str = "\
        14000000100001000000000000000000\
        0000000a2c000000000a010001000000\
        000000000100000010000100616d6261\
        737361646f7264000800020000000000\
        24000000020a01000200000000000000\
        0100000010000100616d626173736164\
        6f726400140000001100010003000000\
        000000000000000a";

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// nft sends no ACK request; we ask for one on every batch member (not on begin/end)
    /// so each step is confirmed. This applies exactly that difference to nft's bytes.
    fn with_acks(mut bytes: Vec<u8>) -> Vec<u8> {
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().unwrap());
            if kind >> 8 == NFNL_SUBSYS_NFTABLES {
                bytes[at + 6] |= NLM_F_ACK as u8;
            }
            at += (len + 3) & !3;
        }
        bytes
    }

    /// The message bytes equal what nft itself sends for the same plan (plus our ACK
    /// requests), so the kernel reads them as that rule.
    #[test]
    fn setup_batch_matches_nft() {
        let want = with_acks(unhex(NFT_SETUP_10000));
        assert_eq!(want.len(), 1036, "the capture is 1036 bytes");
        let got = setup_batch(PLAN, 0).bytes;
        assert_eq!(hex(&got), hex(&want));
    }

    #[test]
    fn setup_batch_keeping_a_port_matches_nft() {
        let want = with_acks(unhex(NFT_SETUP_10000_KEEP_9090));
        assert_eq!(want.len(), 1132, "the capture is 1132 bytes");
        let plan = Plan {
            keep: Some(9090),
            ..PLAN
        };
        assert_eq!(hex(&setup_batch(plan, 0).bytes), hex(&want));
    }

    const PLAN: Plan = Plan {
        port: 10000,
        keep: None,
    };

    #[test]
    fn remove_batch_matches_nft() {
        let want = with_acks(unhex(NFT_REMOVE));
        assert_eq!(hex(&remove_batch(0).bytes), hex(&want));
    }

    /// The port goes into both immediates in network byte order; nothing else changes.
    #[test]
    fn port_is_big_endian_in_the_immediate() {
        let base = setup_batch(PLAN, 0).bytes;
        let immediate = [0x06, 0x00, 0x01, 0x00, 0x27, 0x10];
        let at: Vec<usize> = (0..base.len() - 6)
            .filter(|&i| base[i..i + 6] == immediate)
            .map(|i| i + 4)
            .collect();
        assert_eq!(at.len(), 2, "one immediate per rule");
        for (port, be) in [
            (80u16, [0x00, 0x50]),
            (15001, [0x3a, 0x99]),
            (65535, [0xff, 0xff]),
        ] {
            let got = setup_batch(Plan { port, keep: None }, 0).bytes;
            assert_eq!(got.len(), base.len());
            let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != base[i]).collect();
            assert!(diff.len() <= 4, "port {port}: {diff:?}");
            for &at in &at {
                assert_eq!(&got[at..at + 2], &be, "port {port}");
            }
        }
    }

    /// Sequence numbers run up from the given start, one per message, and every member
    /// (not begin/end) is expected to be ACKed.
    #[test]
    fn sequence_numbers_and_acks() {
        let b = setup_batch(PLAN, 41);
        let seqs: Vec<u32> = b.steps.iter().map(|s| s.0).collect();
        assert_eq!(seqs, (41..50).collect::<Vec<_>>());
        let acked: Vec<bool> = b.steps.iter().map(|s| s.2).collect();
        assert_eq!(
            acked,
            [false, true, true, true, true, true, true, true, false]
        );
        assert_eq!(b.step(45), Some("create the nat prerouting chain"));
        assert_eq!(b.step(46), Some("create the nat output chain"));
        assert_eq!(b.step(47), Some("add the redirect rule"));
        assert_eq!(b.step(48), Some("add the probe rule"));
    }

    /// NLMSG_ERROR replies decode to the errno (positive) and the sequence they answer;
    /// a truncated reply is an error, not a panic.
    #[test]
    fn replies_decode() {
        let mut data = Vec::new();
        for (seq, code) in [(7u32, 0i32), (8, -1), (9, -95)] {
            data.extend_from_slice(&36u32.to_ne_bytes());
            data.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            data.extend_from_slice(&0u16.to_ne_bytes());
            data.extend_from_slice(&seq.to_ne_bytes());
            data.extend_from_slice(&0u32.to_ne_bytes());
            data.extend_from_slice(&code.to_ne_bytes());
            data.extend_from_slice(&[0; 16]); // the echoed request header
        }
        assert_eq!(
            parse_replies(&data).unwrap(),
            [
                Reply::Ack { seq: 7, errno: 0 },
                Reply::Ack { seq: 8, errno: 1 },
                Reply::Ack { seq: 9, errno: 95 },
            ]
        );
        assert!(parse_replies(&data[..30]).is_err());
        let mut short = data[..20].to_vec();
        short[0..4].copy_from_slice(&18u32.to_ne_bytes());
        assert!(parse_replies(&short[..18]).is_err());
    }

    #[test]
    fn errors_are_one_clear_line() {
        let e = NetfilterError::Permission { op: Op::Setup };
        assert_eq!(
            e.to_string(),
            "setting up the redirect needs CAP_NET_ADMIN (run the container with --privileged or --cap-add NET_ADMIN)"
        );
        let e = NetfilterError::Kernel {
            op: Op::Setup,
            step: "create the nat prerouting chain",
            source: io::Error::from_raw_os_error(EOPNOTSUPP),
        };
        let s = e.to_string();
        assert!(
            s.starts_with(
                "setting up the redirect: the kernel refused to create the nat prerouting chain: "
            ),
            "{s}"
        );
        assert!(s.contains("Linux 5.2"), "{s}");
        assert!(!s.contains('\n'));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
