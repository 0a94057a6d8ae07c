"""Handing memory the process has freed back to the operating system.

glibc's malloc keeps what a burst freed (gRPC's receive buffers, decoded requests) in its arenas
for reuse: after a burst of large requests the resident size stays near the burst's peak though
the memory is free, and a later burst on other threads takes more. `malloc_trim(0)` returns every
free page of every arena; `trim_every` calls it on a timer, in a thread (it walks the arenas while
the event loop goes on). Not glibc (musl, macOS): nothing to call, and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has loaded, the C library's among them
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


async def trim_every(seconds: float) -> None:
    """Returns freed memory to the OS every `seconds`, until cancelled."""
    trim = malloc_trim()
    if trim is None:
        log.info("no malloc_trim in this C library: --memory-trim-seconds has no effect")
        return
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(trim)
