"""chatsession_client.adk.ChatsessionSessionService, ADK's session service, with the real
google-adk against a real server; what it stored is read back with a plain client.

ADK's own contract suite (adk-python's tests/unittests/sessions/test_session_service.py) is run
outside this repository (scripts/adk_contract.sh); these tests prove what it does not: events
round trip equal with every kind of part, the message each event becomes, where each state key
goes, the id mapping, retention, refusals that change nothing, and an ADK Runner whose
conversation survives a restart of the application."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.sessions.base_session_service import GetSessionConfig
from google.adk.tools.tool_confirmation import ToolConfirmation
from google.genai import types

from chatsession.v1 import session_pb2
from chatsession_client import (
    NO_RETRY,
    InvalidArgumentError,
    PermissionDeniedError,
    SessionClient,
    payload_of,
    user,
)
from chatsession_client.adk import (
    APP_LABEL,
    SESSION_LABEL,
    USER_LABEL,
    ChatsessionSessionService,
    app_id_for,
    session_id_for,
    user_id_for,
)
from tests.adk.conftest import serve

ROOT = Path(__file__).resolve().parent.parent.parent


def rich_event(**overrides: Any) -> Event:
    """An event with a part of every kind the service must keep: text, thought, inline bytes,
    a function call and its response, and actions and metadata of every sort."""
    fields: dict[str, Any] = {
        "invocation_id": "inv-1",
        "author": "weather_agent",
        "content": types.Content(
            role="model",
            parts=[
                types.Part(text='Let me look. «snow» "quoted" 🌧️'),
                types.Part(text="The user wants Oslo.", thought=True),
                types.Part.from_bytes(data=bytes(range(256)), mime_type="image/png"),
                types.Part(
                    function_call=types.FunctionCall(
                        id="call-1", name="get_weather", args={"city": "Oslo", "days": 3, "metric": True}
                    )
                ),
            ],
        ),
        "actions": EventActions(
            state_delta={"last_city": "Oslo"},
            artifact_delta={"report.txt": 2},
            transfer_to_agent="other_agent",
            escalate=False,
            requested_tool_confirmations={
                "call-1": ToolConfirmation(hint="go?", confirmed=False, payload={"cost": 0.25})
            },
        ),
        "usage_metadata": types.GenerateContentResponseUsageMetadata(
            prompt_token_count=120, candidates_token_count=17, total_token_count=137
        ),
        "grounding_metadata": types.GroundingMetadata(
            web_search_queries=["oslo weather"],
            search_entry_point=types.SearchEntryPoint(sdk_blob=b"\x00blob\xff"),
        ),
        "custom_metadata": {"trace": {"ids": [1, 2.5, None, "x"]}},
        "long_running_tool_ids": {"call-1"},
        "branch": "root.weather_agent",
        "turn_complete": True,
        "timestamp": 1_700_000_000.123456,
    }
    fields.update(overrides)
    return Event(**fields)


def tool_response_event() -> Event:
    return Event(
        invocation_id="inv-1",
        author="weather_agent",
        content=types.Content(
            role="user",
            parts=[
                types.Part(
                    function_response=types.FunctionResponse(
                        id="call-1", name="get_weather", response={"sky": "snow", "celsius": -3.5}
                    )
                )
            ],
        ),
        timestamp=1_700_000_001.0,
    )


async def test_events_come_back_equal_with_every_kind_of_part(
    service: ChatsessionSessionService, uid: str
) -> None:
    session = await service.create_session(app_name=f"{uid}app", user_id=uid)
    said = Event(
        invocation_id="inv-1",
        author="user",
        content=types.Content(role="user", parts=[types.Part(text="Weather in Oslo?")]),
        timestamp=1_699_999_999.5,
    )
    events = [said, rich_event(), tool_response_event()]
    for event in events:
        await service.append_event(session, event)

    got = await service.get_session(app_name=f"{uid}app", user_id=uid, session_id=session.id)

    assert got is not None
    assert got.events == events
    assert [e.model_dump() for e in got.events] == [e.model_dump() for e in events]
    dumped = got.events[1].model_dump()
    assert dumped["content"]["parts"][2]["inline_data"]["data"] == bytes(range(256))
    assert dumped["grounding_metadata"]["search_entry_point"]["sdk_blob"] == b"\x00blob\xff"
    assert got == session


async def test_each_event_is_a_message_with_its_role_text_tool_calls_tokens_and_time(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    session = await service.create_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    said = Event(
        invocation_id="inv-1",
        author="user",
        content=types.Content(role="user", parts=[types.Part(text="Weather in Oslo?")]),
    )
    for event in (said, rich_event(), tool_response_event(), Event(invocation_id="inv-1", author="x")):
        await service.append_event(session, event)

    page = await client.list_messages(session_id_for(f"{uid}app", uid, "s1"))

    asked, called, answered, bare = page.messages
    assert (asked.role, asked.content, asked.name) == (session_pb2.ROLE_USER, "Weather in Oslo?", "user")
    assert called.role == session_pb2.ROLE_ASSISTANT
    # Text parts and a stand-in for the others; a thought is not the answer's text.
    assert called.content == 'Let me look. «snow» "quoted" 🌧️\n[image/png]\n[function_call get_weather]'
    assert [(c.id, c.name, json.loads(c.arguments)) for c in called.tool_calls] == [
        ("call-1", "get_weather", {"city": "Oslo", "days": 3, "metric": True})
    ]
    assert called.tokens == 17  # the model's output tokens
    assert called.created_at.ToMicroseconds() == 1_700_000_000_123_456
    assert dict(called.metadata) == {"adk.event_id": payload_of(called)["id"], "adk.invocation_id": "inv-1"}
    assert payload_of(called)["actions"]["artifact_delta"] == {"report.txt": 2}
    assert (answered.role, answered.tool_call_id, answered.content) == (
        session_pb2.ROLE_TOOL,
        "call-1",
        "[function_response get_weather]",
    )
    assert (bare.role, bare.content) == (session_pb2.ROLE_ASSISTANT, "[x event]")
    # An event's payload is its JSON form, whole.
    assert payload_of(asked) == json.loads(session.events[0].model_dump_json())


async def test_state_keys_go_to_the_session_the_user_of_the_app_or_nowhere(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    app = f"{uid}app"
    session = await service.create_session(
        app_name=app, user_id=uid, session_id="s1", state={"draft": 1, "user:lang": "nb", "temp:x": 1}
    )
    await service.append_event(
        session,
        Event(
            invocation_id="i",
            author="agent",
            actions=EventActions(state_delta={"draft": None, "user:tz": "CET", "temp:scratch": [1]}),
        ),
    )

    cs_id = session_id_for(app, uid, "s1")
    assert await client.get_state(cs_id) == {"draft": None}
    assert await client.get_state(user_id=uid) == {f"{app}/lang": "nb", f"{app}/tz": "CET"}
    # temp: keys live on the session object for the invocation only, and not in the stored event.
    assert session.state["temp:scratch"] == [1]
    assert "temp:scratch" not in session.events[0].actions.state_delta
    got = await service.get_session(app_name=app, user_id=uid, session_id="s1")
    assert got is not None
    assert got.state == {"draft": None, "user:lang": "nb", "user:tz": "CET"}
    assert await service.get_user_state(app_name=app, user_id=uid) == {"lang": "nb", "tz": "CET"}
    # The user's state of another app is another.
    assert await service.get_user_state(app_name=f"{app}2", user_id=uid) == {}
    other = await service.create_session(app_name=app, user_id=uid, session_id="s2")
    assert other.state == {"user:lang": "nb", "user:tz": "CET"}


async def test_app_keys_are_the_state_every_user_of_the_app_shares_and_only_that_app(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    app = f"{uid}app"
    ada = await service.create_session(app_name=app, user_id=f"{uid}ada", state={"app:motd": "hi"})
    await service.append_event(
        ada, Event(author="user", invocation_id="i", actions=EventActions(state_delta={"app:cfg": {"v": 2}}))
    )

    bob = await service.create_session(app_name=app, user_id=f"{uid}bob")
    other = await service.create_session(app_name=f"{app}2", user_id=f"{uid}ada")

    assert bob.state == {"app:motd": "hi", "app:cfg": {"v": 2}}
    assert other.state == {}
    assert ada.state == {"app:motd": "hi", "app:cfg": {"v": 2}}
    assert await client.get_state(app=app) == {"motd": "hi", "cfg": {"v": 2}}
    assert await client.get_state(ada_id := session_id_for(app, f"{uid}ada", ada.id)) == {}
    assert (await client.get_session(ada_id)).app == app


async def test_list_sessions_without_a_user_lists_every_users_sessions_of_the_app(
    service: ChatsessionSessionService, uid: str
) -> None:
    app = f"{uid}app"
    for user_id, name in ((f"{uid}ada", "a1"), (f"{uid}ada", "a2"), (f"{uid}bob", "b1")):
        await service.create_session(
            app_name=app, user_id=user_id, session_id=name, state={"user:u": user_id}
        )
    await service.create_session(app_name=f"{app}2", user_id=f"{uid}ada", session_id="elsewhere")

    listed = (await service.list_sessions(app_name=app)).sessions

    assert [(s.user_id, s.id) for s in listed] == [
        (f"{uid}ada", "a1"),
        (f"{uid}ada", "a2"),
        (f"{uid}bob", "b1"),
    ]
    assert [s.state for s in listed] == [{"user:u": s.user_id} for s in listed]


async def test_a_listing_of_many_sessions_reads_every_state(
    service: ChatsessionSessionService, uid: str
) -> None:
    app = f"{uid}app"
    made = {(f"{uid}u{i % 3}", f"s{i:02}") for i in range(70)}
    await asyncio.gather(
        *(service.create_session(app_name=app, user_id=u, session_id=n, state={"n": n}) for u, n in made)
    )

    listed = (await service.list_sessions(app_name=app)).sessions

    assert {(s.user_id, s.id) for s in listed} == made
    assert all(s.state == {"n": s.id} for s in listed)
    times = [s.last_update_time for s in listed]
    assert times == sorted(times)


async def test_a_token_not_allowed_the_user_or_the_app_is_refused(uid: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ada-token-0123456789 ada apps=travel\nops-token-0123456789 * apps=travel\n")
    proc, target = serve("--auth-tokens-file", str(tokens))
    try:
        async with (
            ChatsessionSessionService(target, token="ada-token-0123456789", retry=NO_RETRY) as ada,
            ChatsessionSessionService(target, token="ops-token-0123456789", retry=NO_RETRY) as ops,
        ):
            session = await ada.create_session(app_name="travel", user_id="ada", session_id="trip")
            await ada.append_event(
                session,
                Event(
                    author="user",
                    invocation_id="i",
                    actions=EventActions(state_delta={"app:k": 1, "user:k": 2}),
                ),
            )
            with pytest.raises(PermissionDeniedError):
                await ada.create_session(app_name="support", user_id="ada")
            with pytest.raises(PermissionDeniedError):
                await ada.create_session(app_name="travel", user_id="bob")
            with pytest.raises(PermissionDeniedError):
                await ada.list_sessions(app_name="travel")  # every user's: not ada's to list
            with pytest.raises(PermissionDeniedError):
                await ada.get_user_state(app_name="travel", user_id="bob")
            await ops.create_session(app_name="travel", user_id="bob", session_id="trip")
            listed = await ops.list_sessions(app_name="travel")
            assert [(s.user_id, s.id, s.state) for s in listed.sessions] == [
                ("ada", "trip", {"app:k": 1, "user:k": 2}),
                ("bob", "trip", {"app:k": 1}),
            ]
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    ("delta", "error"),
    [
        ({"user:" + "k" * 300: 1}, ValueError),  # past 256 bytes once stored under "<app>/"
        ({"app:bad\x07key": 1}, ValueError),
        ({"app:big": 2**60}, ValueError),  # not exact as a JSON number
        ({"ok": 1, "user:big": [2**60]}, ValueError),
        ({"big": "x" * 300_000}, InvalidArgumentError),  # the server's value limit (256 KiB)
    ],
)
async def test_a_state_delta_that_would_be_refused_stores_neither_the_event_nor_any_state(
    service: ChatsessionSessionService,
    client: SessionClient,
    uid: str,
    delta: dict[str, Any],
    error: type[Exception],
) -> None:
    app = f"{uid}app"
    session = await service.create_session(app_name=app, user_id=uid, session_id="s1")

    with pytest.raises(error):
        await service.append_event(
            session, Event(author="user", invocation_id="i", actions=EventActions(state_delta=delta))
        )

    cs_id = session_id_for(app, uid, "s1")
    assert (await client.list_messages(cs_id)).messages == []
    assert await client.get_state(cs_id) == {}
    assert await client.get_state(user_id=uid) == {}
    assert await client.get_state(app=app) == {}


async def test_a_create_whose_state_is_refused_leaves_no_session(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    app = f"{uid}app"
    with pytest.raises(InvalidArgumentError):
        await service.create_session(app_name=app, user_id=uid, session_id="s1", state={"big": "x" * 300_000})

    assert await service.get_session(app_name=app, user_id=uid, session_id="s1") is None
    assert [s async for s in client.iter_sessions(uid)] == []
    # The id is free again.
    await service.create_session(app_name=app, user_id=uid, session_id="s1")


async def test_a_value_that_is_not_json_is_stored_as_its_str(
    service: ChatsessionSessionService, uid: str
) -> None:
    class Opaque:
        def __str__(self) -> str:
            return "<opaque>"

    session = await service.create_session(
        app_name=f"{uid}app", user_id=uid, session_id="s1", state={"o": Opaque()}
    )
    got = await service.get_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    assert got is not None
    assert got.state == {"o": "<opaque>"}
    assert session.state == {"o": "<opaque>"}


async def test_the_event_time_is_the_sessions_last_update_time(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    session = await service.create_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    created = session.last_update_time
    assert abs(created - time.time()) < 60
    when = created + 10.25

    await service.append_event(session, Event(invocation_id="i", author="user", timestamp=when))

    assert session.last_update_time == pytest.approx(when, abs=1e-6)
    stored = await client.get_session(session_id_for(f"{uid}app", uid, "s1"))
    assert stored.last_active.ToMicroseconds() == round(when * 1e6)
    got = await service.get_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    assert got is not None
    assert got.last_update_time == session.last_update_time


async def test_get_session_keeps_the_newest_events_or_those_after_a_time(
    service: ChatsessionSessionService, uid: str
) -> None:
    app = f"{uid}app"
    session = await service.create_session(app_name=app, user_id=uid, session_id="s1")
    base = 1_700_000_000.0
    for i in range(1, 6):
        await service.append_event(session, Event(author="user", invocation_id=f"i{i}", timestamp=base + i))

    async def times(config: GetSessionConfig | None) -> list[float]:
        got = await service.get_session(app_name=app, user_id=uid, session_id="s1", config=config)
        assert got is not None
        return [e.timestamp - base for e in got.events]

    assert await times(None) == [1, 2, 3, 4, 5]
    assert await times(GetSessionConfig(num_recent_events=0)) == []
    assert await times(GetSessionConfig(num_recent_events=2)) == [4, 5]
    assert await times(GetSessionConfig(num_recent_events=9)) == [1, 2, 3, 4, 5]
    assert await times(GetSessionConfig(after_timestamp=base + 4)) == [4, 5]
    assert await times(GetSessionConfig(after_timestamp=base + 9)) == []
    assert await times(GetSessionConfig(num_recent_events=3, after_timestamp=base + 4)) == [4, 5]


async def test_an_id_is_unique_per_app_and_user_and_a_taken_one_is_refused(
    service: ChatsessionSessionService, uid: str
) -> None:
    await service.create_session(app_name=f"{uid}a", user_id=uid, session_id="s1", state={"who": 1})
    await service.create_session(app_name=f"{uid}a", user_id=f"{uid}2", session_id="s1", state={"who": 2})
    await service.create_session(app_name=f"{uid}b", user_id=uid, session_id="s1", state={"who": 3})

    with pytest.raises(AlreadyExistsError):
        await service.create_session(app_name=f"{uid}a", user_id=uid, session_id=" s1\n", state={"who": 4})

    for app, user_id, who in ((f"{uid}a", uid, 1), (f"{uid}a", f"{uid}2", 2), (f"{uid}b", uid, 3)):
        got = await service.get_session(app_name=app, user_id=user_id, session_id="s1")
        assert got is not None
        assert got.state == {"who": who}


async def test_any_ids_map_to_chatsession_ids_and_come_back(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    app, adk_user, adk_id = f"my app {uid}", f"{uid}@example.com", "chat #1/ünïcode"

    session = await service.create_session(app_name=app, user_id=adk_user, session_id=adk_id, state={"k": 1})
    await service.append_event(session, Event(author="user", invocation_id="i"))

    assert app_id_for(app) == "b32." + base64.b32encode(app.encode()).decode().lower().rstrip("=")
    cs_user = user_id_for(adk_user)
    assert re.fullmatch(r"b32\.[a-z2-7]+", cs_user)
    cs_id = session_id_for(app, adk_user, adk_id)
    assert re.fullmatch(rf"{re.escape(cs_user)}/adk-[a-z2-7]{{26}}", cs_id)
    stored = await client.get_session(cs_id)
    assert stored.user_id == cs_user
    assert {k: stored.labels[k] for k in (APP_LABEL, USER_LABEL, SESSION_LABEL)} == {
        APP_LABEL: app,
        USER_LABEL: adk_user,
        SESSION_LABEL: adk_id,
    }
    listed = await service.list_sessions(app_name=app, user_id=adk_user)
    assert [(s.app_name, s.user_id, s.id, s.state) for s in listed.sessions] == [
        (app, adk_user, adk_id, {"k": 1})
    ]
    # Readable ids stay readable; a raw user id that looks encoded is encoded too.
    assert session_id_for("weather", "ada", "trip") == "ada/weather:trip"
    assert user_id_for("b32.x") != "b32.x"
    assert session_id_for("a:b", "ada", "c") != session_id_for("a", "ada", "b:c")
    with pytest.raises(ValueError, match="user_id"):
        user_id_for("é" * 100)


async def test_list_sessions_gives_the_users_sessions_of_the_app_oldest_first_without_events(
    service: ChatsessionSessionService, uid: str
) -> None:
    app = f"{uid}app"
    for name in ("a", "b", "c"):
        await service.create_session(app_name=app, user_id=uid, session_id=name, state={"n": name})
    await service.create_session(app_name=f"{app}2", user_id=uid, session_id="other")
    a = await service.get_session(app_name=app, user_id=uid, session_id="a")
    assert a is not None
    await service.append_event(a, Event(author="user", invocation_id="i", timestamp=time.time() + 1))

    listed = (await service.list_sessions(app_name=app, user_id=uid)).sessions

    assert [s.id for s in listed] == ["b", "c", "a"]
    assert [s.state for s in listed] == [{"n": "b"}, {"n": "c"}, {"n": "a"}]
    assert all(s.events == [] for s in listed)
    assert (await service.list_sessions(app_name=f"{uid}none", user_id=uid)).sessions == []


async def test_a_stale_session_object_is_refused_and_changes_nothing(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    app = f"{uid}app"
    session = await service.create_session(app_name=app, user_id=uid, session_id="s1")
    stale = session.model_copy(deep=True)
    await service.append_event(session, Event(author="user", invocation_id="i1"))

    with pytest.raises(StaleSessionError):
        await service.append_event(
            stale, Event(author="user", invocation_id="i2", actions=EventActions(state_delta={"k": 1}))
        )

    cs_id = session_id_for(app, uid, "s1")
    assert [m.content for m in (await client.list_messages(cs_id)).messages] == ["[user event]"]
    assert await client.get_state(cs_id) == {}
    # The session read again is current.
    fresh = await service.get_session(app_name=app, user_id=uid, session_id="s1")
    assert fresh is not None
    await service.append_event(fresh, Event(author="user", invocation_id="i3"))


async def test_delete_removes_the_session_and_an_append_to_it_raises_session_not_found(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    app = f"{uid}app"
    session = await service.create_session(app_name=app, user_id=uid, session_id="s1", state={"k": 1})

    await service.delete_session(app_name=app, user_id=uid, session_id="s1")
    await service.delete_session(app_name=app, user_id=uid, session_id="s1")  # gone: no error

    assert await service.get_session(app_name=app, user_id=uid, session_id="s1") is None
    with pytest.raises(SessionNotFoundError):
        await service.append_event(session, Event(author="user", invocation_id="i"))
    assert [s async for s in client.iter_sessions(uid)] == []


async def test_partial_events_are_not_stored(service: ChatsessionSessionService, uid: str) -> None:
    session = await service.create_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    await service.append_event(session, Event(author="agent", partial=True, invocation_id="i"))
    got = await service.get_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    assert got is not None
    assert got.events == []
    assert session.events == []


async def test_sessions_never_expire_unless_configured(
    target: str, service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    await service.create_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    kept = await client.get_session(session_id_for(f"{uid}app", uid, "s1"))
    assert kept.expires_in_seconds == -1

    async with ChatsessionSessionService(target, ttl_seconds=600, max_messages=50, retry=NO_RETRY) as short:
        await short.create_session(app_name=f"{uid}app", user_id=uid, session_id="s2")
    expiring = await client.get_session(session_id_for(f"{uid}app", uid, "s2"))
    assert 0 < expiring.expires_in_seconds <= 600


async def test_a_message_another_client_appended_reads_as_an_event(
    service: ChatsessionSessionService, client: SessionClient, uid: str
) -> None:
    await service.create_session(app_name=f"{uid}app", user_id=uid, session_id="s1")
    await client.append(session_id_for(f"{uid}app", uid, "s1"), [user("Hello from grpcurl")])

    got = await service.get_session(app_name=f"{uid}app", user_id=uid, session_id="s1")

    assert got is not None
    (event,) = got.events
    assert event.author == "user"
    assert event.content == types.Content(role="user", parts=[types.Part(text="Hello from grpcurl")])


def test_the_service_works_from_runner_run_loops(target: str, uid: str) -> None:
    """ADK's blocking Runner.run calls the service from a loop of its own per call."""
    service = ChatsessionSessionService(target, retry=NO_RETRY)
    made = asyncio.run(service.create_session(app_name=f"{uid}app", user_id=uid, session_id="s1"))
    got = asyncio.run(service.get_session(app_name=f"{uid}app", user_id=uid, session_id="s1"))
    assert got == made


# --- The README's example: an ADK Runner, restarted ----------------------------------------------

README = ROOT / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Google ADK") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    return code.group(1)


def run_app(script: str, question: str, cwd: Path) -> str:
    """One run of the application: a process of its own."""
    done = subprocess.run(
        [sys.executable, "-c", script, question], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_the_readme_runner_conversation_survives_a_restart_of_the_app(
    target: str, client: SessionClient, uid: str, tmp_path: Path
) -> None:
    script = readme_example().replace("localhost:50051", target).replace('"ada"', f'"{uid}"')

    answers = [
        await asyncio.to_thread(run_app, script, question, tmp_path)
        for question in ("My name is Ada.", "How is the weather?", "What is my name?")
    ]

    assert answers == ["Nice to meet you.", "snow, -3 °C in Oslo.", "You first said: My name is Ada."]
    page = await client.list_messages(f"{uid}/weather:trip")
    assert [(m.role, m.content) for m in page.messages] == [
        (session_pb2.ROLE_USER, "My name is Ada."),
        (session_pb2.ROLE_ASSISTANT, "Nice to meet you."),
        (session_pb2.ROLE_USER, "How is the weather?"),
        (session_pb2.ROLE_ASSISTANT, "[function_call get_weather]"),
        (session_pb2.ROLE_TOOL, "[function_response get_weather]"),
        (session_pb2.ROLE_ASSISTANT, "snow, -3 °C in Oslo."),
        (session_pb2.ROLE_USER, "What is my name?"),
        (session_pb2.ROLE_ASSISTANT, "You first said: My name is Ada."),
    ]
