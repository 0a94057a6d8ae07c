# chatsession server image: point it at Valkey with CHATSESSION_VALKEY_URL
# (without one it starts an embedded valkey-server inside the container; data is then not kept).
FROM python:3.12-slim

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin chatsession
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gen gen
COPY server server
COPY clients/python clients/python
RUN pip install --no-cache-dir .

USER 10001
ENV CHATSESSION_LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["chatsession-server"]
