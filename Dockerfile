# syntax=docker/dockerfile:1
# goalstream image: one image for every process (`goalstream migrate`, `worker`, `admin`, ...).
#
#   docker build -t goalstream:0.1.0 .
#   docker run --rm goalstream:0.1.0 --help
#
# Two stages: the build stage installs the package and its dependencies into a virtual
# environment (every dependency ships manylinux wheels, so no compiler is needed); the runtime
# stage copies only that environment onto a clean slim image and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/goalstream
WORKDIR /src
# Metadata first, code last: edits to goalstream/ do not invalidate the layers above.
COPY pyproject.toml README.md ./
COPY sql/ sql/
COPY goalstream/ goalstream/
# A non-editable install: the package goes to site-packages (byte-compiled here, since the
# runtime's file system may be read-only) and the migrations to
# /opt/goalstream/share/goalstream/sql, where `goalstream migrate` looks for them.
RUN /opt/goalstream/bin/pip install --no-cache-dir . \
    && /opt/goalstream/bin/python -c "from goalstream.migrate import sql_dir; print(sql_dir())"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="goalstream" \
      org.opencontainers.image.description="Goal tracking on Redis Streams and PostgreSQL"
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 goalstream \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin goalstream
COPY --from=build /opt/goalstream /opt/goalstream
ENV PATH=/opt/goalstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GOALSTREAM_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
# 9108: the worker's /metrics, /healthz and /readyz. 8080: the admin API.
EXPOSE 9108 8080
# The worker handles SIGTERM itself (stop reading, finish the batch, acknowledge), so it may
# run as PID 1; exec form keeps it the process that receives the signal.
ENTRYPOINT ["goalstream"]
CMD ["worker"]
