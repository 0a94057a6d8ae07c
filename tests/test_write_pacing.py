"""Stream writes paced per pass of the event loop (api/pacing.py): a pass starts at most about one
budget of watch writes, the rest wait their turn in order, and nothing is lost or reordered.

The pacer's own rules are checked on a real event loop, counting its passes; over gRPC, watchers
of a server whose budget is a single byte (every write after the first of a pass waits) still get
every message once, in order, and a watcher that leaves while waiting its turn holds up nobody."""

from __future__ import annotations

import asyncio
import functools

from chatsession_client import SessionClient, user
from chatsession_server.api.pacing import WRITE_OVERHEAD, WritePacer
from chatsession_server.settings import Settings
from tests.helpers import connections, eventually, reading_watchers, serving, watch
from tests.test_observability import scrape, value


class PassCounter:
    """Counts the passes of the running loop: a callback that schedules itself again each pass."""

    def __init__(self) -> None:
        self.passes = 0
        self._running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if self._running:
            self.passes += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False


async def writes_started(pacer: WritePacer, sizes: list[int]) -> list[int]:
    """Starts one writer per size at once; returns the loop pass at which each got its turn."""
    counter = PassCounter()
    started: list[int] = [-1] * len(sizes)

    async def writer(i: int) -> None:
        turn = pacer.turn(sizes[i])
        if turn is not None:
            await turn
        started[i] = counter.passes

    await asyncio.gather(*(writer(i) for i in range(len(sizes))))
    counter.stop()
    return started


async def test_a_pass_starts_writes_up_to_its_budget_and_the_one_crossing_it_the_rest_later_in_order() -> (
    None
):
    pacer = WritePacer(bytes_per_pass=1_000_000)
    started = await writes_started(pacer, [300_000] * 10)
    # The first pass admits four (the one that crosses the budget included), and so does each after.
    assert started == sorted(started), "turns were not given in the order they were asked for"
    per_pass = [started.count(p) for p in sorted(set(started))]
    assert per_pass == [4, 4, 2]
    assert pacer.waiting == 0


async def test_writes_handed_their_turn_count_against_the_pass_they_start_in() -> None:
    """Waiting writes handed their turn start a pass later; writers woken in that pass (handlers
    woken by I/O, here plain callbacks) must find its budget spent by them, not a fresh one: no
    pass starts more than a budget and the write that crosses it."""
    budget = 1_000_000
    size = budget // 10 - WRITE_OVERHEAD  # ten writes a budget
    pacer = WritePacer(budget)
    counter = PassCounter()
    started: dict[int, int] = {}  # pass -> bytes started in it
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def start(last: bool) -> None:
        started[counter.passes] = started.get(counter.passes, 0) + size + WRITE_OVERHEAD
        if last:
            finished.set_result(None)

    def write(last: bool = False) -> None:
        turn = pacer.turn(size)
        if turn is None:
            start(last)
        else:  # a done callback runs a pass after the result is set, as a task's wake-up does
            turn.add_done_callback(lambda _: start(last))

    def burst() -> None:
        for _ in range(20):
            write()  # ten start now, ten wait: handed their turn next pass, started the one after
        loop.call_soon(lambda: loop.call_soon(late))

    def late() -> None:  # writers woken in the pass where the handed ones start
        for i in range(10):
            write(last=i == 9)

    loop.call_soon(burst)
    await asyncio.wait_for(finished, 5)
    counter.stop()
    assert sum(started.values()) == 30 * (size + WRITE_OVERHEAD)
    assert max(started.values()) <= budget + size + WRITE_OVERHEAD, started


async def test_a_write_larger_than_the_budget_still_gets_a_pass_of_its_own() -> None:
    pacer = WritePacer(bytes_per_pass=1000)
    started = await writes_started(pacer, [5_000_000, 5_000_000, 10])
    assert len(set(started)) == 3  # one a pass: none waits for ever


async def test_a_write_counts_its_overhead_so_a_pass_starts_a_bounded_number_of_small_ones() -> None:
    pacer = WritePacer(bytes_per_pass=10 * (1 + WRITE_OVERHEAD))
    started = await writes_started(pacer, [1] * 25)
    per_pass = [started.count(p) for p in sorted(set(started))]
    assert per_pass == [10, 10, 5]


async def test_a_writer_cancelled_while_it_waits_gives_its_turn_to_the_next() -> None:
    pacer = WritePacer(bytes_per_pass=1)
    assert pacer.turn(100) is None  # the pass's one write
    first, second = pacer.turn(100), pacer.turn(100)
    assert first is not None
    assert second is not None
    first.cancel()
    await asyncio.wait_for(second, 5)
    assert pacer.waiting == 0


async def test_without_contention_a_write_never_waits() -> None:
    """Each write takes a whole pass's budget, and each, a pass after the one before, starts at once."""
    pacer = WritePacer(bytes_per_pass=1000 + WRITE_OVERHEAD)
    for _ in range(5):
        assert pacer.turn(1000) is None
        await asyncio.sleep(0)  # a pass later: a new budget


# Over gRPC.

WATCHERS = 12
# Every write after the first of a pass waits for a later pass.
PACED = {"watch_write_bytes_per_pass": 1}


async def test_watchers_paced_to_one_write_a_pass_still_get_every_message_once_in_order(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, **PACED) as running,
        SessionClient(f"127.0.0.1:{running.port}") as client,
    ):
        session_id = (await client.create_session(uid)).session_id
        async with reading_watchers(running, session_id, WATCHERS) as all_reached:
            for i in range(10):
                await client.append(session_id, [user(f"m{i}.{j}") for j in range(5)])
            await eventually(functools.partial(all_reached, 50))


async def test_a_watcher_that_leaves_while_waiting_its_turn_holds_up_nobody(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """Watchers on a connection of their own leave right after an append, most with their writes
    still waiting their turn; the others get every message after it, and the pacer's queue drains."""
    async with (
        serving(settings, valkey_url, **PACED) as running,
        SessionClient(f"127.0.0.1:{running.port}") as client,
    ):
        session_id = (await client.create_session(uid)).session_id
        async with (
            reading_watchers(running, session_id, WATCHERS) as all_reached,
            connections(f"127.0.0.1:{running.port}", 1) as (stub,),
        ):
            leaving = [await watch(stub, session_id) for _ in range(WATCHERS)]
            await client.append(session_id, [user(f"first.{j}") for j in range(20)])
            pacer = running.pacer
            await eventually(lambda: pacer.waiting >= WATCHERS)  # most of them waiting their turn
            for call in leaving:
                call.cancel()
            await client.append(session_id, [user(f"second.{j}") for j in range(20)])
            await eventually(functools.partial(all_reached, 40))
            await eventually(lambda: pacer.waiting == 0)


async def test_writes_that_waited_their_turn_are_counted_in_the_metrics(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    options = {**PACED, "metrics_listen": "127.0.0.1:0"}
    async with (
        serving(settings, valkey_url, **options) as running,
        SessionClient(f"127.0.0.1:{running.port}") as client,
    ):
        assert running.telemetry is not None
        before = value(await scrape(running), "chatsession_watch_writes_paced_total")
        session_id = (await client.create_session(uid)).session_id
        async with reading_watchers(running, session_id, WATCHERS) as all_reached:
            await client.append(session_id, [user(f"m{j}") for j in range(5)])
            await eventually(functools.partial(all_reached, 5))
        pacer = running.pacer
        assert pacer.paced > 0
        assert value(await scrape(running), "chatsession_watch_writes_paced_total") == before + pacer.paced
