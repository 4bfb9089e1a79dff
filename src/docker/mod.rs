//! Docker integration: what Docker tells a container about its surroundings.
//!
//! [`index`] follows the Engine API (read-only) for omni mode, and [`declare`] reads
//! what each container declares for its outgoing ports. (`docker run --link`'s
//! environment variables are configuration: `config::links` reads them.)

pub mod declare;
pub mod index;
