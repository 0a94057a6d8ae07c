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

# A value a caller chose (an id, a peer, a method path) is logged at most this many characters
# long: a session_id of 4 MiB must not write a line of 4 MB.
MAX_LOGGED_CHARS = 128
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def loggable(value: object, *, spaces: bool = True) -> str:
    """`value` as a log record may quote it: every character that is not printable (newlines,
    escape sequences, U+2028, ...) shown escaped as Python would (`\n`, `\x1b`, `\u2028`), a
    backslash doubled (so `\n` in a log always is an escaped newline, never a caller's two
    characters) and, without `spaces`, a space as `\x20` (so a value cannot add a `key=value`
    field to an access line); cut to MAX_LOGGED_CHARS characters, the cut said with the length the
    value had. A value that needs none of this (every valid id) is returned as it is, after one
    isprintable() scan: the access log calls this for every field of every call."""
    text = value if isinstance(value, str) else str(value)
    if (
        len(text) <= MAX_LOGGED_CHARS
        and text.isprintable()
        and "\\" not in text
        and (spaces or " " not in text)
    ):
        return text
    shown: list[str] = []
    size = 0
    used = 0
    for char in text[:MAX_LOGGED_CHARS]:  # each character shows as one or more: enough of them
        if char == "\\":
            char = "\\\\"
        elif not char.isprintable() or (char == " " and not spaces):
            char = _escape(char)
        if size + len(char) > MAX_LOGGED_CHARS:
            break
        shown.append(char)
        size += len(char)
        used += 1
    if used < len(text):
        shown.append(f"...[cut:{len(text)}chars]")  # no space: one access-line field
    return "".join(shown)


def _one_line(message: str) -> str:
    """A record's message with its non-printable characters escaped: whatever reached it unescaped,
    a record stays one line (a traceback, printed after it as text, is several)."""
    if message.isprintable():
        return message
    return "".join(char if char.isprintable() else _escape(char) for char in message)


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
            "message": _one_line(record.getMessage()),
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


class TextFormatter(logging.Formatter):
    """logging's own text line, its message kept to one line (see `_one_line`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _one_line(record.message)
        return super().formatMessage(record)


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
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
