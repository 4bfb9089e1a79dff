//! The integration tests: one binary, black-box, against the real `ambassadord` binary
//! and real servers (dnsmasq, etcd, a Docker engine, backends on loopback; the
//! Consul HTTP API is the one emulation). One module per area; `support` holds the
//! harness they share. Servers that can be shared (the Docker engine, an etcd) start once
//! per run, on first use, and end with the test process however it ends.

mod support;

mod bad_input;
mod copy_modes;
mod discovery_consul;
mod discovery_etcd;
mod discovery_srv;
mod docker_backends;
mod docker_compose;
mod docker_links;
mod docker_omni;
mod docker_redirect;
mod faults;
mod health_checks;
mod logging;
mod netfilter;
mod operations;
mod route_options;
mod shutdown;
mod standard_static;
mod threads;
mod tls;
mod tls_hosts;
