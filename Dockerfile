# syntax=docker/dockerfile:1
# simserve images. Targets:
#   serve (default): ONNX Runtime serving, no torch (~small)
#   train: serve + torch CPU wheels + training code, for `simserve train`
# Build here without a Docker engine: scripts/build-image.sh (debootstrap + buildah).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Extras to install beside the serving core (OpenCV for verification is part of the core now).
ARG EXTRAS=verify
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY simserve ./simserve
COPY training ./training
RUN python3 -m venv /opt/simserve \
 && /opt/simserve/bin/pip install --no-compile ".[${EXTRAS}]" \
 && find /opt/simserve -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS serve
LABEL org.opencontainers.image.title="simserve" \
      org.opencontainers.image.description="Siamese image-similarity gRPC service"
RUN groupadd --system --gid 10001 simserve \
 && useradd --system --uid 10001 --gid simserve --home-dir /data --shell /usr/sbin/nologin simserve \
 && mkdir -p /data && chown simserve:simserve /data
COPY --from=build /opt/simserve /opt/simserve
ENV PATH=/opt/simserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp \
    SIMSERVE_HOST=0.0.0.0 \
    SIMSERVE_PORT=50051 \
    SIMSERVE_METRICS_PORT=9090 \
    SIMSERVE_DATA_DIR=/data
# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["simserve", "client", "--timeout", "4", "health"]
# Exec form: simserve is PID 1 and gets SIGTERM itself (graceful drain).
ENTRYPOINT ["simserve", "serve"]

FROM serve AS train
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
USER 0:0
RUN /opt/simserve/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
      torch==2.13.0 torchvision==0.28.0 \
 && /opt/simserve/bin/pip install --no-cache-dir "onnx>=1.16" "scikit-image>=0.22"
USER 10001:10001
ENTRYPOINT ["simserve"]
CMD ["train", "--help"]
