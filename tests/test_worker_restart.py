"""A worker restarted while Valkey is briefly away does not stop the `--workers` group (found in the
third review).

cli.py used to exit CANNOT_START for any RuntimeError at start-up, "Valkey not answering within
--valkey-startup-timeout" included, and the supervisor treats CANNOT_START as "every worker would
fail the same way": it stops the group. So one worker dying during a Valkey outage ended the
whole service, although its siblings would ride the outage out. Not answering now exits 1.
"""

from __future__ import annotations

import os
import signal

from chatsession_server.embedded import EmbeddedValkey
from tests.processes import ServerProcess, gone

SERVING = r"\[worker (\d) pid (\d+)\] .*serving on 127\.0\.0\.1:(\d+)"


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
