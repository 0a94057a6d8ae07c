"""Found in review: APPEND forgot old request records with one `HDEL reqs unpack(old)`, about limit/2
names at once; Lua's unpack stops at 8000, so with --idempotency-keys-per-session above ~16000
(accepted by Settings) every append with a request_id on a busy session fails with a RequestError
(INTERNAL and a traceback) after RPUSH/HINCRBY/HSET already ran: the message is stored, the
session's expiry is not refreshed, a new chat LIST has no expiry at all, and no watcher is told."""

from __future__ import annotations

from typing import Any

from chatsession_client import SessionClient
from chatsession_server.app import RunningServer
from chatsession_server.domain import NewMessage, Role
from chatsession_server.store.session_store import SessionStore


async def test_forgetting_old_request_ids_works_with_a_large_idempotency_limit(
    server: RunningServer, client: SessionClient, raw: Any, uid: str
) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-i")
    store = SessionStore(server.connection, idempotency_limit=20_000)
    await raw.hset(f"reqs:{{{s.session_id}}}", {f"r{i}": f"fp {i + 1} 1" for i in range(30_000)})
    message = NewMessage(
        role=Role.USER, content="x", tokens=0, name="", metadata={}, tool_calls=(), tool_call_id=""
    )
    await store.append(s.session_id, [message], request_id="new")
    assert await raw.hlen(f"reqs:{{{s.session_id}}}") == 20_000
