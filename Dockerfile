# syntax=docker/dockerfile:1
# Swapper Gateway: `docker build -t swapper-gateway .`, then
#   docker run -p 8890:8890 -e OLLAMA_BASE_URL=http://host.docker.internal:11434 \
#     -v ./swapper_config.yaml:/etc/swapper/swapper_config.yaml:ro swapper-gateway
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build: install the package and its dependencies into a self-contained venv.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
RUN /opt/venv/bin/pip install .

# Runtime: the venv alone (same base image, so same interpreter path), run as a non-root user.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 swapper \
    && useradd --system --uid 10001 --gid swapper --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin swapper
COPY --from=build /opt/venv /opt/venv
# The old service's example config, so the image starts on its own; mount your own over it.
COPY examples/swapper_config.yaml /etc/swapper/swapper_config.yaml
# pip compiled the bytecode at build time; the root filesystem may be read-only at run time.
# The state directory (the process groups of model servers it started) must be writable.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SWAPPER_CONFIG_PATH=/etc/swapper/swapper_config.yaml \
    SWAPPER_STATE_DIR=/tmp/swapper-gateway \
    SWAPPER_HEALTH_URL=http://127.0.0.1:8890/health
USER 10001:10001
EXPOSE 8890
# No curl in a slim image: the standard library asks /health. A non-2xx answer raises.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SWAPPER_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["swapper-gateway"]
CMD ["serve"]
