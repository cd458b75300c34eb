# rlsys image. Default: CUDA (vLLM + DeepSpeed on GPU). CPU variant:
#   docker build --build-arg BASE=python:3.11-slim-bookworm --build-arg RLSYS_EXTRA=cpu -t rlsys:cpu .
# Dependencies are installed from pyproject.toml before the source is copied, so code
# changes rebuild only the last layers. The install step is scripts/setup.sh, the same one
# the tests use. (Issue 7 extends and lints this image.)
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG RLSYS_EXTRA=gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 RLSYS_EXTRA=${RLSYS_EXTRA}
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git redis-server ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rlsys
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/setup.sh
RUN mkdir -p rlsys && touch rlsys/__init__.py && PYTHON=python3 bash scripts/setup.sh
COPY rlsys rlsys
COPY conf conf
COPY scripts scripts
ENV PATH=/opt/rlsys/.venv/bin:$PATH RLSYS_CONF_DIR=/opt/rlsys/conf
ENTRYPOINT ["rlsys"]
CMD ["train", "--help"]
