"""Large requests from a client whose certificate the CA signed but no `cert:` line names (mTLS).

The shape of `bench/soak.py`'s `unauthenticated` scenario (whose helpers it uses), with mTLS on
and the caller known by certificate only: a server with --tls-client-ca and a tokens file of
`cert:` lines, then requests of 4 MB from another certificate of the same CA, with no token, many
at a time. Figures: the replies' codes, the server's RSS growth at the peak, and its RSS a minute
after the last reply.

    python bench/mtls_unlisted.py                      # 1000 requests, 50 connections, 1000 in flight
    python bench/mtls_unlisted.py --body message       # a request that parses (one 4 MB message)
    python bench/mtls_unlisted.py --requests 100 --in-flight 100 --settle 5   # a quick look

--body garbage (the default, soak's body) is a field that does not parse; --body message is an
AppendMessagesRequest with one message of 4 MB, which parses. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT
from soak import MIB, PeakRss, rss_mib, server

sys.path.insert(0, str(ROOT))
from chatsession.v1 import session_pb2
from chatsession.v1 import session_service_pb2 as pb
from chatsession_server.embedded import EmbeddedValkey
from tests.pki import CertificateAuthority

METHOD = "/chatsession.v1.SessionService/AppendMessages"


def body_of(kind: str, size: int) -> bytes:
    if kind == "garbage":
        return b"\x0a" + b"x" * (size - 1)
    message = session_pb2.Message(role=session_pb2.ROLE_USER, content="x")
    overhead = len(pb.AppendMessagesRequest(session_id="s", messages=[message]).SerializeToString()) - 1
    # The content's length prefix grows from 1 to 3 bytes at this size.
    message.content = "x" * (size - overhead - 2)
    body = pb.AppendMessagesRequest(session_id="s", messages=[message]).SerializeToString()
    assert abs(len(body) - size) <= 4, len(body)
    return body


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--bytes", type=int, default=4_000_000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds to wait before the last RSS reading"
    )
    parser.add_argument("--body", choices=("garbage", "message"), default="garbage")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch, EmbeddedValkey() as valkey:
        directory = Path(scratch)
        ca = CertificateAuthority(directory, "ca")
        server_identity = ca.issue("server", server=True)
        unlisted = ca.issue("some-mesh-workload")
        tokens = directory / "tokens"
        tokens.write_text("cert:CN=billing-svc *\ncert:SAN=spiffe://example.org/chat-bob bob\n")
        flags = (
            "--auth-tokens-file", str(tokens),
            "--tls-cert", str(server_identity.cert), "--tls-key", str(server_identity.key),
            "--tls-client-ca", str(ca.cert),
        )  # fmt: skip
        credentials = grpc.ssl_channel_credentials(ca.cert_pem, unlisted.key_pem, unlisted.cert_pem)
        body = body_of(args.body, args.bytes)
        print(
            f"mtls_unlisted: {args.requests} requests of {len(body):,} B ({args.body}) from an unlisted "
            f"certificate, no token, {args.in_flight} at a time over {args.connections} connections"
        )
        async with server(valkey.url, *flags) as (port, pid):
            options: list[tuple[str, Any]] = [
                ("grpc.use_local_subchannel_pool", 1),  # a connection of its own
                ("grpc.max_send_message_length", 64 * MIB),
            ]
            channels = [
                grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
                for _ in range(args.connections)
            ]
            codes: dict[str, int] = {}
            in_flight = asyncio.Semaphore(args.in_flight)

            async def one(i: int) -> None:
                call: Any = channels[i % len(channels)].unary_unary(METHOD)
                try:
                    async with in_flight:
                        await call(body, timeout=300)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1

            started = time.perf_counter()
            try:
                async with PeakRss(pid) as rss:
                    await asyncio.gather(*(one(i) for i in range(args.requests)))
            finally:
                for channel in channels:
                    await channel.close()
            seconds = time.perf_counter() - started
            after_last = rss_mib(pid)
            await asyncio.sleep(args.settle)
            settled = rss_mib(pid)
    figures = {
        "replies": codes,
        "seconds": round(seconds, 1),
        "rss_start_mib": round(rss.start),
        "rss_peak_growth_mib": round(rss.peak - rss.start),
        "rss_growth_after_last_reply_mib": round(after_last - rss.start),
        f"rss_growth_{args.settle:g}s_later_mib": round(settled - rss.start),
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
