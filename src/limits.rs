//! Process limits set at start: the soft descriptor limit raised to the hard one, as
//! nginx (`worker_rlimit_nofile`) and Go's runtime do, so a proxy started with a
//! distribution's default soft limit (often 1,024) is not out of descriptors at a
//! thousand connections when the system allows far more.

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tracing::{info, warn};

/// What raising the limit did, to be logged once the server has started (a start that
/// fails should say only why).
#[derive(Debug)]
pub enum DescriptorLimit {
    /// The soft limit already was the hard limit.
    Kept(u64),
    Raised {
        from: u64,
        to: u64,
    },
    Failed(String),
}

/// Raises the soft RLIMIT_NOFILE to the hard limit.
pub fn raise_descriptor_limit() -> DescriptorLimit {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return DescriptorLimit::Failed(format!("cannot read it: {e}")),
    };
    if soft >= hard {
        return DescriptorLimit::Kept(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => DescriptorLimit::Raised {
            from: soft,
            to: hard,
        },
        Err(e) => DescriptorLimit::Failed(format!(
            "cannot raise it from {soft} to {hard}: {e}; keeping {soft}"
        )),
    }
}

impl DescriptorLimit {
    pub fn log(&self) {
        match self {
            DescriptorLimit::Kept(limit) => info!(limit, "descriptor limit"),
            DescriptorLimit::Raised { from, to } => {
                info!(
                    limit = to,
                    raised_from = from,
                    "descriptor limit raised to the hard limit"
                )
            }
            DescriptorLimit::Failed(why) => warn!("descriptor limit: {why}"),
        }
    }
}
