# chatsession server image (README "Containers"). Point it at Valkey with CHATSESSION_VALKEY_URL;
# without one it refuses to start, unless CHATSESSION_EMBEDDED_VALKEY=1 asks for a private
# valkey-server whose data goes with the container.

# Build: every dependency from requirements.lock (exact versions, hashes checked), then the project's
# two distributions with --no-deps (the client's, which holds the generated code, and the server's,
# which depends on it), so nothing unpinned enters the virtualenv the image ships.
FROM python:3.12-slim AS build
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/chatsession \
    && /opt/chatsession/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r requirements.lock
COPY clients/python clients/python
COPY pyproject.toml README.md ./
COPY server server
RUN /opt/chatsession/bin/pip install --no-cache-dir --no-deps ./clients/python .

# Run: the base image and that virtualenv only (same path, so its scripts' interpreter lines hold).
FROM python:3.12-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin chatsession
COPY --from=build /opt/chatsession /opt/chatsession
ENV PATH=/opt/chatsession/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHATSESSION_LISTEN=0.0.0.0:50051 \
    CHATSESSION_EMBEDDED_VALKEY=0
USER 10001
EXPOSE 50051
# gRPC health of the server as a whole: NOT_SERVING while it waits for Valkey and while it drains.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "chatsession_server.healthcheck"]
ENTRYPOINT ["chatsession-server"]
