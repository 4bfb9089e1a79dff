//! Process limits set at start: the soft descriptor limit raised to the hard one, as
//! nginx (`worker_rlimit_nofile`) and Go's runtime do, so a proxy started with a
//! distribution's default soft limit (often 1,024) is not out of descriptors at a
//! thousand connections when the system allows far more.

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tracing::{info, warn};

/// Raises the soft RLIMIT_NOFILE to the hard limit and logs the limit in force.
pub fn raise_descriptor_limit() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the descriptor limit");
            return;
        }
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            warn!(soft, hard, error = %e, "cannot raise the descriptor limit; keeping the soft limit");
            return;
        }
        info!(
            limit = hard,
            raised_from = soft,
            "descriptor limit raised to the hard limit"
        );
    } else {
        info!(limit = soft, "descriptor limit");
    }
}
