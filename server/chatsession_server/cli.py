"""`chatsession-server` / `python -m chatsession_server`: settings from flags and environment, then serve.

With `--workers` other than 1 this process supervises worker processes (supervisor.py); each
worker, and a server without workers, serves in-process (app.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from chatsession_server.logs import configure_logging
from chatsession_server.settings import Settings
from chatsession_server.supervisor import CANNOT_START, WorkerIdentity, supervise, worker_identity


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = Settings.from_sources(args)  # a configuration error exits 2 with one line
    worker = worker_identity()
    configure_logging(settings.log_level, settings.log_format, worker.number if worker else None)
    try:
        if worker is None and settings.workers != 1:
            sys.exit(supervise(settings, args))
        if worker is not None and os.getppid() != worker.supervisor_pid:
            # Its parent died before the parent-death signal was armed: nobody would stop it.
            raise RuntimeError("the supervisor is gone: this worker does not start")
        if worker is not None:
            settings = _worker_settings(settings, worker)
        _serve(settings, share_port=worker is not None)
    except (RuntimeError, OSError) as exc:  # start-up failures (port taken, Valkey unreachable): one line
        logging.getLogger("chatsession_server").error("%s", exc)
        # A worker refused for good (a password, a certificate, a file) tells its supervisor so:
        # its siblings would fail the same way. Valkey not answering may pass: restart that one.
        lasting = worker is not None and not _passing(exc)
        sys.exit(CANNOT_START if lasting else 1)


def _worker_settings(settings: Settings, worker: WorkerIdentity) -> Settings:
    """Each worker serves its own /metrics (a shared port would answer for a random worker):
    worker N at the metrics port + N - 1 (a port of its own, for port 0)."""
    if not settings.metrics_listen:
        return settings
    host, _, port = settings.metrics_listen.rpartition(":")
    if int(port) == 0:
        return settings
    return dataclasses.replace(settings, metrics_listen=f"{host}:{int(port) + worker.number - 1}")


def _passing(exc: BaseException) -> bool:
    from chatsession_server.app import ValkeyNotAnswering

    return isinstance(exc, ValkeyNotAnswering)


def _serve(settings: Settings, *, share_port: bool) -> None:
    # GLIDE's Rust core logs reconnect attempts as WARN lines of its own; keep errors only.
    from glide import Logger, LogLevel

    Logger.set_logger_config(LogLevel.ERROR)
    from chatsession_server.app import serve

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, share_port=share_port))
