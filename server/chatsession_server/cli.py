"""`chatsession-server` / `python -m chatsession_server`: settings from flags and environment, then serve."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from chatsession_server.settings import Settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # GLIDE's Rust core logs reconnect attempts as WARN lines of its own; keep errors only.
    from glide import Logger, LogLevel

    Logger.set_logger_config(LogLevel.ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_sources(argv)
    configure_logging(settings.log_level)
    from chatsession_server.app import serve

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except RuntimeError as exc:  # start-up failures (port taken, Valkey unreachable) without a traceback
        logging.getLogger("chatsession_server").error("%s", exc)
        sys.exit(1)
