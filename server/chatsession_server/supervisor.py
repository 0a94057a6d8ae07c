"""`--workers N`: N server processes sharing one listening port, kept running by this parent.

The parent runs no gRPC and no Valkey client. It checks the address (and picks the port when it
is 0, so that all workers share one), starts one embedded Valkey for all workers when no URL is
given, and starts each worker as `python -m chatsession_server` with the same flags and
environment plus `--workers 1`, the concrete address and a marker (`WORKER_ENV`) that makes it
share the port (SO_REUSEPORT). A worker that dies is restarted after a delay that doubles while
it keeps dying young. SIGTERM or SIGINT is passed on as SIGTERM; workers still running after
`--grace-seconds` plus a margin are killed.

Workers run in their own process group (a Ctrl-C reaches the parent only, which stops them in
order) and are started through `setpriv --pdeathsig KILL`, so they die with a killed parent;
a worker whose parent is already gone when it starts exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chatsession_server.embedded import EmbeddedValkey, die_with_parent_prefix
from chatsession_server.listen_address import claim_listen_port
from chatsession_server.settings import Settings

log = logging.getLogger(__name__)

# Set on workers only: "<worker number>:<supervisor pid>".
WORKER_ENV = "CHATSESSION_WORKER_OF"
CANNOT_START = 78  # sysexits' EX_CONFIG
"""A worker's exit code when it is refused for good at start (a wrong password, a bad certificate
or file): restarting it would fail again, so the supervisor stops the group and exits 1. A worker
that found Valkey not answering exits 1 and is restarted like any other: the outage may pass."""

# Workers get this long beyond --grace-seconds to exit before they are killed.
KILL_MARGIN_SECONDS = 5.0
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
# A worker that ran this long before dying is restarted after the first delay again.
STABLE_RUN_SECONDS = 30.0


@dataclass(frozen=True)
class WorkerIdentity:
    number: int
    supervisor_pid: int


def worker_identity(environ: Mapping[str, str] = os.environ) -> WorkerIdentity | None:
    """Who this process is as a worker, or None when it is not started by a supervisor."""
    value = environ.get(WORKER_ENV)
    if not value:
        return None
    number, _, pid = value.partition(":")
    return WorkerIdentity(int(number), int(pid))


def worker_count(settings: Settings) -> int:
    if settings.workers:
        return settings.workers
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use, not all of the machine's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run the workers until SIGTERM/SIGINT; the exit code. RuntimeError: cannot start (one line)."""
    port = claim_listen_port(settings.listen_host, settings.listen_port)
    command = [
        sys.executable, "-m", "chatsession_server", *argv,
        "--workers", "1", "--listen", f"{settings.listen_host}:{port}",
    ]  # fmt: skip
    embedded: EmbeddedValkey | None = None
    if settings.valkey is None:
        embedded = EmbeddedValkey()
        embedded.start()  # from the main thread: the parent-death signal follows the starting thread
        log.info("no Valkey URL configured: the workers share an embedded valkey-server (data is not kept)")
        command += ["--valkey-url", embedded.url]
    try:
        group = _WorkerGroup(command, worker_count(settings), settings.grace_seconds)
        return asyncio.run(group.run(f"{settings.listen_host}:{port}"))
    finally:
        if embedded is not None:
            embedded.stop()


class _WorkerGroup:
    def __init__(self, command: list[str], count: int, grace_seconds: float) -> None:
        self._command = command
        self._count = count
        self._grace_seconds = grace_seconds
        self._stopping = asyncio.Event()
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._failed = False  # a worker could not start

    async def run(self, address: str) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        log.info("supervising %d workers on %s (supervisor pid %d)", self._count, address, os.getpid())
        keepers = [asyncio.create_task(self._keep_running(n)) for n in range(1, self._count + 1)]
        await self._stopping.wait()
        log.info("stopping the workers: up to %.1fs to drain", self._grace_seconds)
        for process in self._processes.values():
            self._terminate(process)
        _, still_running = await asyncio.wait(keepers, timeout=self._grace_seconds + KILL_MARGIN_SECONDS)
        if still_running:
            for number, process in self._processes.items():
                if process.returncode is None:
                    log.warning("worker %d (pid %d) did not stop in time: killing it", number, process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.wait(keepers)
        log.info("all workers stopped")
        return 1 if self._failed else 0

    async def _keep_running(self, number: int) -> None:
        """Run worker `number` until the group stops, restarting it when it dies."""
        loop = asyncio.get_running_loop()
        delay = FIRST_RESTART_DELAY
        while True:
            started = loop.time()
            ended, code = await self._run_once(number)
            if self._stopping.is_set():
                return
            if code == CANNOT_START:
                log.error("worker %d could not start (its error is above): stopping", number)
                self._failed = True
                self._stopping.set()
                return
            if loop.time() - started >= STABLE_RUN_SECONDS:
                delay = FIRST_RESTART_DELAY
            log.warning("worker %d %s: restarting it in %.1fs", number, ended, delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                delay = min(2 * delay, MAX_RESTART_DELAY)

    async def _run_once(self, number: int) -> tuple[str, int | None]:
        """Start worker `number` and wait for it to end; how it ended, and its exit code."""
        try:
            process = await asyncio.create_subprocess_exec(
                *die_with_parent_prefix(),
                *self._command,
                env={**os.environ, WORKER_ENV: f"{number}:{os.getpid()}"},
                process_group=0,
            )
        except OSError as exc:  # e.g. out of processes or memory: try again later
            return f"could not be started ({exc})", None
        self._processes[number] = process
        log.info("started worker %d (pid %d)", number, process.pid)
        if self._stopping.is_set():  # the stop came while it was being started
            self._terminate(process)
        code = await process.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"(pid {process.pid}) {how}", code

    @staticmethod
    def _terminate(process: asyncio.subprocess.Process) -> None:
        # SIGTERM for SIGINT too: a worker still importing would die of SIGINT with a traceback.
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
