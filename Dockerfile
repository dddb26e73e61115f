# The bridge image: the Dagster code location (and the runs it launches), training through
# Dagster Pipes (BRIDGE_TRAINING_LAUNCHER=docker, BRIDGE_TRAINING_IMAGE=this image), the MLflow
# server, and the Ray nodes that host the Serve replicas. One image so every part runs the same
# pinned code. Build: docker build -t bridge:latest .
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WHYLOGS_NO_ANALYTICS=True \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /opt/bridge

# Dependencies first (a layer that changes only with the pins). torch==2.13.0 resolves to the
# CPU build from PyTorch's CPU index; anything else pulls gigabytes of CUDA.
COPY pyproject.toml constraints.txt setup.cfg README.md ./
RUN mkdir -p bridge_assets serving && touch bridge_assets/__init__.py serving/__init__.py \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt . \
 && pip uninstall -y bridge

COPY bridge_assets ./bridge_assets
COPY serving ./serving
COPY workspace.yaml ./
RUN pip install --no-deps -c constraints.txt . \
 && useradd --create-home --uid 1000 bridge \
 && mkdir -p /opt/dagster/home && chown -R bridge /opt/dagster

USER bridge
ENV DAGSTER_HOME=/opt/dagster/home \
    BRIDGE_HOME=/home/bridge/.bridge

# The code location (compose and Kubernetes override the command per service).
EXPOSE 4000
CMD ["dagster", "api", "grpc", "-m", "bridge_assets.definitions", "-a", "defs", "-h", "0.0.0.0", "-p", "4000", "--location-name", "bridge"]
