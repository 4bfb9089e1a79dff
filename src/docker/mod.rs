//! Docker: what omni mode learns from the Engine API (read-only), and what containers
//! declare.

pub mod declare;
pub mod index;
