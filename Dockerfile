# hardneg-server and the hardneg CLI on a slim Debian image (CPU).
#   docker build -t hardneg .
#   docker run -v hardneg-models:/models -v hardneg-data:/var/lib/hardneg/data -p 50051:50051 hardneg
# The model directory is a volume: fill it with scripts/fetch-models (HARDNEG_MODELS_DIR=/models),
# as deploy/docker-compose.yml does.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The dev profile is the project's one build profile: dependencies and the server are built at
# opt-level 3 (see Cargo.toml).
RUN cargo build --workspace --bins \
 && strip target/debug/hardneg-server target/debug/hardneg \
 && cp target/debug/hardneg-server target/debug/hardneg /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/hardneg hardneg \
 && mkdir -p /var/lib/hardneg/data /models \
 && chown -R hardneg /var/lib/hardneg /models
COPY --from=build /usr/local/bin/hardneg-server /usr/local/bin/hardneg /usr/local/bin/
USER hardneg
ENV HARDNEG__SERVER__LISTEN=0.0.0.0:50051 \
    HARDNEG__SERVER__METRICS_LISTEN=0.0.0.0:9464 \
    HARDNEG__SERVER__DATA_DIR=/var/lib/hardneg/data \
    HARDNEG__ENCODER__MODEL_DIR=/models/all-MiniLM-L6-v2 \
    HARDNEG__ENCODER__MODELS_ROOT=/models
VOLUME ["/var/lib/hardneg/data", "/models"]
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["hardneg", "--addr", "http://127.0.0.1:50051", "health"]
ENTRYPOINT ["hardneg-server"]
