"""Baselines on grpc.aio with nothing behind them, with the server options and event loop of the
real server: what a call or a stream costs here is gRPC's own floor.

- WatchMessages writes one heartbeat and then waits forever (the idle-watcher figure's baseline).
- `/chatsession.bench.Echo/Echo` answers each request with its own bytes (the unary calls'
  baseline: bench/load.py sends it an AppendMessagesRequest).
- `/chatsession.bench.Echo/EchoScript` (with `--valkey-url`) does the same after one EVALSHA of
  a script that returns 1, through a GLIDE client made as chatsession makes its own: the floor
  of any call that reaches Valkey once, before chatsession does any work of its own.

    python bench/bare_stream_server.py [--valkey-url URL]   # prints "serving on 127.0.0.1:PORT" on stderr
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import grpc
import uvloop
from glide import Script
from grpc import aio

from chatsession.v1 import session_service_pb2 as pb
from chatsession_server.app import SERVICE_NAME, grpc_options
from chatsession_server.settings import Settings, ValkeyAddress
from chatsession_server.store.valkey import create_client, glide_config


async def watch_messages(request: pb.WatchMessagesRequest, context: Any) -> None:
    # Written through context.write, as the real server's handlers are (the cheaper of grpc.aio's
    # two streaming styles: an async generator costs about 1 KiB more per open stream).
    await context.write(pb.WatchMessagesResponse(heartbeat=pb.Heartbeat(last_seq=0)))
    await asyncio.get_running_loop().create_future()  # idle until cancelled


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def main(valkey_url: str) -> None:
    settings = Settings()
    server = aio.server(options=grpc_options(settings))
    echoes: dict[str, Any] = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    if valkey_url:
        client = await create_client(
            glide_config(
                ValkeyAddress.parse(valkey_url),
                cluster=False,
                request_timeout_ms=settings.valkey_timeout_ms,
                connect_timeout_ms=settings.valkey_connect_timeout_ms,
                inflight_limit=settings.valkey_inflight_limit,
            )
        )
        script = Script("return 1")  # type: ignore[no-untyped-call]

        async def echo_script(request: bytes, context: Any) -> bytes:
            await client.invoke_script(script, keys=["chat:{bench}"], args=["1"])
            return request

        echoes["EchoScript"] = grpc.unary_unary_rpc_method_handler(echo_script)
    handler = grpc.unary_stream_rpc_method_handler(
        watch_messages,
        request_deserializer=pb.WatchMessagesRequest.FromString,
        response_serializer=pb.WatchMessagesResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(SERVICE_NAME, {"WatchMessages": handler}),
            grpc.method_handlers_generic_handler("chatsession.bench.Echo", echoes),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--valkey-url", default="", help="serve EchoScript too, against this Valkey")
    uvloop.run(main(parser.parse_args().valkey_url))
