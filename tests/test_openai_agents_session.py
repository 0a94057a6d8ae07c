"""chatsession_client.openai_agents.ChatsessionSession, the OpenAI Agents SDK's session memory, with
the real `agents` package against the suite's real server and Valkey.

What the SDK's own stores do (its tests of SQLiteSession and RedisSession, read from
openai-agents-python's tests/test_session.py and tests/extensions/memory/test_redis_session.py,
and their code in agents 0.24) and ChatsessionSession does the same, each proved here: items come
back in the order added and equal (unicode, quotes, JSON-like and SQL-like strings);
`get_items(limit)` gives the newest `limit` oldest first, all for None, none for 0 (and, as
RedisSession, for a negative limit: SQLite's LIMIT -1 returns all); `session_settings.limit` is
the default an explicit limit overrides; `pop_item` returns the newest and None on an empty
session; `clear_session` empties it; adding [] does nothing; concurrent adds keep every item;
sessions are isolated; `Runner.run`, `run_streamed` and `run_sync` carry the history between
turns; a cancelled write is finished before the cancellation is raised."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
import pytest
from agents import Agent, Runner, function_tool
from agents.extensions.memory.redis_session import RedisSession
from agents.items import TResponseInputItem
from agents.memory import Session, SessionSettings, SQLiteSession
from agents.testing import ScriptedModel, assistant_message, function_call

from chatsession_client import (
    NO_RETRY,
    InvalidArgumentError,
    PermissionDeniedError,
    SessionClient,
    assistant,
    tool,
    user,
)
from chatsession_client.openai_agents import ChatsessionSession
from tests.helpers import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    meta,
    raises,
    serving,
    stored_messages,
    violated_fields,
)

# Responses API input items of every kind an agent run stores, as the SDK hands them over.
ITEMS: list[dict[str, Any]] = [
    {"role": "developer", "content": "Answer in one line."},
    {"role": "user", "content": "What's the weather in Oslo? 🌧️ «quoted» \"double\" 'single'"},
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "The user wants the weather; call the tool."}],
        "encrypted_content": "gAAAAABo" + "x" * 64,
    },
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city": "Oslo", "units": "metric"}',
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": -3.5, "sky": "snow"}'},
    {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "status": "completed",
        "content": [
            {
                "type": "output_text",
                "text": "Snow, -3.5 °C.",
                "annotations": [
                    {
                        "type": "url_citation",
                        "start_index": 0,
                        "end_index": 4,
                        "url": "https://example.com/oslo",
                        "title": "Oslo",
                    }
                ],
                "logprobs": [
                    {"token": "Snow", "logprob": -0.25, "bytes": [83, 110, 111, 119], "top_logprobs": []}
                ],
            }
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "And this picture?"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
        ],
    },
    {"role": "assistant", "content": 'DROP TABLE sessions; Robert\'); --\nLine2\tTabbed {"nested": "json"}'},
]


def items(*texts: str) -> list[TResponseInputItem]:
    return as_items(
        [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    )


def as_items(values: list[dict[str, Any]]) -> list[TResponseInputItem]:
    """Plain dicts as the SDK's item type (a union of TypedDicts a dict literal cannot pick from)."""
    return cast("list[TResponseInputItem]", values)


def contents(found: list[TResponseInputItem]) -> list[Any]:
    return [item.get("content") for item in found]


@pytest.fixture
def new_session(target: str, uid: str) -> Callable[..., ChatsessionSession]:
    made: list[ChatsessionSession] = []

    def make(name: str = "conv", **options: Any) -> ChatsessionSession:
        session = ChatsessionSession(f"{uid}-{name}", target=target, user_id=uid, retry=NO_RETRY, **options)
        made.append(session)
        return session

    return make


# The SDK's own stores, for the tests of behaviour every Session owes its caller: each such test
# runs against SQLiteSession (on a file, so that two sessions share a database) and RedisSession (on
# the suite's Valkey) too, so that it proves the SDK's contract, not our reading of it. Standalone
# pass only: RedisSession's client is not a cluster client.
STORES = ["chatsession", "sqlite", "redis"]


@pytest.fixture(params=STORES)
async def any_session(
    request: pytest.FixtureRequest,
    new_session: Callable[..., ChatsessionSession],
    valkey_cluster: bool,
    valkey_url: str,
    uid: str,
    tmp_path: Any,
) -> AsyncIterator[Callable[..., Session]]:
    store: str = request.param
    if store != "chatsession" and valkey_cluster:
        pytest.skip("the SDK's stores run in the standalone pass")
    made: list[Any] = []

    def make(name: str = "conv", *, session_settings: Any = None) -> Session:
        if store == "chatsession":
            return new_session(name, session_settings=session_settings)
        session: Any
        if store == "sqlite":
            session = SQLiteSession(
                f"{uid}-{name}", tmp_path / "agents.db", session_settings=session_settings
            )
        else:
            # redis-py names its scheme redis://; the suite's URL may say valkey://.
            url = "redis://" + valkey_url.partition("://")[2]
            session = RedisSession.from_url(f"{uid}-{name}", url=url, session_settings=session_settings)
        made.append(session)
        return cast(Session, session)

    yield make
    for session in made:
        result = session.close()
        if asyncio.iscoroutine(result):
            await result


def store_of(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["any_session"])


async def test_a_chatsession_session_is_an_agents_session(
    new_session: Callable[..., ChatsessionSession],
) -> None:
    session = new_session()
    assert isinstance(session, Session)
    assert session.session_settings == SessionSettings()


async def test_items_of_every_kind_come_back_in_order_and_equal(
    new_session: Callable[..., ChatsessionSession], raw: Any
) -> None:
    session = new_session()
    given = copy.deepcopy(ITEMS)
    await session.add_items(as_items(given[:3]))
    await session.add_items(as_items(given[3:]))
    found = await session.get_items()
    assert found == ITEMS
    # Equal down to the JSON text: the same keys, strings, numbers and nesting.
    assert json.dumps(found, sort_keys=True) == json.dumps(ITEMS, sort_keys=True)
    assert given == ITEMS  # the caller's items were not changed either
    assert len(await stored_messages(raw, session.session_id)) == len(ITEMS)


async def test_each_item_fills_the_role_content_tool_calls_and_tokens_the_service_uses(
    new_session: Callable[..., ChatsessionSession], client: SessionClient
) -> None:
    session = new_session()
    await session.add_items(as_items(copy.deepcopy(ITEMS)))
    stored = (await client.list_messages(session.session_id)).messages
    roles = [m.role for m in stored]
    assert roles == [1, 2, 3, 3, 4, 3, 2, 3]  # system, user, assistant (reasoning, call), tool, ...
    assert stored[0].content == "Answer in one line."
    assert stored[2].content == "The user wants the weather; call the tool."
    call = stored[3].tool_calls[0]
    assert (call.id, call.name, call.arguments) == (
        "call_1",
        "get_weather",
        '{"city": "Oslo", "units": "metric"}',
    )
    assert stored[3].content == ""
    assert (stored[4].tool_call_id, stored[4].content) == ("call_1", '{"temp": -3.5, "sky": "snow"}')
    assert stored[5].content == "Snow, -3.5 °C."
    assert stored[6].content == "And this picture?\n[input_image]"
    # About 4 characters a token of the text (and arguments), at least 1.
    assert stored[0].tokens == 5  # 19 characters
    assert stored[3].tokens == 9  # the arguments' 35 characters
    assert all(m.tokens >= 1 for m in stored)


async def test_a_token_counter_gives_each_items_tokens(
    new_session: Callable[..., ChatsessionSession], client: SessionClient
) -> None:
    session = new_session(count_tokens=lambda item: 7 if item.get("role") == "user" else 11)
    await session.add_items(items("a", "b"))
    stored = (await client.list_messages(session.session_id)).messages
    assert [m.tokens for m in stored] == [7, 11]
    assert (await client.get_session(session.session_id)).token_count == 18


async def test_get_items_limit_gives_the_newest_oldest_first(
    any_session: Callable[..., Session],
    request: pytest.FixtureRequest,
) -> None:
    session = any_session()
    await session.add_items(items("1", "2", "3", "4", "5", "6"))
    assert contents(await session.get_items(limit=2)) == ["5", "6"]
    assert contents(await session.get_items(limit=4)) == ["3", "4", "5", "6"]
    assert contents(await session.get_items(limit=10)) == ["1", "2", "3", "4", "5", "6"]
    assert contents(await session.get_items()) == ["1", "2", "3", "4", "5", "6"]
    assert await session.get_items(limit=0) == []
    # A negative limit: RedisSession gives none, as ours does; SQLite's LIMIT -1 gives all.
    everything = ["1", "2", "3", "4", "5", "6"]
    assert contents(await session.get_items(limit=-1)) == (
        everything if store_of(request) == "sqlite" else []
    )


async def test_get_items_limit_beyond_one_page_reads_back_page_by_page(
    new_session: Callable[..., ChatsessionSession],
) -> None:
    session = new_session()
    texts = [str(i) for i in range(1100)]
    await session.add_items(items(*texts[:600]))
    await session.add_items(items(*texts[600:]))
    assert contents(await session.get_items(limit=1050)) == texts[50:]
    assert contents(await session.get_items()) == texts


async def test_session_settings_limit_is_the_default_and_an_explicit_limit_wins(
    any_session: Callable[..., Session],
) -> None:
    session = any_session(session_settings=SessionSettings(limit=3))
    await session.add_items(items("1", "2", "3", "4", "5"))
    assert contents(await session.get_items()) == ["3", "4", "5"]
    assert contents(await session.get_items(limit=5)) == ["1", "2", "3", "4", "5"]
    as_dict = any_session(session_settings={"limit": 2})
    assert as_dict.session_settings == SessionSettings(limit=2)
    await as_dict.add_items(items("a", "b", "c"))
    assert contents(await as_dict.get_items()) == ["b", "c"]


async def test_the_runner_reads_only_the_session_settings_limit_of_history(
    any_session: Callable[..., Session],
) -> None:
    session = any_session(session_settings=SessionSettings(limit=2))
    await session.add_items(items("1", "2", "3", "4"))
    model = ScriptedModel([[assistant_message("ok")]])
    await Runner.run(Agent(name="a", model=model), "5", session=session)
    assert model.last_call is not None
    assert [i.get("content") for i in model.last_call.input] == ["3", "4", "5"]


async def test_pop_item_returns_the_newest_then_none_once_empty(
    new_session: Callable[..., ChatsessionSession], raw: Any
) -> None:
    session = new_session()
    assert await session.pop_item() is None  # never created
    given = copy.deepcopy(ITEMS[3:6])
    await session.add_items(as_items(given))
    assert await session.pop_item() == ITEMS[5]
    assert await session.get_items() == ITEMS[3:5]
    assert await session.pop_item() == ITEMS[4]
    assert await session.pop_item() == ITEMS[3]
    assert await session.pop_item() is None
    assert await session.get_items() == []
    assert await stored_messages(raw, session.session_id) == []


async def test_pop_item_is_one_round_trip(target: str, uid: str) -> None:
    calls: list[str] = []

    class Count(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            method = details.method.decode() if isinstance(details.method, bytes) else details.method
            calls.append(method.rsplit("/", 1)[-1])
            return await continuation(details, request)

    channel = grpc.aio.insecure_channel(target, interceptors=[Count()])
    async with SessionClient(channel=channel, retry=NO_RETRY) as shared:
        session = ChatsessionSession(f"{uid}-pop", user_id=uid, client=shared)
        await session.add_items(items("1", "2"))
        calls.clear()
        popped = await session.pop_item()
        assert popped is not None
        assert popped.get("content") == "2"
        assert calls == ["TruncateMessages"]
    await channel.close()


async def test_pop_item_leaves_other_sessions_alone(any_session: Callable[..., Session]) -> None:
    one, two = any_session("one"), any_session("two")
    await one.add_items(items("one"))
    await two.add_items(items("two 1", "two 2"))
    assert contents([await two.pop_item()]) == ["two 2"]  # type: ignore[list-item]
    assert contents(await one.get_items()) == ["one"]
    assert contents(await two.get_items()) == ["two 1"]


async def test_clear_session_empties_it_and_later_adds_start_afresh(
    new_session: Callable[..., ChatsessionSession], raw: Any
) -> None:
    session = new_session()
    await session.clear_session()  # never created: nothing to clear, no error
    await session.add_items(items("1", "2"))
    await session.clear_session()
    assert await session.get_items() == []
    assert await session.pop_item() is None
    assert await stored_messages(raw, session.session_id) == []
    await session.add_items(items("3"))
    assert contents(await session.get_items()) == ["3"]


async def test_adding_no_items_does_nothing(new_session: Callable[..., ChatsessionSession], raw: Any) -> None:
    session = new_session()
    await session.add_items([])
    assert await session.get_items() == []
    assert await raw.exists([f"meta:{{{session.session_id}}}"]) == 0


async def test_the_session_is_created_for_the_user_on_the_first_add(
    new_session: Callable[..., ChatsessionSession], raw: Any, client: SessionClient, uid: str
) -> None:
    session = new_session(title="Weather", labels={"app": "agents"})
    assert await session.get_items() == []  # a read creates nothing
    assert await raw.exists([f"meta:{{{session.session_id}}}"]) == 0
    await session.add_items(items("hi"))
    stored = await meta(raw, session.session_id)
    assert (stored["user_id"], stored["title"]) == (uid, "Weather")
    listed = [s.session_id async for s in client.iter_sessions(uid)]
    assert listed == [session.session_id]
    assert (await client.get_session(session.session_id)).labels == {"app": "agents"}


async def test_racing_first_adds_create_one_session_and_keep_every_item(
    target: str, uid: str, client: SessionClient
) -> None:
    # Five instances (five app processes, say) of one new session, adding at once.
    sessions = [ChatsessionSession(f"{uid}-race", target=target, user_id=uid) for _ in range(5)]
    await asyncio.gather(*(s.add_items(items(f"{i}a", f"{i}b")) for i, s in enumerate(sessions)))
    found = contents(await sessions[0].get_items())
    assert sorted(found) == sorted(f"{i}{x}" for i in range(5) for x in "ab")
    assert [s.session_id async for s in client.iter_sessions(uid)] == [f"{uid}-race"]
    for s in sessions:
        await s.close()


async def test_concurrent_adds_keep_every_item_and_each_call_together(
    any_session: Callable[..., Session],
) -> None:
    session = any_session()
    await session.add_items(items("first"))
    batches = [
        [{"role": "user", "content": f"Message {start + i}"} for i in range(5)] for start in (0, 5, 10)
    ]
    await asyncio.gather(*(session.add_items(as_items(b)) for b in batches))
    found = contents(await session.get_items())
    assert found[0] == "first"
    assert sorted(found[1:]) == sorted(f"Message {i}" for i in range(15))
    # Each add_items is one append: its items stay side by side, in their order.
    for batch in batches:
        texts = [item["content"] for item in batch]
        at = found.index(texts[0])
        assert found[at : at + 5] == texts


async def test_sessions_are_isolated(any_session: Callable[..., Session]) -> None:
    cats, dogs = any_session("cats"), any_session("dogs")
    await cats.add_items(items("I like cats."))
    await dogs.add_items(items("I like dogs."))
    assert contents(await cats.get_items()) == ["I like cats."]
    assert contents(await dogs.get_items()) == ["I like dogs."]


async def test_messages_other_clients_append_read_as_input_items(
    new_session: Callable[..., ChatsessionSession], client: SessionClient, uid: str
) -> None:
    session = new_session()
    await session.add_items(items("from the agent"))
    await client.append(
        session.session_id,
        [
            user("from a support console"),
            assistant("", tool_calls=[("c1", "lookup", '{"q": 1}'), ("c2", "lookup", "{}")]),
            tool("found", tool_call_id="c1"),
        ],
    )
    assert await session.get_items() == [
        {"role": "user", "content": "from the agent"},
        {"role": "user", "content": "from a support console"},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "found"},
    ]
    # The limit counts items, not messages.
    assert [i.get("call_id") for i in await session.get_items(limit=2)] == ["c2", "c1"]


@function_tool
def get_weather(city: str) -> str:
    """The weather of a city."""
    return f"Snow in {city}"


@pytest.mark.parametrize("runner_method", ["run", "run_streamed", "run_sync"])
async def test_the_runner_carries_history_and_tool_calls_between_turns(
    new_session: Callable[..., ChatsessionSession], client: SessionClient, runner_method: str
) -> None:
    session = new_session(runner_method)
    model = ScriptedModel([
        [function_call("get_weather", {"city": "Oslo"}, call_id="call_oslo")],
        [assistant_message("Snow in Oslo.")],
        [assistant_message("You asked about Oslo.")],
    ])  # fmt: skip
    agent = Agent(name="weather", model=model, tools=[get_weather])

    async def turn(text: str) -> Any:
        if runner_method == "run":
            return (await Runner.run(agent, text, session=session)).final_output
        if runner_method == "run_streamed":
            streamed = Runner.run_streamed(agent, text, session=session)
            async for _ in streamed.stream_events():
                pass
            return streamed.final_output
        # run_sync makes an event loop of its own: in a thread, as the SDK's own tests do.
        return await asyncio.to_thread(lambda: Runner.run_sync(agent, text, session=session).final_output)

    assert await turn("Weather in Oslo?") == "Snow in Oslo."
    assert await turn("Which city did I ask about?") == "You asked about Oslo."
    assert model.last_call is not None
    second_input = model.last_call.input
    assert second_input[0] == {"content": "Weather in Oslo?", "role": "user"}
    kinds = [item.get("type") for item in await session.get_items()]
    assert kinds.count("function_call") == 1
    assert kinds.count("function_call_output") == 1
    stored = (await client.list_messages(session.session_id)).messages
    (call,) = [m for m in stored if m.tool_calls]
    (answer,) = [m for m in stored if m.tool_call_id]
    assert (call.tool_calls[0].id, call.tool_calls[0].name) == ("call_oslo", "get_weather")
    assert (answer.tool_call_id, answer.content) == ("call_oslo", "Snow in Oslo")
    await session.close()


async def test_a_cancelled_add_is_finished_before_the_cancellation_is_raised(
    new_session: Callable[..., ChatsessionSession],
) -> None:
    session = new_session()
    adding = asyncio.ensure_future(session.add_items(items("kept")))
    await asyncio.sleep(0)  # the call is on its way, its answer not yet back
    adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    assert contents(await session.get_items()) == ["kept"]


async def test_refusals_are_chatsession_errors_naming_the_field(target: str, uid: str, raw: Any) -> None:
    session = ChatsessionSession("x" * 200, target=target, user_id=uid, retry=NO_RETRY)
    error = await raises(InvalidArgumentError, session.add_items(items("hi")))
    assert "session_id" in violated_fields(error)
    await session.close()
    not_json = ChatsessionSession(f"{uid}-bytes", target=target, user_id=uid)
    with pytest.raises((TypeError, ValueError)):
        await not_json.add_items(as_items([{"role": "user", "content": b"bytes"}]))
    assert await raw.exists([f"meta:{{{uid}-bytes}}"]) == 0


async def test_numbers_come_back_equal_and_integers_beyond_2_53_are_refused(
    new_session: Callable[..., ChatsessionSession], raw: Any
) -> None:
    # A payload's numbers are JSON's (doubles): an integral float comes back as the int it
    # equals, and an integer a double cannot hold is refused before anything is sent.
    session = new_session()
    logprob = {"token": "ok", "logprob": 0.0, "bytes": [111, 107], "top_logprobs": []}
    part = {"type": "output_text", "text": "ok", "annotations": [], "logprobs": [logprob]}
    item = {"type": "message", "id": "m", "role": "assistant", "status": "completed", "content": [part]}
    await session.add_items(as_items([item]))
    (found,) = await session.get_items()
    assert found == item
    assert found["content"][0]["logprobs"][0]["logprob"] == 0  # type: ignore[index,typeddict-item]
    with pytest.raises(ValueError, match="2\\^53"):
        await session.add_items(as_items([{"role": "user", "content": "n", "n": 2**60}]))
    assert len(await stored_messages(raw, session.session_id)) == 1


async def test_an_item_the_server_refuses_is_refused_with_its_batch_naming_it(
    new_session: Callable[..., ChatsessionSession], raw: Any
) -> None:
    session = new_session()
    await session.add_items(items("kept"))
    # The suite's server takes 1024 bytes of content: the item's text is more.
    error = await raises(InvalidArgumentError, session.add_items(items("fine", "x" * 2000)))
    assert "messages[1].content" in violated_fields(error)
    assert contents(await session.get_items()) == ["kept"]
    assert len(await stored_messages(raw, session.session_id)) == 1


async def test_a_session_made_to_never_expire_keeps_no_ttl(
    new_session: Callable[..., ChatsessionSession], client: SessionClient, raw: Any
) -> None:
    # As the SDK's SQLiteSession and RedisSession (ttl=None) keep a conversation until cleared.
    session = new_session(ttl_seconds=-1, max_messages=-1)
    await session.add_items(items("remember this"))
    stored = await client.get_session(session.session_id)
    assert (stored.expires_in_seconds, stored.max_messages) == (-1, -1)
    assert await raw.ttl(f"meta:{{{session.session_id}}}") == -1
    assert await raw.ttl(f"chat:{{{session.session_id}}}") == -1


async def test_with_auth_a_callers_sessions_are_its_own(
    settings: Any, valkey_url: str, tokens_file: Any
) -> None:
    # A caller limited to some users names its sessions <user_id>/<name> (the server's rule);
    # another caller finds such a session empty and cannot write into it.
    async with serving(settings, valkey_url, auth_tokens_file=str(tokens_file)) as running:
        target = f"127.0.0.1:{running.port}"
        mine = ChatsessionSession(f"{ALICE}/trip", target=target, user_id=ALICE, token=ALICE_TOKEN)
        await mine.add_items(items("alice's"))
        assert contents(await mine.get_items()) == ["alice's"]
        outside = ChatsessionSession(f"{ALICE}-trip", target=target, user_id=ALICE, token=ALICE_TOKEN)
        await raises(PermissionDeniedError, outside.add_items(items("no namespace")))
        bob = ChatsessionSession(f"{ALICE}/trip", target=target, user_id=BOB, token=BOB_TOKEN, retry=NO_RETRY)
        assert await bob.get_items() == []
        assert await bob.pop_item() is None
        await raises(InvalidArgumentError, bob.add_items(items("bob's")))
        assert contents(await mine.get_items()) == ["alice's"]
        for s in (mine, outside, bob):
            await s.close()
