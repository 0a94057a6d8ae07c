"""chatsession_client.langchain.ChatsessionChatMessageHistory, a LangChain BaseChatMessageHistory, with
the real langchain-core against the suite's real server and Valkey.

Blocking calls run in a thread (`asyncio.to_thread`): the suite's server answers on this
process's event loop, which a blocking call on it would stall."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.chat_history import BaseChatMessageHistory, InMemoryChatMessageHistory
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_to_dict,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.history import RunnableWithMessageHistory

from chatsession_client import NO_RETRY, InvalidArgumentError, SessionClient, assistant, tool, user
from chatsession_client.langchain import ChatsessionChatMessageHistory
from tests.helpers import raises, stored_messages, violated_fields


def conversation() -> list[BaseMessage]:
    """One of every message class, with every field LangChain keeps set."""
    return [
        SystemMessage("You are a travel agent.", id="sys-1"),
        HumanMessage(
            content=[
                {"type": "text", "text": 'What is in this picture? «Oslo» "quoted" 🌧️'},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                },
            ],
            id="h-1",
            name="alice",
            additional_kwargs={"client": {"ip_country": "NO", "retries": 0}},
        ),
        AIMessage(
            content="Let me look that up.",
            id="run-1",
            tool_calls=[
                {
                    "name": "search",
                    "args": {"q": "Oslo weather", "days": 3},
                    "id": "call_1",
                    "type": "tool_call",
                }
            ],
            invalid_tool_calls=[
                {
                    "name": "broken",
                    "args": "{not json",
                    "id": "call_2",
                    "error": "bad JSON",
                    "type": "invalid_tool_call",
                }
            ],
            usage_metadata={
                "input_tokens": 120,
                "output_tokens": 17,
                "total_tokens": 137,
                "output_token_details": {"reasoning": 5},
            },
            response_metadata={
                "model_name": "gpt-x",
                "finish_reason": "tool_calls",
                "logprobs": None,
                "system_fingerprint": "fp_1",
                "temperature": 0.25,
            },
            additional_kwargs={"refusal": None},
        ),
        ToolMessage(
            "Snow, -3.5 °C",
            tool_call_id="call_1",
            name="search",
            artifact={"raw": [1, 2.5, None]},
            status="success",
        ),
        FunctionMessage(content="42", name="legacy_function"),
        AIMessageChunk(
            content="Snow",
            id="run-2",
            tool_call_chunks=[
                {
                    "name": "book",
                    "args": '{"city": "Oslo"}',
                    "id": "call_3",
                    "index": 0,
                    "type": "tool_call_chunk",
                }
            ],
            usage_metadata={"input_tokens": 10, "output_tokens": 4, "total_tokens": 14},
        ),
        ChatMessage(content="Looks right to me.", role="critic"),
        HumanMessage('DROP TABLE sessions; Robert\'); --\nLine2\tTabbed {"nested": "json"}'),
    ]


def same(found: list[BaseMessage], expected: list[BaseMessage]) -> None:
    """Equal, of the same class, and serialized alike (every field, key by key)."""
    assert [type(m) for m in found] == [type(m) for m in expected]
    assert found == expected
    assert [json.dumps(message_to_dict(m), sort_keys=True) for m in found] == [
        json.dumps(message_to_dict(m), sort_keys=True) for m in expected
    ]


@pytest.fixture
def history(target: str, uid: str) -> Callable[..., ChatsessionChatMessageHistory]:
    def make(name: str = "chat", **options: Any) -> ChatsessionChatMessageHistory:
        return ChatsessionChatMessageHistory(
            f"{uid}-{name}", target=target, user_id=uid, retry=NO_RETRY, **options
        )

    return make


async def test_it_is_a_langchain_chat_history(history: Callable[..., ChatsessionChatMessageHistory]) -> None:
    assert isinstance(history(), BaseChatMessageHistory)


async def test_every_message_class_round_trips_exactly_blocking(
    history: Callable[..., ChatsessionChatMessageHistory], raw: Any
) -> None:
    h = history()
    assert await asyncio.to_thread(lambda: h.messages) == []
    await asyncio.to_thread(h.add_messages, conversation()[:3])
    await asyncio.to_thread(h.add_messages, conversation()[3:])
    same(await asyncio.to_thread(lambda: h.messages), conversation())
    assert len(await stored_messages(raw, h.session_id)) == len(conversation())
    await asyncio.to_thread(h.clear)
    assert await asyncio.to_thread(lambda: h.messages) == []
    h.close()


async def test_every_message_class_round_trips_exactly_async(
    history: Callable[..., ChatsessionChatMessageHistory],
) -> None:
    h = history()
    assert await h.aget_messages() == []
    await h.aadd_messages(conversation())
    same(await h.aget_messages(), conversation())
    # What one side writes the other reads.
    same(await asyncio.to_thread(lambda: h.messages), conversation())
    await h.aclear()
    assert await h.aget_messages() == []
    await h.aadd_messages([HumanMessage("again")])
    assert [m.content for m in await h.aget_messages()] == ["again"]
    await h.aclose()
    h.close()


async def test_the_convenience_adders_store_one_message_each(
    history: Callable[..., ChatsessionChatMessageHistory],
) -> None:
    h = history()
    await asyncio.to_thread(h.add_user_message, "hi")
    await asyncio.to_thread(h.add_ai_message, "hello")
    await asyncio.to_thread(h.add_message, SystemMessage("be brief"))
    same(await h.aget_messages(), [HumanMessage("hi"), AIMessage("hello"), SystemMessage("be brief")])


async def test_each_message_fills_the_role_content_tool_calls_and_tokens_the_service_uses(
    history: Callable[..., ChatsessionChatMessageHistory], client: SessionClient
) -> None:
    h = history()
    await h.aadd_messages(conversation())
    stored = (await client.list_messages(h.session_id)).messages
    assert [m.role for m in stored] == [1, 2, 3, 4, 4, 3, 2, 2]  # critic is no role of ours: user
    assert stored[1].content == 'What is in this picture? «Oslo» "quoted" 🌧️\n[image_url]'
    assert stored[1].name == "alice"
    call = stored[2].tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "call_1",
        "search",
        {"q": "Oslo weather", "days": 3},
    )
    assert stored[2].tokens == 17  # usage_metadata's output_tokens
    assert stored[5].tokens == 4
    assert (stored[3].tool_call_id, stored[3].name) == ("call_1", "search")
    assert stored[0].tokens == 6  # "You are a travel agent.": 23 characters, about 4 a token
    assert (await client.get_session(h.session_id)).token_count == sum(m.tokens for m in stored)


async def test_a_token_counter_gives_each_messages_tokens(
    history: Callable[..., ChatsessionChatMessageHistory], client: SessionClient
) -> None:
    h = history(count_tokens=lambda m: len(str(m.content).split()))
    await h.aadd_messages([HumanMessage("three words here"), AIMessage("two words")])
    assert [m.tokens for m in (await client.list_messages(h.session_id)).messages] == [3, 2]


async def test_messages_other_clients_append_read_as_langchain_messages(
    history: Callable[..., ChatsessionChatMessageHistory], client: SessionClient
) -> None:
    h = history()
    await h.aadd_messages([HumanMessage("from the chain")])
    await client.append(
        h.session_id,
        [
            user("from a console", name="bob"),
            assistant("", tool_calls=[("c1", "lookup", '{"q": 1}'), ("c2", "raw", "not json")]),
            tool("found", tool_call_id="c1"),
        ],
    )
    found = await h.aget_messages()
    assert found == [
        HumanMessage("from the chain"),
        HumanMessage("from a console", name="bob"),
        AIMessage(
            "",
            tool_calls=[
                {"name": "lookup", "args": {"q": 1}, "id": "c1", "type": "tool_call"},
                {"name": "raw", "args": {"arguments": "not json"}, "id": "c2", "type": "tool_call"},
            ],
        ),
        ToolMessage("found", tool_call_id="c1"),
    ]


async def test_a_message_that_is_not_json_is_refused_before_anything_is_sent(
    history: Callable[..., ChatsessionChatMessageHistory], raw: Any
) -> None:
    h = history()
    with pytest.raises((TypeError, ValueError)):
        await h.aadd_messages([HumanMessage("hi", additional_kwargs={"blob": b"\x00\x01"})])
    assert await raw.exists([f"meta:{{{h.session_id}}}"]) == 0


async def test_refusals_are_chatsession_errors_naming_the_field(target: str, uid: str) -> None:
    h = ChatsessionChatMessageHistory("x" * 200, target=target, user_id=uid, retry=NO_RETRY)
    error = await raises(InvalidArgumentError, h.aadd_messages([HumanMessage("hi")]))
    assert "session_id" in violated_fields(error)
    with pytest.raises(InvalidArgumentError):
        await asyncio.to_thread(h.add_messages, [HumanMessage("hi")])


async def test_concurrent_adds_keep_every_message_and_each_call_together(
    history: Callable[..., ChatsessionChatMessageHistory],
) -> None:
    histories = [history() for _ in range(3)]  # three app instances, one new session
    batches = [[HumanMessage(f"{b}-{i}") for i in range(4)] for b in range(3)]
    await asyncio.gather(*(h.aadd_messages(batch) for h, batch in zip(histories, batches, strict=True)))
    found = [m.content for m in await histories[0].aget_messages()]
    assert sorted(found) == sorted(f"{b}-{i}" for b in range(3) for i in range(4))
    for b in range(3):
        at = found.index(f"{b}-0")
        assert found[at : at + 4] == [f"{b}-{i}" for i in range(4)]


# langchain-core 1.x deprecates it (for LangGraph's persistence), and it is what LangChain code uses.
@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
@pytest.mark.filterwarnings("ignore:The class `InMemoryChatMessageHistory` was deprecated")
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
# Also with LangChain's own InMemoryChatMessageHistory: the test holds for the framework's reference
# store, so it proves LangChain's contract and not our reading of it.
@pytest.mark.parametrize("store", ["chatsession", "in_memory"])
async def test_runnable_with_message_history_remembers_the_conversation(
    target: str, uid: str, mode: str, store: str, valkey_cluster: bool
) -> None:
    if store == "in_memory" and valkey_cluster:
        pytest.skip("the reference store runs in the standalone pass")
    in_memory: dict[str, InMemoryChatMessageHistory] = {}

    def history_of(session_id: str) -> BaseChatMessageHistory:
        if store == "in_memory":
            return in_memory.setdefault(session_id, InMemoryChatMessageHistory())
        return ChatsessionChatMessageHistory(session_id, target=target, user_id=uid)

    prompt = ChatPromptTemplate.from_messages(
        [("system", "Be brief."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    model = GenericFakeChatModel(
        messages=iter([AIMessage("Oslo is in Norway."), AIMessage("About 700,000.")])
    )
    seen: list[list[BaseMessage]] = []

    def record(value: Any) -> Any:
        seen.append(value.to_messages())
        return value

    chain = RunnableWithMessageHistory(
        prompt | record | model,
        history_of,
        input_messages_key="question",
        history_messages_key="history",
    )
    config: RunnableConfig = {"configurable": {"session_id": f"{uid}-{mode}"}}
    for question in ("Where is Oslo?", "How many people live there?"):
        if mode == "invoke":
            await asyncio.to_thread(chain.invoke, {"question": question}, config)
        else:
            await chain.ainvoke({"question": question}, config)
    # The second prompt had the first turn in it, read back from the server.
    assert [m.content for m in seen[1]] == [
        "Be brief.",
        "Where is Oslo?",
        "Oslo is in Norway.",
        "How many people live there?",
    ]
    stored = history_of(f"{uid}-{mode}")
    assert [type(m) for m in await stored.aget_messages()] == [HumanMessage, AIMessage] * 2
