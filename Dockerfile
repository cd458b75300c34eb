# rlsys image. Default: CUDA (vLLM + DeepSpeed on GPU). CPU variant:
#   docker build --build-arg BASE=python:3.11-slim-bookworm --build-arg RLSYS_EXTRA=cpu -t rlsys:cpu .
# Layers, slowest-changing first: system packages; Python dependencies, installed by
# scripts/setup.sh (the same install the tests exercise) from pyproject.toml alone; then the
# source. A code or config change rebuilds only the last COPY layers.
# Lint: hadolint Dockerfile (tests/unit/test_deploy.py runs it when hadolint is installed).
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG RLSYS_EXTRA=gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 RLSYS_EXTRA=${RLSYS_EXTRA}
# Unpinned on purpose: the same line serves Ubuntu (CUDA) and Debian (CPU) bases, whose
# package versions differ; the base image tag pins the distribution release.
# wget: KubeRay's liveness/readiness probes call it.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git redis-server ca-certificates wget \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rlsys
COPY pyproject.toml ./
COPY scripts/setup.sh scripts/setup.sh
# Stub package and README (pyproject's readme): a docs edit must not rebuild this layer.
RUN mkdir -p rlsys && touch rlsys/__init__.py README.md && PYTHON=python3 RLSYS_TEST_TOOLS=0 bash scripts/setup.sh
ENV PATH=/opt/rlsys/.venv/bin:$PATH RLSYS_CONF_DIR=/opt/rlsys/conf
# Login shells (KubeRay starts Ray with bash -l) reset PATH from /etc/profile on Debian bases.
# hadolint ignore=SC2016
RUN echo 'export PATH=/opt/rlsys/.venv/bin:$PATH' > /etc/profile.d/rlsys.sh
COPY rlsys rlsys
COPY conf conf
COPY scripts scripts
ENTRYPOINT ["rlsys"]
CMD ["train", "--help"]
