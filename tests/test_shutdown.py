"""Graceful stop of an in-process server: health flips to NOT_SERVING, in-flight calls finish."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import NO_RETRY, SessionClient, user
from chatsession_server.app import start_server
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import eventually


async def test_stop_reports_not_serving_and_lets_inflight_calls_finish(
    settings: Settings, valkey_url: str
) -> None:
    running = await start_server(settings, ValkeyAddress.parse(valkey_url))
    target = f"127.0.0.1:{running.port}"
    async with (
        grpc.aio.insecure_channel(target) as channel,
        SessionClient(channel=channel, retry=NO_RETRY) as client,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="chatsession.v1.SessionService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        s = await client.create_session("shutdown-user")
        sent: list[int] = []

        async def append(i: int) -> pb.AppendMessagesResponse:
            sent.append(i)
            return await client.append(s.session_id, [user(f"m{i}")])

        calls = [asyncio.create_task(append(i)) for i in range(50)]
        await eventually(lambda: len(sent) == 50, interval=0)  # every call is on its way
        stopping = asyncio.create_task(running.stop(5.0))
        results = await asyncio.gather(*calls, return_exceptions=True)
        await stopping
        ok = [r for r in results if not isinstance(r, BaseException)]
        # Whatever was acknowledged is stored; nothing half-applied.
        assert sorted(m.seq for r in ok for m in r.messages) == list(range(1, len(ok) + 1))
        assert (
            running.health._server_status["chatsession.v1.SessionService"]
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
