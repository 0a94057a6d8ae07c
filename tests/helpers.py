"""Small assertions shared by the tests."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from glide import GlideClient

from chatsession_client import ChatSessionError

E = TypeVar("E", bound=ChatSessionError)


async def raises(cls: type[E], call: Awaitable[Any]) -> E:
    with pytest.raises(cls) as info:
        await call
    return info.value


def violated_fields(error: ChatSessionError) -> set[str]:
    return {v.field for v in error.field_violations}


async def stored_messages(raw: GlideClient, session_id: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in await raw.lrange(f"chat:{{{session_id}}}", 0, -1)]


async def meta(raw: GlideClient, session_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await raw.hgetall(f"meta:{{{session_id}}}")).items()}


async def session_keys_exist(raw: GlideClient, session_id: str) -> int:
    return await raw.exists([f"chat:{{{session_id}}}", f"meta:{{{session_id}}}", f"reqs:{{{session_id}}}"])
