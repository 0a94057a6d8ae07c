"""Baselines on grpc.aio with nothing behind them, with the server options and event loop of the
real server: what a call or a stream costs here is gRPC's own floor.

- WatchMessages writes one heartbeat and then waits forever (the idle-watcher figure's baseline).
- `/chatsession.bench.Echo/Echo` answers each request with its own bytes (the unary calls'
  baseline: bench/load.py sends it an AppendMessagesRequest).

    python bench/bare_stream_server.py      # prints "serving on 127.0.0.1:PORT" on stderr
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
import uvloop
from grpc import aio

from chatsession.v1 import session_service_pb2 as pb
from chatsession_server.app import SERVICE_NAME, grpc_options
from chatsession_server.settings import Settings


async def watch_messages(request: pb.WatchMessagesRequest, context: Any) -> None:
    # Written through context.write, as the real server's handlers are (the cheaper of grpc.aio's
    # two streaming styles: an async generator costs about 1 KiB more per open stream).
    await context.write(pb.WatchMessagesResponse(heartbeat=pb.Heartbeat(last_seq=0)))
    await asyncio.get_running_loop().create_future()  # idle until cancelled


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def main() -> None:
    server = aio.server(options=grpc_options(Settings()))
    handler = grpc.unary_stream_rpc_method_handler(
        watch_messages,
        request_deserializer=pb.WatchMessagesRequest.FromString,
        response_serializer=pb.WatchMessagesResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(SERVICE_NAME, {"WatchMessages": handler}),
            grpc.method_handlers_generic_handler(
                "chatsession.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main())
