"""Real `python -m chatsession_server` processes for the tests, their stderr read as it comes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is as good as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def parent_of(pid: int) -> int:
    # The command name (field 2) may hold spaces; the fields after its ")" do not.
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (e.g. a test's private temporary directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
    return found


async def gone(*pids: int, timeout: float = 10.0) -> bool:
    """True once none of `pids` is alive (the test fails if some still are after `timeout`)."""

    def none_alive() -> bool:
        return not any(alive(p) for p in pids)

    await eventually(none_alive, timeout, interval=0.05)
    return True


class ServerProcess:
    """`python -m chatsession_server ARGS`; no CHATSESSION_* variables but those given in `env`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._stderr_closed = False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: Mapping[str, str] | None = None) -> ServerProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSION_")}
        full_env.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatsession_server", *args,
            stderr=asyncio.subprocess.PIPE, env=full_env, cwd=ROOT,
        )  # fmt: skip
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._stderr_closed = True
            self._changed.notify_all()

    async def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 30.0) -> list[re.Match[str]]:
        """The first `count` lines matching `pattern`, waiting for them as they are written."""

        def matches() -> list[re.Match[str]]:
            return [m for line in self.lines if (m := re.search(pattern, line))]

        async def enough() -> list[re.Match[str]]:
            async with self._changed:
                while len(found := matches()) < count:
                    assert not self._stderr_closed, f"server exited before {pattern!r}:\n{self.text}"
                    await self._changed.wait()
                return found[:count]

        try:
            return await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            await self.kill()  # a failed test leaves no server behind
            raise AssertionError(f"no {count} x {pattern!r} within {timeout}s:\n{self.text}") from None

    async def exit_code(self, timeout: float = 30.0) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.text}") from None
        await self._reader
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def kill(self) -> None:
        """SIGKILL it (if still running) and reap it."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._reader
