//! Docker integration: reading what Docker tells a container about its surroundings.
//!
//! [`links`] turns the environment variables of `docker run --link` into routes for
//! `--links`. (Omni mode's Engine API client and container index live here as well.)

pub mod links;
