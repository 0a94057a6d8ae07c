"""`--workers N`: worker processes sharing one port and one Valkey, kept running by a supervisor:
a dead worker is replaced, also while Valkey is away (a worker that cannot reach Valkey within
--valkey-startup-timeout exits 1, not CANNOT_START, which would stop the group although its
siblings ride the outage out), and workers that can never start stop the group."""

from __future__ import annotations

import os
import signal

from chatsession_client import NO_RETRY, SessionClient
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.embedded_cluster import command
from chatsession_server.supervisor import CANNOT_START, WORKER_ENV
from tests.processes import ServerProcess, alive, gone, parent_of

STARTED = r"started worker (\d) \(pid (\d+)\)"
SERVING = r"\[worker (\d) pid (\d+)\] .*serving on 127\.0\.0\.1:(\d+)"


async def start_workers(count: int) -> tuple[ServerProcess, int, dict[int, int], int]:
    """A supervisor of `count` workers on a free port with an embedded Valkey: it, the port,
    worker number -> pid, and the Valkey's pid."""
    supervisor = await ServerProcess.start("--listen", "127.0.0.1:0", "--workers", str(count))
    valkey_pid = int((await supervisor.wait_for(r"valkey-server started on \S+ \(pid (\d+)\)"))[0].group(1))
    serving = await supervisor.wait_for(SERVING, count=count)
    ports = {int(m.group(3)) for m in serving}
    # Asked for port 0, the workers got one concrete port, the same for all.
    assert len(ports) == 1
    assert 0 not in ports
    workers = {int(m.group(1)): int(m.group(2)) for m in serving}
    assert sorted(workers) == list(range(1, count + 1))
    assert {parent_of(pid) for pid in workers.values()} == {supervisor.proc.pid}
    return supervisor, ports.pop(), workers, valkey_pid


async def read_back(port: int, session_id: str, connections: int = 4) -> None:
    """Read the session through several fresh connections (each may reach any live worker).

    With the client's retries: a connection may reach a replacement worker in the moment between
    its listening and its Valkey connection, which answers UNAVAILABLE (retry) by design."""
    for _ in range(connections):
        async with SessionClient(f"127.0.0.1:{port}") as client:
            assert (await client.get_session(session_id)).session_id == session_id


async def test_workers_share_the_port_and_valkey_and_a_dead_worker_is_replaced() -> None:
    supervisor, port, workers, valkey_pid = await start_workers(2)
    try:
        async with SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            session = await client.create_session("u")
        await read_back(port, session.session_id)

        # Worker 1 dies: worker 2 alone answers every new connection, from the shared Valkey.
        os.kill(workers[1], signal.SIGKILL)
        assert await gone(workers[1])
        await read_back(port, session.session_id)
        await supervisor.wait_for(rf"worker 1 \(pid {workers[1]}\) was killed by signal 9: restarting")
        [*_, restarted] = await supervisor.wait_for(SERVING, count=3)
        assert restarted.group(1) == "1"
        replacement = int(restarted.group(2))
        assert replacement != workers[1]
        assert parent_of(replacement) == supervisor.proc.pid

        # Worker 2 dies: the replacement of worker 1 answers.
        os.kill(workers[2], signal.SIGKILL)
        assert await gone(workers[2])
        await read_back(port, session.session_id)

        # The group holds the port: another supervisor (or a lone server) there fails at once.
        other = await ServerProcess.start("--listen", f"127.0.0.1:{port}", "--workers", "2")
        assert await other.exit_code(20) == 1
        assert "Address already in use" in other.text

        await supervisor.wait_for(SERVING, count=4)
        everything = [replacement, *(int(m.group(2)) for m in await supervisor.wait_for(STARTED, count=4))]
        supervisor.proc.send_signal(signal.SIGTERM)
        assert await supervisor.exit_code(30) == 0
        assert await gone(valkey_pid, *everything, timeout=5)
        assert "Traceback" not in supervisor.text
    finally:
        await supervisor.kill()


async def test_sigkill_of_the_supervisor_leaves_no_worker_and_no_valkey() -> None:
    supervisor, _, workers, valkey_pid = await start_workers(2)
    assert all(alive(pid) for pid in (valkey_pid, *workers.values()))
    await supervisor.kill()
    assert await gone(valkey_pid, *workers.values(), timeout=5)


async def test_a_worker_whose_supervisor_is_gone_does_not_start() -> None:
    """A worker is started armed to die with its supervisor; if the supervisor died before that,
    nothing would stop the worker, so it checks its parent and exits."""
    orphan = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--valkey-url", "valkey://127.0.0.1:1",
        env={WORKER_ENV: "1:1"},  # pid 1 is not its parent
    )  # fmt: skip
    assert await orphan.exit_code() == CANNOT_START
    [line] = orphan.lines
    assert "the supervisor is gone" in line


async def test_workers_that_cannot_start_stop_the_group_instead_of_restarting() -> None:
    # A password Valkey refuses: every worker would fail the same way, again and again.
    with EmbeddedValkey() as valkey:
        command("127.0.0.1", valkey.port, "CONFIG", "SET", "requirepass", "the-right-one")
        supervisor = await ServerProcess.start(
            "--listen", "127.0.0.1:0", "--workers", "2",
            env={"CHATSESSION_VALKEY_URL": valkey.url, "CHATSESSION_VALKEY_PASSWORD": "a-wrong-one"},
        )  # fmt: skip
        assert await supervisor.exit_code(30) == 1
    assert "could not start" in supervisor.text
    assert "restarting" not in supervisor.text
    assert "a-wrong-one" not in supervisor.text


async def test_a_worker_restarted_during_a_valkey_outage_does_not_stop_the_group() -> None:
    with EmbeddedValkey() as valkey:
        supervisor = await ServerProcess.start(
            "--listen", "127.0.0.1:0", "--workers", "2", "--valkey-startup-timeout", "1",
            env={"CHATSESSION_VALKEY_URL": valkey.url},
        )  # fmt: skip
        try:
            serving = await supervisor.wait_for(SERVING, count=2)
            workers = {int(m.group(1)): int(m.group(2)) for m in serving}
            valkey.stop()  # an outage (a restart, a failover): worker 2 keeps running meanwhile
            os.kill(workers[1], signal.SIGKILL)
            assert await gone(workers[1])
            # The replacement cannot reach Valkey within its start-up timeout; the group should
            # keep trying (as it does for any other death), not stop.
            await supervisor.wait_for(r"worker 1 .*restarting", count=2, timeout=20)
        finally:
            await supervisor.kill()
