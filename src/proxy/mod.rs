//! The data path and the server around it.
//!
//! - [`server`]: bind every listener, run the accept loops on the data threads, reload,
//!   shut down with a grace period.
//! - [`route`]: a route, the target a reload can swap, and its read-only view.
//! - [`forward`]: the forwarder itself: accept, pick a backend, connect with failover,
//!   copy, log once.
//! - [`balance`] (the order a connection tries backends in), [`copy`] (moving bytes),
//!   [`omni`] (routing by the connecting container), [`listen`] (sockets) and
//!   [`workers`] (the data threads), [`header`] (the PROXY protocol on the sockets) and
//!   [`limit`] (connection limits), [`tls`] (TLS on either side of a connection).

pub mod balance;
pub mod check;
pub mod copy;
pub mod forward;
pub mod header;
pub mod limit;
pub mod listen;
pub mod omni;
pub mod route;
pub mod server;
pub mod tls;
pub mod workers;

pub use server::{Server, StartError};
