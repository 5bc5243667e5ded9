# hardneg-server and the hardneg CLI.
#   CPU (default), on debian:bookworm-slim:
#     docker build -t hardneg .
#   CUDA, on NVIDIA's CUDA runtime image (the server built with the `cuda` feature through
#   scripts/build-cuda, kernels for CUDA_COMPUTE_CAP; 90 = H100/H200):
#     docker build --build-arg VARIANT=cuda -t hardneg:cuda .
#     docker run --gpus all -e HARDNEG__ENCODER__DEVICE=cuda:0 ... hardneg:cuda
#   docker run -v hardneg-models:/models -v hardneg-data:/var/lib/hardneg/data -p 50051:50051 hardneg
# The model directory is a volume: fill it with scripts/fetch-models (HARDNEG_MODELS_DIR=/models),
# as deploy/docker-compose.yml does.

ARG VARIANT=cpu
# CUDA release of the CUDA variant's build and runtime images; the driver on the host must
# support it (CUDA 13.0: R580 or newer).
ARG CUDA_VERSION=13.0.1

FROM rust:1.95-bookworm AS build-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The dev profile is the project's one build profile: dependencies and the server are built at
# opt-level 3 (see Cargo.toml).
RUN cargo build --workspace --bins \
 && mkdir /out \
 && strip -o /out/hardneg-server target/debug/hardneg-server \
 && strip -o /out/hardneg target/debug/hardneg

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates curl python3 \
 && rm -rf /var/lib/apt/lists/* \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
# The same script as on a build machine, with the image's toolkit instead of the PyPI one.
RUN HARDNEG_CUDA_HOME=/usr/local/cuda CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} scripts/build-cuda \
 && mkdir /out \
 && strip -o /out/hardneg-server target/cuda/bin/hardneg-server \
 && strip -o /out/hardneg target/cuda/bin/hardneg

# MKL's runtime library, from its wheel on PyPI (scripts/fetch-mkl; about 440 MB): the server
# races it against OpenBLAS at start and keeps the faster (MKL on Intel's processors).
# --build-arg WITH_MKL=0 leaves it out.
FROM python:3.11-slim-bookworm AS mkl
ARG WITH_MKL=1
COPY scripts/fetch-mkl /usr/local/bin/fetch-mkl
RUN mkdir -p /opt/mkl \
 && if [ "$WITH_MKL" = 1 ]; then fetch-mkl /opt/mkl; fi

# OpenBLAS (processor-dispatching build) and MKL: the CPU kernels' matrix products
# (encoder.cpu_kernels), both on the dynamic loader's path.
FROM debian:bookworm-slim AS runtime-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/*
COPY --from=mkl /opt/mkl /usr/local/lib/hardneg-mkl
RUN echo /usr/local/lib/hardneg-mkl > /etc/ld.so.conf.d/hardneg-mkl.conf && ldconfig

# cuBLAS comes with the runtime image, libcuda with the host's driver (NVIDIA Container
# Toolkit); the server opens them when a model is on a CUDA device. OpenBLAS and MKL serve a
# model left on the CPU.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/*
COPY --from=mkl /opt/mkl /usr/local/lib/hardneg-mkl
RUN echo /usr/local/lib/hardneg-mkl > /etc/ld.so.conf.d/hardneg-mkl.conf && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM build-${VARIANT} AS build

FROM runtime-${VARIANT}
RUN useradd --system --uid 10001 --home-dir /var/lib/hardneg hardneg \
 && mkdir -p /var/lib/hardneg/data /models \
 && chown -R hardneg /var/lib/hardneg /models
COPY --from=build /out/hardneg-server /out/hardneg /usr/local/bin/
USER hardneg
ENV HARDNEG__SERVER__LISTEN=0.0.0.0:50051 \
    HARDNEG__SERVER__METRICS_LISTEN=0.0.0.0:9464 \
    HARDNEG__SERVER__DATA_DIR=/var/lib/hardneg/data \
    HARDNEG__ENCODER__MODEL_DIR=/models/all-MiniLM-L6-v2 \
    HARDNEG__ENCODER__MODELS_ROOT=/models \
    HARDNEG_ADDR=http://127.0.0.1:50051
VOLUME ["/var/lib/hardneg/data", "/models"]
EXPOSE 50051 9464
# SIGTERM (docker stop) drains and saves within server.shutdown_timeout_seconds (60 s by
# default): give the container at least that (`docker stop -t 75`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
# The CLI reads HARDNEG_ADDR (and HARDNEG_TOKEN, HARDNEG_TLS_CA): with TLS on, set
# HARDNEG_ADDR=https://localhost:50051 and HARDNEG_TLS_CA to the CA's PEM file.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["hardneg", "health"]
ENTRYPOINT ["hardneg-server"]
