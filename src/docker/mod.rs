//! Docker integration: what Docker tells a container about its surroundings.
//!
//! [`links`] turns the environment variables of `docker run --link` into routes for
//! `--links`; [`index`] follows the Engine API (read-only) for omni mode, and [`declare`]
//! reads what each container declares for its outgoing ports.

pub mod declare;
pub mod index;
pub mod links;
