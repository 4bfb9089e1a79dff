# ambassadord as a FROM-scratch image: one fully static binary and nothing else.
#
#   docker build -t ambassadord:latest .
#   docker run -d --expose 6379 ambassadord:latest 10.0.0.5:6379
#
# This needs a registry for the rust builder image. scripts/build-image makes the same
# image with no registry: it runs the builder stage's cargo command on the host and then
# builds the final stage below, taken from this file, so the two stay in step.
# The binary is static glibc: it never calls getaddrinfo (names go through its own DNS
# resolver, hickory), so it needs no libc, NSS or resolver files in the image; Docker
# bind-mounts /etc/resolv.conf and /etc/hosts into every container.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-gnu" \
 && RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --locked --release --target "$target" \
 && cp "target/$target/release/ambassadord" /ambassadord

# --- final stage (scripts/build-image builds from here on, with the binary it built) ---
FROM scratch
COPY --from=builder /ambassadord /ambassadord
# scripts/build-image passes the crate's version (and labels the git revision and, where
# the checkout has one, its origin); with docker build, pass --build-arg VERSION=...
ARG VERSION=unknown
LABEL org.opencontainers.image.title="ambassadord" \
      org.opencontainers.image.description="A Docker ambassador: a small, fast TCP forwarder to discovered backends" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="BSD-3-Clause"
# Standard mode's port for discovered backends and omni mode's port; --links and static
# backends listen on their own ports (docker run --expose them).
EXPOSE 10000
# Once every listener is bound (and omni's redirect installed), the process switches to
# nobody, keeping the Docker socket's group where it reads one; AMBASSADORD_RUN_AS=0
# keeps it root.
ENV AMBASSADORD_RUN_AS=65534:65534
# Healthy once every route's discovery has its first result (the admin endpoint's
# /readyz; it must be on, and AMBASSADORD_ADMIN must name it if it is not the default).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/ambassadord", "healthcheck"]
ENTRYPOINT ["/ambassadord"]
