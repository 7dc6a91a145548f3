# syntax=docker/dockerfile:1
#
# The mcpq image: one `mcpq serve` replica per container.
#   docker build -t mcpq .
#   docker run -v "$PWD/my.toml:/etc/mcpq/mcpq.toml:ro" -p 127.0.0.1:7600:7600 \
#     -e MCPQ_API__LISTEN=0.0.0.0:7600 -e MCPQ_API__TOKENS="$TOKEN" mcpq
# The configuration is not baked in: mount it at /etc/mcpq/mcpq.toml (docker-compose.yml does).
# The API listens on loopback by default, which a published port cannot reach; listening on all
# interfaces requires bearer tokens (api.listen, api.tokens, or the variables above).

# ---------------------------------------------------------------------------- build
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# The whole workspace: `tests` is a workspace member, so cargo cannot resolve the workspace
# (and --locked cannot check Cargo.lock) without it, even though mcpq does not depend on it.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY tests ./tests
# The registry and the target directory live in cache mounts, so a rebuild after a source change
# downloads nothing and recompiles only the workspace crates. A cache mount is not part of the
# image, hence the copy of the binary out of it.
RUN --mount=type=cache,id=mcpq-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=mcpq-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=mcpq-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p mcpq \
 && install -D -m 0755 target/release/mcpq /out/mcpq

# ---------------------------------------------------------------------------- runtime
FROM debian:bookworm-slim
# ca-certificates: https:// MCP servers, OAuth token endpoints and rediss:// verify against them.
# Not pinned to a version (DL3008): the bookworm archive keeps only its latest build, so a pin
# would break the build on the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 mcpq \
 && useradd --system --uid 10001 --gid mcpq --home-dir /var/lib/mcpq --no-create-home \
      --shell /usr/sbin/nologin mcpq \
 && install -d -o mcpq -g mcpq -m 0750 /var/lib/mcpq \
 && install -d -m 0755 /etc/mcpq
COPY --from=builder /out/mcpq /usr/local/bin/mcpq

# The embedded store's default path, ./mcpq-data, is relative to the working directory, so it
# lands in this volume (/var/lib/mcpq/mcpq-data). With store.redis_url set it stays empty.
WORKDIR /var/lib/mcpq
VOLUME ["/var/lib/mcpq"]
USER 10001:10001
EXPOSE 7600
# mcpq drains on SIGTERM: it stops claiming, lets running calls finish within
# dispatch.drain_timeout_ms (10 s by default) and hands the rest back. Give `docker stop` a
# longer timeout than that (docker-compose.yml sets stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mcpq"]
CMD ["serve", "--config", "/etc/mcpq/mcpq.toml"]
