# Prefect worker image for roadshift (process work pool in docker-compose.yml; also the job image
# of the Kubernetes pools in k8s/). Build context: the repository root.
#
#   docker build -f infra/worker.Dockerfile -t roadshift-worker .                      # CPU torch
#   docker build -f infra/worker.Dockerfile --build-arg TORCH_VARIANT=cuda -t roadshift-worker:cuda .
#
# TORCH_VARIANT=cpu: torch/torchvision from PyTorch's CPU index (no CUDA libraries, ~1 GB smaller);
#   the lock's torch, torchvision, triton and nvidia-* lines are left out, the rest installs as pinned.
# TORCH_VARIANT=cuda: the whole lock as pinned from PyPI (its torch is the CUDA build, with the
#   nvidia-* wheels the lock lists).
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    GX_ANALYTICS_ENABLED=false

# git: the deployment's git_clone pull step and DVC; procps: `ps` for debugging runs
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/roadshift
COPY requirements.lock ./
RUN set -eux; \
    case "$TORCH_VARIANT" in \
      cpu) \
        pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1; \
        grep -vE '^(torch|torchvision|triton|nvidia-[A-Za-z0-9_.-]+)==' requirements.lock > /tmp/requirements.rest ;; \
      cuda) cp requirements.lock /tmp/requirements.rest ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda" >&2; exit 1 ;; \
    esac; \
    pip install -r /tmp/requirements.rest; \
    rm /tmp/requirements.rest

# The project itself (the `roadshift` command DVC's stages run). A flow run works in its own git
# clone, and PYTHONPATH=. (set by docker-compose.yml) makes the clone's code win over this copy.
COPY pyproject.toml README.md ./
COPY roadshift ./roadshift
COPY flows ./flows
COPY tasks ./tasks
RUN pip install --no-deps . && rm -rf build

COPY infra/worker-start.sh /usr/local/bin/roadshift-worker-start
RUN useradd --create-home --uid 1001 roadshift \
 && mkdir -p /home/roadshift/.cache \
 && chown roadshift:roadshift /home/roadshift/.cache
USER roadshift
WORKDIR /home/roadshift
CMD ["/usr/local/bin/roadshift-worker-start"]
