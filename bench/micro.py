"""Micro figures of chatsession's own Python on the read path: no gRPC, no Valkey.

    python bench/micro.py        # one line per figure: the fastest of 40 batches, in µs

- `page`: a ListMessages page of 20 stored messages (200 B of content each) as the script
  returns them, decoded (codec.decode_messages), converted into the reply (convert.add_messages)
  and serialized. Runs on the server core (bench/common.py); the minimum of the batches is the
  figure, as the machine is shared and anything else can only make a batch slower.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))
from common import SERVER_CPUS

from chatsession.v1 import session_service_pb2 as pb
from chatsession_server.api.convert import add_messages
from chatsession_server.domain import NewMessage, Role
from chatsession_server.store import codec

BATCHES, PER_BATCH = 40, 300


def stored_page(count: int = 20) -> list[bytes]:
    return [
        codec.stored_json(seq, codec.encode_body(message, 1_764_000_000.123456)).encode()
        for seq, message in enumerate(
            [NewMessage(role=Role.USER, content="x" * 200, tokens=50)] * count, start=1
        )
    ]


def fastest(work: Callable[[], object]) -> float:
    for _ in range(PER_BATCH):  # warm-up
        work()
    best = float("inf")
    for _ in range(BATCHES):
        started = time.perf_counter()
        for _ in range(PER_BATCH):
            work()
        best = min(best, (time.perf_counter() - started) / PER_BATCH)
    return best * 1e6


def main() -> None:
    os.sched_setaffinity(0, SERVER_CPUS)
    raws = stored_page()

    def page() -> bytes:
        reply = pb.ListMessagesResponse(has_more=False, last_seq=len(raws))
        add_messages(reply.messages, codec.decode_messages(raws))
        return reply.SerializeToString()

    figures = {"page_of_20_us": round(fastest(page), 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
