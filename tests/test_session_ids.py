"""Session ids with '/': '<user_id>/<name>' is the session of that user, whoever asks."""

from __future__ import annotations

from glide import GlideClient

from chatsession_client import InvalidArgumentError, SessionClient, user
from tests.helpers import raises, violated_fields


async def test_an_id_with_a_slash_is_the_session_of_the_user_before_it(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    other = f"{uid}x"
    error = await raises(InvalidArgumentError, client.create_session(uid, session_id=f"{other}/chat"))
    assert violated_fields(error) == {"session_id"}
    assert f"must start with '{uid}/'" in error.message
    # A user id that the other's starts with: the whole id before the first '/' must match.
    await raises(InvalidArgumentError, client.create_session(uid, session_id=f"{uid}x/chat"))
    await raises(InvalidArgumentError, client.create_session(uid, session_id=f"/{uid}/chat"))
    assert not await raw.exists([f"meta:{{{other}/chat}}", f"meta:{{{uid}x/chat}}"])

    session = await client.create_session(uid, session_id=f"{uid}/app/chat")
    await client.append(session.session_id, [user("hello", tokens=1)])
    assert (await client.get_session(f"{uid}/app/chat")).message_count == 1
    assert await raw.exists([f"chat:{{{uid}/app/chat}}", f"meta:{{{uid}/app/chat}}"]) == 2

    # A fork is its source owner's: another user's namespace is refused once the source is read.
    error = await raises(
        InvalidArgumentError, client.fork_session(session.session_id, new_session_id=f"{other}/f")
    )
    assert violated_fields(error) == {"new_session_id"}
    assert not await raw.exists([f"meta:{{{other}/f}}"])
    assert await raw.zcard(f"user_sessions:{{{other}}}") == 0
    fork = await client.fork_session(session.session_id, new_session_id=f"{uid}/app/fork")
    assert fork.session.user_id == uid


async def test_sessions_with_slashes_list_page_by_page(client: SessionClient, uid: str) -> None:
    ids = {(await client.create_session(uid, session_id=f"{uid}/s{i}")).session_id for i in range(3)}
    listed: list[str] = []
    token = ""
    while True:  # page tokens carry the last session id: one with '/' reads back
        page = await client.list_sessions(uid, page_size=1, page_token=token)
        listed += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == sorted(ids)
