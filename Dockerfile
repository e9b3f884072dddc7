# syntax=docker/dockerfile:1.7
#
# The VTD training service image: Ray 2.60 + the locked environment (uv.lock) + this project, on
# NVIDIA's CUDA runtime. One image for every Ray node (head and GPU workers), for the RayJob
# submitter and for `vtd` commands (see README "Deployment", k8s/, cluster/).
#
#   docker build -t vtd-train:0.1.0 .                          # default: no apex
#   docker build -t vtd-train:0.1.0-apex --build-arg WITH_APEX=1 .
#
# CUDA: torch 2.13.0 in uv.lock is the cu130 build (CUDA 13.0, its CUDA libraries come as
# locked nvidia-* wheels), so the base is NVIDIA's CUDA 13.0 runtime image, by exact tag; the
# node's driver must support CUDA 13.0. Everything Python comes from uv.lock with `--frozen`
# (nothing is resolved at build time); the project itself is not built into a wheel: its source
# sits in /app on PYTHONPATH (so `vtd jobs run jobs/cpf.yaml` finds the pipeline file) and
# /usr/local/bin/vtd runs `python -m vtd_train.cli`, as the pipeline's stage jobs do.
#
# WITH_APEX=1 compiles NVIDIA apex from source (its fused optimizers, `optimizer.implementation:
# auto|apex_adam|apex_lamb`) in the CUDA *devel* image against the locked torch. The PyPI
# package named `apex` is an unrelated project and is never installed.
#
# No secrets in any layer: storage credentials and the Ray auth token reach the containers at run
# time (Kubernetes Secrets: k8s/; environment variables elsewhere), never as build arguments.

ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
ARG WITH_APEX=0

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
# base: Ubuntu's Python 3.12 on the CUDA runtime, the unprivileged user Ray runs as.
FROM ${CUDA_RUNTIME_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# bash: KubeRay runs `ray start` through it; wget: KubeRay's default health probes on the Ray
# containers; tini: PID 1 that reaps Ray's many child processes; rsync and openssh-client: the
# Ray cluster launcher (cluster/aws-gpu.yaml) copies its bootstrap files into the head's
# container with rsync, and the autoscaler there reaches new nodes over SSH. Versions float with
# the pinned base image's Ubuntu release (hadolint DL3008 is ignored for this reason: apt versions
# of a point release disappear from the archive, which would break rebuilds of the same tag).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv bash wget tini ca-certificates \
      rsync openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid 1000 --gid 100 --shell /bin/bash ray

# ---------------------------------------------------------------------------------------------
# deps: the locked third-party environment in /app/.venv (the project itself is not installed);
# extras: s3 (s3fs: shards and runs on S3), aws (boto3: the cluster launcher's AWS autoscaler).
FROM base AS deps
WORKDIR /app
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    uv sync --frozen --no-dev --no-install-project --extra s3 --extra aws --python /usr/bin/python3.12

# ---------------------------------------------------------------------------------------------
# apex (only with WITH_APEX=1): compiled with nvcc against the locked torch, into the same venv.
FROM ${CUDA_DEVEL_IMAGE} AS apex-build
ENV DEBIAN_FRONTEND=noninteractive
# Build tools only (this stage is not shipped); apt versions float with the pinned base (DL3008, as above).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-dev git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=deps /app/.venv /app/.venv
# A commit of github.com/NVIDIA/apex (apex has no releases on PyPI); bump it deliberately.
ARG APEX_REF=10417aceddd7d5d05d7cbf7b0fc2daad1105f8b4
# Hopper and Ampere (plus Blackwell) GPUs; CUDA 13 no longer builds for pre-Turing ones.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0;10.0"
ARG APEX_PARALLEL_BUILD=8
WORKDIR /src
RUN git clone --filter=blob:none https://github.com/NVIDIA/apex.git apex \
 && git -C apex checkout --quiet "${APEX_REF}"
WORKDIR /src/apex
# --no-build-isolation: apex's setup.py imports the locked torch; --no-deps: nothing unlocked.
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" APEX_CPP_EXT=1 APEX_CUDA_EXT=1 \
    APEX_PARALLEL_BUILD="${APEX_PARALLEL_BUILD}" \
    uv pip install --python /app/.venv/bin/python --no-build-isolation --no-deps --no-cache . \
 && /app/.venv/bin/python -c "import apex.optimizers; print('apex', apex.optimizers.FusedAdam)"

# The venv to ship: picked by WITH_APEX (BuildKit builds only the stages the target needs).
FROM deps AS venv-apex-0
FROM apex-build AS venv-apex-1
# DL3006 (untagged image) misreads this: venv-apex-N is one of the two stages above, not an image.
# hadolint ignore=DL3006
FROM venv-apex-${WITH_APEX} AS venv

# ---------------------------------------------------------------------------------------------
# runtime: the venv, the project's source, a non-root user; nothing else.
FROM base AS runtime
ARG WITH_APEX=0
LABEL org.opencontainers.image.title="vtd-train" \
      org.opencontainers.image.description="VTDNet training service on Ray (BDD100K, CPF pipeline)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.vtd.apex="${WITH_APEX}"
WORKDIR /app
COPY --from=venv --chown=root:root /app/.venv /app/.venv
# Only what runs: the packages, the pipeline and the training configs (.dockerignore keeps
# runs/, data, .venv, tests and benchmarks out of the build context).
COPY --chown=root:root pyproject.toml uv.lock ./
COPY --chown=root:root vtd_train ./vtd_train
COPY --chown=root:root data_pipeline ./data_pipeline
COPY --chown=root:root orchestrator ./orchestrator
COPY --chown=root:root cluster ./cluster
COPY --chown=root:root jobs ./jobs
COPY --chown=root:root configs ./configs
# vtd, ray and python also in /usr/local/bin: KubeRay starts Ray through `bash -l`, and a login
# shell may reset PATH to the system's.
RUN printf '#!/bin/sh\nexec /app/.venv/bin/python -m vtd_train.cli "$@"\n' > /usr/local/bin/vtd \
 && chmod 0755 /usr/local/bin/vtd \
 && ln -s /app/.venv/bin/ray /usr/local/bin/ray \
 && ln -s /app/.venv/bin/python /usr/local/bin/python \
 && python3.12 -m compileall -q /app/vtd_train /app/data_pipeline /app/orchestrator /app/cluster
ENV VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=/app \
    HOME=/home/ray \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
# The code is root-owned and read-only to the user; Ray writes to /tmp/ray and $HOME (mount
# writable volumes there under a read-only root filesystem, as k8s/ does).
USER 1000:100
# Ray's ports (KubeRay and the cluster launcher set them on `ray start`):
#   6379  GCS (head)            8265  dashboard + Jobs API (head; token-authenticated)
#   10001 Ray Client (head)     8080  metrics agent, Prometheus /metrics (every node)
#   9091  the CPF orchestrator's own metrics (`vtd jobs run --metrics-port 9091`, head)
EXPOSE 6379 8265 10001 8080 9091
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["vtd", "--help"]
