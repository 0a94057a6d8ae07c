"""Log set-up: text lines for people, or one JSON object per line for log pipelines.

Plain `logging` with a JSON formatter: every module (and grpc, and the OpenTelemetry SDK) already
logs through it, so one formatter covers them all without a second logging API.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


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


def configure_logging(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Log to stderr at `level`, as text or JSON lines. Workers share the supervisor's stderr:
    each of their lines says which worker wrote it."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = f"[worker {worker} pid %(process)d] " if worker is not None else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
