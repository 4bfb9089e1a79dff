//! `--run-as UID[:GID]`: a process started as root becomes an unprivileged user once
//! what needs root is done: every listener bound (ports below 1024 on a host) and omni
//! mode's redirect installed (CAP_NET_ADMIN). From then on it holds no capability.
//!
//! Omni mode and `docker://` keep reading the Engine API, and may have to reconnect to
//! its socket: the socket's group is kept as a supplementary group when the socket lets
//! its group read and write (Docker's own is `root:docker`, mode 0660). A socket only
//! root may open keeps the process root, with a warning saying why.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{Gid, Uid, geteuid, setgid, setgroups, setuid};

use crate::config::RunAs;

/// What [`run_as`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not started as root: nothing to give up.
    NotRoot,
    /// `--run-as 0`: asked to stay root.
    StayRoot,
    /// Now running as `uid`/`gid`, with `groups` as supplementary groups.
    Switched {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
}

/// Why the process is still root although asked not to be. One line, saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "--run-as {uid}:{gid}: staying root: the Docker socket {socket} (mode {mode:04o}, uid {owner}) is open to root only, and omni mode or docker:// must be able to reopen it; make it group-readable and writable, or set --run-as 0"
    )]
    SocketRootOnly {
        uid: u32,
        gid: u32,
        socket: String,
        mode: u32,
        owner: u32,
    },
    #[error(
        "--run-as {uid}:{gid}: cannot switch ({step}: {source}); running on as root (the container may lack CAP_SETUID/CAP_SETGID)"
    )]
    Switch {
        uid: u32,
        gid: u32,
        step: &'static str,
        source: nix::Error,
    },
}

/// Switches a root process to `ids`, keeping the group of `docker_socket` (the Unix
/// socket omni mode or docker:// reads, if any).
pub fn run_as(ids: RunAs, docker_socket: Option<&Path>) -> Result<Outcome, PrivilegeError> {
    if !geteuid().is_root() {
        return Ok(Outcome::NotRoot);
    }
    if ids.uid == 0 {
        return Ok(Outcome::StayRoot);
    }
    let mut groups = Vec::new();
    // A socket not there (yet) is omni's own error to report; nothing to keep then.
    if let Some(meta) = docker_socket.and_then(|p| std::fs::metadata(p).ok()) {
        match socket_access(meta.mode(), meta.uid(), meta.gid(), ids) {
            Access::AsOwner => {}
            Access::ThroughGroup(gid) => groups.push(gid),
            Access::RootOnly => {
                return Err(PrivilegeError::SocketRootOnly {
                    uid: ids.uid,
                    gid: ids.gid,
                    socket: docker_socket
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    mode: meta.mode() & 0o7777,
                    owner: meta.uid(),
                });
            }
        }
    }
    let fail = |step| {
        move |source| PrivilegeError::Switch {
            uid: ids.uid,
            gid: ids.gid,
            step,
            source,
        }
    };
    // Groups first, then the group, then the user: after setuid nothing else may change.
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&gids).map_err(fail("setgroups"))?;
    setgid(Gid::from_raw(ids.gid)).map_err(fail("setgid"))?;
    setuid(Uid::from_raw(ids.uid)).map_err(fail("setuid"))?;
    Ok(Outcome::Switched {
        uid: ids.uid,
        gid: ids.gid,
        groups,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Access {
    AsOwner,
    ThroughGroup(u32),
    RootOnly,
}

/// How `ids` can still open a socket with `mode`, owned by `owner`:`group`.
fn socket_access(mode: u32, owner: u32, group: u32, ids: RunAs) -> Access {
    const RW_OWNER: u32 = 0o600;
    const RW_GROUP: u32 = 0o060;
    const RW_OTHER: u32 = 0o006;
    if owner == ids.uid && mode & RW_OWNER == RW_OWNER || mode & RW_OTHER == RW_OTHER {
        Access::AsOwner
    } else if mode & RW_GROUP == RW_GROUP {
        Access::ThroughGroup(group)
    } else {
        Access::RootOnly
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOBODY: RunAs = RunAs {
        uid: 65534,
        gid: 65534,
    };

    #[test]
    fn the_docker_sockets_group_is_kept_when_it_grants_access() {
        // Docker's own: root:docker 0660.
        assert_eq!(
            socket_access(0o140660, 0, 999, NOBODY),
            Access::ThroughGroup(999)
        );
        assert_eq!(socket_access(0o140600, 0, 0, NOBODY), Access::RootOnly);
        assert_eq!(socket_access(0o140640, 0, 999, NOBODY), Access::RootOnly);
        assert_eq!(socket_access(0o140666, 0, 0, NOBODY), Access::AsOwner);
        assert_eq!(socket_access(0o140600, 65534, 0, NOBODY), Access::AsOwner);
    }

    #[test]
    fn errors_are_one_line_saying_what_to_do() {
        let e = PrivilegeError::SocketRootOnly {
            uid: 65534,
            gid: 65534,
            socket: "/var/run/docker.sock".into(),
            mode: 0o600,
            owner: 0,
        };
        let s = e.to_string();
        assert!(s.contains("mode 0600"), "{s}");
        assert!(s.contains("--run-as 0"), "{s}");
        assert!(!s.contains('\n'));
    }
}
