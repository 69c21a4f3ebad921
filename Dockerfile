# alexnet-serve: the REST service (ONNX Runtime, CUDA provider with CPU fallback) and the export /
# training stage (alexnet-export, alexnet-train) in one image.
#
#   docker build -t alexnet-serve .
#   docker build -t alexnet-serve:cuda-torch --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#
# Offline and behind proxies (no `# syntax=` line on purpose: it makes BuildKit fetch its frontend
# from Docker Hub; without it BuildKit and the legacy builder both use their built-in parser):
#   --build-arg CUDA_IMAGE=...        any base with apt and python3 >= 3.11 (e.g. one made with
#                                     debootstrap + docker import; deploy/ci.sh shows how)
#   --build-arg TORCH_INDEX_URL=...   a PEP 503 index holding the torch wheel (a local one works)
#   --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.pem)"   PEM certificates to trust (a TLS-intercepting
#                                     proxy's CA): they go to /usr/local/share/ca-certificates/,
#                                     so every update-ca-certificates run keeps them. CA
#                                     certificates are public; a build argument is recorded in the
#                                     image history, so never pass a private key this way.
#
# Base: NVIDIA's CUDA 13 + cuDNN 9 *runtime* image. onnxruntime-gpu 1.31 links against CUDA 13 and
# cuDNN 9 system libraries; this image has exactly those on the loader path, with no compilers.
# (The alternative, python-slim plus the nvidia-*-cu13 pip wheels, needs LD_LIBRARY_PATH or
# onnxruntime.preload_dlls() wiring and is no smaller once cuDNN is in.) Ubuntu 24.04's python3 is
# 3.12, within the project's requires-python.
#
# torch: by default the CPU build from PyTorch's CPU index (about 200 MB instead of several GB of
# CUDA wheels that would duplicate the base image's libraries). torch only runs the one-shot export
# (seconds on a CPU) and CPU training; serving never imports it. For GPU training build with
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 (a CUDA 13 build of the same version).
ARG CUDA_IMAGE=nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04
ARG EXTRA_CA_CERTS=""

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder
ARG EXTRA_CA_CERTS
# PIP_CERT: pip would otherwise trust only its own bundled CA list, never the extra certificates.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/venv/bin:$PATH

# Unpinned apt packages (DL3008): the base image tag fixes the Ubuntu release, and the archive
# drops old patch versions, so exact pins would only break later rebuilds.
# The extra CA certificates first, one file each: the bundle is rebuilt from
# /usr/share/ca-certificates and /usr/local/share/ca-certificates only (update-ca-certificates is
# run explicitly: where the base image already has ca-certificates, installing it does nothing). The folder is made
# even when there are none: the runtime stage copies it from here.
# hadolint ignore=DL3008
RUN mkdir -p /usr/local/share/ca-certificates \
    && if [ -n "$EXTRA_CA_CERTS" ]; then \
        echo "$EXTRA_CA_CERTS" > /tmp/extra-ca.pem \
        && awk '/BEGIN CERTIFICATE/ { n++ } n { print > ("/usr/local/share/ca-certificates/extra-" n ".crt") }' /tmp/extra-ca.pem \
        && rm /tmp/extra-ca.pem; \
    fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
# torch first, in its own layer: the largest download, and it changes only with constraints.txt.
COPY constraints.txt ./
# constraints.txt pins the version (torch==2.13.0 also matches the index's 2.13.0+cpu build).
# --no-deps: the index needs to hold torch only (a local one made from a single wheel works); its
# dependencies come from PyPI with the project's in the next step.
# The argument declared here, not at the top: a build argument is part of the cache key of every
# RUN after it, so another index URL (a local index on a new port) rebuilds only from this step.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-deps --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch

COPY pyproject.toml README.md ./
COPY alexnet_core ./alexnet_core
COPY model_export ./model_export
COPY service ./service
# A regular (non-editable) install: the final stage gets /opt/venv only, not the sources.
# The postgres extra (psycopg, for ALEXNET_DATABASE_URL) and the gpu extra (nvImageCodec for
# ALEXNET_DECODE_DEVICE, docs/gpu.md): pure manylinux wheels that
# install without a GPU and are imported only when the GPU decode path starts, so the image stays
# one for GPU and CPU hosts. --build-arg SERVE_EXTRAS=export leaves it out (a platform without
# its wheels).
ARG SERVE_EXTRAS=export,gpu,postgres
RUN pip install -c constraints.txt ".[${SERVE_EXTRAS}]" \
    && python -c "import onnxruntime, service.main, model_export.cli"
# EXTRAS=cluster: an image for the nodes of a Ray cluster (docker-compose.cluster.yml).
ARG EXTRAS=""
RUN if [ -n "${EXTRAS}" ]; then pip install -c constraints.txt ".[${EXTRAS}]"; fi

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="alexnet-serve" \
      org.opencontainers.image.description="AlexNet REST inference service (FastAPI + ONNX Runtime)" \
      org.opencontainers.image.licenses="MIT"

# Only the interpreter: no pip, venv module or compilers in the final image. A fixed UID/GID so
# that bind-mounted weights/data directories can be chowned to it on the host (chown 10001).
# ca-certificates (with the builder's extra CA certificates, copied in before the bundle is
# rebuilt from them): the export job downloads the pretrained weights over HTTPS.
COPY --from=builder /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /weights /data \
    && chown app:app /weights /data

COPY --from=builder /opt/venv /opt/venv

# /weights and /data are owned by app before VOLUME: a new named volume is initialised from them,
# so the unprivileged server can write models and downloads into it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ALEXNET_HOST=0.0.0.0 \
    ALEXNET_PORT=8000 \
    ALEXNET_WEIGHTS_DIR=/weights \
    ALEXNET_DATA_ROOT=/data

WORKDIR /home/app
# Numeric, so that runtimes (Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
VOLUME ["/weights", "/data"]
EXPOSE 8000

# /ready answers 503 until a model is loaded and warmed up; urlopen raises on it, so the container
# turns healthy only when it can serve. The start period covers CUDA initialisation and warm-up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('ALEXNET_PORT', '8000'), timeout=4)"]

CMD ["alexnet-serve"]
