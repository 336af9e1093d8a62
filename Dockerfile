# The obsledger image: `obsledger serve` by default; docker-compose.yml runs the same image as
# the worker, the projectors and the relay. Only the runtime dependencies are installed (no
# `[dev]` extra), and the processes run as the unprivileged user `obsledger`, which owns /data
# (journal, admin password, heartbeats) and /raw (raw data files, MAST downloads).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 obsledger \
    && useradd --system --uid 10001 --gid obsledger --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin obsledger \
    && mkdir -p /data /raw \
    && chown obsledger:obsledger /data /raw

WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY commands commands
COPY projections projections
COPY queries queries
COPY infra infra
COPY workers workers
COPY bootstrap bootstrap
COPY api api
COPY obsledger_client obsledger_client
RUN pip install --no-cache-dir . \
    && rm -rf /app/build

# the commit this image is built from, for obsledger_build_info:
#   docker compose build --build-arg OBSLEDGER_GIT_COMMIT=$(git rev-parse --short=12 HEAD)
ARG OBSLEDGER_GIT_COMMIT=unknown
ENV OBSLEDGER_GIT_COMMIT=${OBSLEDGER_GIT_COMMIT} \
    OBSLEDGER_DATA_DIR=/data \
    OBSLEDGER_RAW_DATA_ROOT=/raw \
    OBSLEDGER_DOWNLOAD_ROOT=/raw

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# /health answers 200 while the API serves; other commands override this (compose does)
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["obsledger", "probe", "--url", "http://127.0.0.1:8000/health"]
CMD ["obsledger", "serve", "--host", "0.0.0.0", "--port", "8000"]
