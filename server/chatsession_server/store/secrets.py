"""Secrets the server processes share through Valkey, so replicas agree without configuration."""

from __future__ import annotations

import secrets

from glide import ConditionalChange

from chatsession_server.store.valkey import ValkeyConnection


async def shared_secret(conn: ValkeyConnection, key: str) -> bytes:
    """The secret stored under `key`; the first process to ask creates it (32 random bytes, hex).

    SET NX GET in one command: whoever loses the race reads the winner's value, never its own.
    """
    ours = secrets.token_hex(32).encode()
    batch = conn.batch(atomic=False)
    batch.set(key, ours, conditional_set=ConditionalChange.ONLY_IF_DOES_NOT_EXIST, return_old_value=True)
    [existing] = await conn.run(batch)
    return bytes(existing) if existing is not None else ours
