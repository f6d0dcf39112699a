# Both Hooklog binaries in one slim image. Build: docker build -t hooklog .
FROM rust:1-bookworm AS build
# The Kafka client's TLS links OpenSSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && install -D -m 0755 target/release/hooklog-ingest /out/hooklog-ingest \
 && install -D -m 0755 target/release/hooklog-processor /out/hooklog-processor

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home hooklog
COPY --from=build /out/ /usr/local/bin/
USER 10001
ENV HOOKLOG_CONFIG=/etc/hooklog/hooklog.toml
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/hooklog-ingest"]
