"""The log handler holds access-log lines briefly and writes them in whole-line batches, never
reordering them with other records and never splitting a line across writes."""

from __future__ import annotations

import io
import logging
import time

from chatsession_server.logs import PIPE_BUF, AccessBatchingHandler


class Writes(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def record(message: str, *, access: bool) -> logging.LogRecord:
    name = "chatsession_server.access" if access else "chatsession_server.app"
    made = logging.LogRecord(name, logging.INFO, "", 0, message, (), None)
    if access:
        made.access = {"method": "m", "code": "OK"}
    return made


def test_access_lines_are_held_then_written_in_order_before_any_other_record() -> None:
    stream = Writes()
    handler = AccessBatchingHandler(stream)
    try:
        for i in range(3):
            handler.emit(record(f"call {i}", access=True))
        assert stream.writes == []  # held
        handler.emit(record("serving", access=False))
        assert stream.getvalue() == "call 0\ncall 1\ncall 2\nserving\n"
        assert len(stream.writes) == 1
    finally:
        handler.close()


def test_held_lines_go_out_within_the_flush_window_and_at_close() -> None:
    stream = Writes()
    handler = AccessBatchingHandler(stream)
    handler.emit(record("late", access=True))
    deadline = time.monotonic() + 5
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stream.getvalue() == "late\n"
    handler.emit(record("last", access=True))
    handler.close()
    assert stream.getvalue() == "late\nlast\n"


def test_a_batch_is_written_in_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    stream = Writes()
    handler = AccessBatchingHandler(stream)
    try:
        lines = [f"{i:04d} " + "é" * 300 for i in range(40)]  # 605 bytes each, with the newline
        for line in lines:
            handler.emit(record(line, access=True))
        handler.flush()
    finally:
        handler.close()
    assert "".join(stream.writes) == "".join(f"{line}\n" for line in lines)
    assert len(stream.writes) > 1
    for write in stream.writes:
        assert write.endswith("\n")
        assert len(write.encode()) <= PIPE_BUF
