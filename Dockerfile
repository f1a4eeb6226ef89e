# syntax=docker/dockerfile:1
# The streamtrainer image: the worker and the producer (`docker run IMAGE worker ...`).
# CPU-only PyTorch, a non-root user, checkpoints under /var/lib/streamtrainer (mount a volume there).

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU build first: the default wheel brings gigabytes of CUDA libraries the worker never uses.
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamtrainer ./streamtrainer
# `torch>=2.2` is already satisfied by the CPU build, so this does not pull another one.
RUN pip install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/streamtrainer streamtrainer \
    && mkdir -p /var/lib/streamtrainer/checkpoints \
    && chown -R streamtrainer:streamtrainer /var/lib/streamtrainer
COPY --from=build /opt/venv /opt/venv
# In a container the metrics endpoint must listen beyond loopback for Prometheus to reach it. It
# serves only reads (/metrics, /healthz, /ready): the worker's admin endpoint (POST /compact) is off
# unless --admin-endpoints (STREAMTRAINER_ADMIN_ENDPOINTS=true).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STREAMTRAINER_METRICS_HOST=0.0.0.0
USER streamtrainer
# The worker's default --checkpoint-dir (checkpoints, relative) is /var/lib/streamtrainer/checkpoints.
WORKDIR /var/lib/streamtrainer
# 9464: worker metrics, 9465: producer metrics. No HEALTHCHECK here: the port depends on the
# command; docker-compose.yml probes GET /ready (worker) and GET /healthz (producer), and so can
# Kubernetes (readinessProbe /ready, livenessProbe /healthz).
EXPOSE 9464 9465
ENTRYPOINT ["streamtrainer"]
CMD ["--help"]
