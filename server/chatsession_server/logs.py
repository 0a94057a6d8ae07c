"""Log set-up: text lines for people, or one JSON object per line for log pipelines.

Plain `logging` with a JSON formatter: every module (and grpc, and the OpenTelemetry SDK) already
logs through it, so one formatter covers them all without a second logging API.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message"}`, plus `worker` and `pid` in a --workers group,
    the access log's fields (`extra={"access": {...}}`) and `exception` (the traceback) if any."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
            entry["pid"] = record.process
        access = getattr(record, "access", None)
        if isinstance(access, dict):  # the fields are the line: the message need not repeat them
            entry["message"] = f"{access['method']} {access['code']}"
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# A write to a pipe of at most this many bytes is never interleaved with another process's write:
# workers share the supervisor's stderr, so a batch goes out in whole lines of at most this size.
PIPE_BUF = 4096
ACCESS_FLUSH_SECONDS = 0.2


class AccessBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that holds access-log lines for up to ACCESS_FLUSH_SECONDS and writes them
    together: one write per line cost about 15% of a busy server's CPU (measured on AppendMessages).
    Any other record first writes what is held, then itself, at once, so the order stays. Held
    lines go out at exit (logging's atexit flush); a killed process loses at most that window."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self._held: list[str] = []
        self._stop = threading.Event()
        threading.Thread(target=self._flush_forever, name="chatsession-log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._held.append(line)
        if getattr(record, "access", None) is None:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            held, self._held = self._held, []
            chunk: list[str] = []
            size = 0
            for line in held:
                length = len(line.encode(errors="replace")) + 1
                if chunk and size + length > PIPE_BUF:
                    self.stream.write("\n".join(chunk) + "\n")
                    chunk, size = [], 0
                chunk.append(line)
                size += length
            if chunk:
                self.stream.write("\n".join(chunk) + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()

    def _flush_forever(self) -> None:
        while not self._stop.wait(ACCESS_FLUSH_SECONDS):
            if self._held:
                self.flush()


def configure_logging(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Log to stderr at `level`, as text or JSON lines. Workers share the supervisor's stderr:
    each of their lines says which worker wrote it."""
    handler = AccessBatchingHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = f"[worker {worker} pid %(process)d] " if worker is not None else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
