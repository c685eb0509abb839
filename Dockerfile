# syntax=docker/dockerfile:1
# dispatcher: message dispatch with credit gating. Two stages: install the runtime lock
# (requirements/runtime.txt: exact versions, hashes checked) and our wheel into a virtualenv, then
# copy only that virtualenv into a slim runtime image that runs as an unprivileged user.
#
#   docker build -t dispatcher .
#   docker run --rm -e DISPATCHER_DATABASE_URL=... -e DISPATCHER_AMQP_URL=... dispatcher migrate
#   docker run --rm -p 8080:8080 -e ... dispatcher            # = dispatcher run

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The venv gets no pip or setuptools of its own (the image ships only the lock): the base
# image's pip installs into it. Dependencies first, so a code change reuses this layer.
RUN python -m venv --without-pip /opt/venv
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN pip --python /opt/venv/bin/python install --require-hashes --no-deps \
        -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY billing_client ./billing_client
# Build our wheel alone, then install it without dependencies: they all came from the lock.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip --python /opt/venv/bin/python install --no-deps /wheels/dispatcher-*.whl \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="dispatcher" \
      org.opencontainers.image.description="Message dispatch with credit gating: RabbitMQ jobs, PostgreSQL credits, Twilio sends."
# A fixed numeric UID so Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 dispatcher \
    && useradd --system --uid 10001 --gid dispatcher --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin dispatcher
COPY --from=builder /opt/venv /opt/venv
# The root filesystem may be read-only (Kubernetes): no bytecode writes, unbuffered logs, and
# listen on every interface inside the container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DISPATCHER_HTTP_HOST=0.0.0.0 \
    DISPATCHER_HTTP_PORT=8080 \
    DISPATCHER_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# No curl in the slim image: the standard library's urllib fails (non-zero exit) on non-2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DISPATCHER_HTTP_PORT', '8080') + '/healthz', timeout=3)"]
# SIGTERM reaches the Python process directly (exec form): it stops consuming, drains in-flight
# jobs for DISPATCHER_SHUTDOWN_TIMEOUT_SECONDS (25 s by default), then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dispatcher"]
CMD ["run"]
