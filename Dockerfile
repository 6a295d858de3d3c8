# syntax=docker/dockerfile:1
#
# The Switchboard gateway image.
#
#   docker build -t switchboard --build-arg SWITCHBOARD_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker run --rm -p 8080:8080 switchboard          # a dev-mode node on ws://127.0.0.1:8080
#
# Two stages: `builder` compiles the release binary (stripped, see
# [profile.release] in Cargo.toml); `runtime` is distroless "cc" (glibc,
# libgcc, CA certificates, no shell, no package manager) running as the
# unprivileged user 65532. Options are SWITCHBOARD_* environment variables
# (docs/configuration.md). deploy/image/build-local.sh builds the same
# runtime stage from a binary built on the host, without any registry.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot
# The stage or image holding the binary at /out/switchboard: `builder`, or
# an image made by deploy/image/build-local.sh.
ARG BINARY_SOURCE=builder

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# The build context has no .git (see .dockerignore): pass the commit in.
ARG SWITCHBOARD_GIT_COMMIT=unknown
ARG SOURCE_DATE_EPOCH=
ENV SWITCHBOARD_GIT_COMMIT=${SWITCHBOARD_GIT_COMMIT} \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH} \
    CARGO_TARGET_DIR=/src/target
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p switchboard \
 && mkdir -p /out \
 && cp target/release/switchboard /out/switchboard

# The example origin (examples/src/bin/echo-origin.rs), for
# deploy/compose: `docker build --target echo-origin -t switchboard-echo-origin .`
FROM ${RUST_IMAGE} AS examples-builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p switchboard-examples --bin echo-origin \
 && mkdir -p /out \
 && cp target/release/echo-origin /out/echo-origin

FROM ${RUNTIME_BASE} AS echo-origin
COPY --from=examples-builder /out/echo-origin /usr/local/bin/echo-origin
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/echo-origin"]
CMD ["--listen", "0.0.0.0:3000", "--greet"]

FROM ${BINARY_SOURCE} AS binary

FROM ${RUNTIME_BASE} AS runtime
COPY --from=binary /out/switchboard /usr/local/bin/switchboard
# Clients on 8080. The control listener (control API, /healthz, /readyz,
# /metrics) stays on loopback unless configured otherwise: to expose it set
# SWITCHBOARD_CONTROL_LISTEN=0.0.0.0:8081 with SWITCHBOARD_API_KEY, and TLS or
# SWITCHBOARD_CONTROL_ALLOW_PLAINTEXT=true on a private network.
ENV SWITCHBOARD_LISTEN=0.0.0.0:8080 \
    SWITCHBOARD_CONTROL_LISTEN=127.0.0.1:8081 \
    SWITCHBOARD_LOG_FORMAT=json \
    SWITCHBOARD_DRAIN_SPREAD=5s \
    SWITCHBOARD_DRAIN_TIMEOUT=20s
# A drain (SIGTERM) ends within SWITCHBOARD_DRAIN_TIMEOUT, 20 s, under the 30 s
# Kubernetes gives by default; with plain Docker stop with `-t 30` (Docker's
# default is 10 s), in compose `stop_grace_period: 30s`.
STOPSIGNAL SIGTERM
USER 65532:65532
EXPOSE 8080 8081
# The binary asks its own control listener; no shell or curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/switchboard", "healthcheck", "--url", "http://127.0.0.1:8081/healthz"]
ENTRYPOINT ["/usr/local/bin/switchboard"]
CMD ["serve"]
