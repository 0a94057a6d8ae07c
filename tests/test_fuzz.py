"""Fuzzing every SessionService request through a real channel, server and Valkey.

Requests are generated from the protobuf descriptors (any message, any field: odd unicode, integer
extremes, unknown enum values, maps, repeated and nested fields), plus raw and mutated bytes. No
call may end INTERNAL or UNKNOWN, and a call that is refused must leave Valkey as it was.

Hypothesis drives synchronous examples from a worker thread; each example runs its calls on the
test's event loop (where the session-scoped server and clients live) and waits for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
import pytest
from glide import Batch, GlideClient, GlideClientConfiguration, NodeAddress
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsession.v1 import session_service_pb2
from chatsession.v1.session_pb2 import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_TOOL, ROLE_USER
from chatsession_client import SessionClient, assistant, system, user
from chatsession_server.app import RunningServer, start_server
from chatsession_server.settings import Settings, ValkeyAddress

# It isolates itself in a database of its own (db+1), which a cluster does not offer.
pytestmark = pytest.mark.standalone_only

T = TypeVar("T")
SERVICE = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"]
MAX_DEPTH = 3
# Keys that may expire while a call runs (a fuzzed ttl_seconds of 1) are left out of comparisons.
VOLATILE_MS = 10_000

# Each message is generated in one of two moods. Hostile: any value the wire allows (odd
# unicode, huge strings, integer extremes, unknown enum values, maps over the limits). Plausible:
# values the service accepts, still with any unicode in free text, so that examples also reach
# the store's scripts (and its state: a few sessions exist under the favoured ids).
IDS = ["s1", "s2", "s3", "alice", "bob", "r1"]
MASK_PATHS = [
    "title",
    "model",
    "labels",
    "labels.a",
    "labels.b",
    "ttl_seconds",
    "max_messages",
    "*",
    "user_id",
]
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
HOSTILE_TEXT = st.one_of(
    ANY_TEXT,
    st.sampled_from(["", "\x00", "{x}", "a b", "ǅ\u202e\ufeff", "é" * 129, "𝄞" * 300, "labels.", "labels.{"]),
    st.builds(
        lambda ch, n: ch * n, st.characters(codec="utf-8"), st.sampled_from([129, 257, 1025, 4097, 300_000])
    ),
)


def _integers(bits: int, signed: bool, hostile: bool) -> st.SearchStrategy[int]:
    if not hostile:
        return st.integers(0, 100)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [low, high, 0, 1, -1, 2**31 - 1, 2**31, 1000, 1001, 5000] if signed else [low, high, 1]
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high))


def _string(field: FieldDescriptor, hostile: bool) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.full_name == "google.protobuf.FieldMask.paths":
        plain = st.sampled_from(MASK_PATHS)
    elif field.name.endswith("_id"):
        plain = st.sampled_from(IDS)
    elif field.name == "key":  # map keys (labels, metadata) must not be empty
        plain = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
    else:
        plain = ANY_TEXT
    return st.one_of(plain, HOSTILE_TEXT) if hostile else plain


def _scalar(field: FieldDescriptor, depth: int, hostile: bool) -> st.SearchStrategy[Any]:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        assert field.message_type is not None
        return messages(field.message_type, hostile, depth + 1)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return _string(field, hostile)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:  # open enums: unknown numbers are legal on the wire
        assert field.enum_type is not None
        known = st.sampled_from([v.number for v in field.enum_type.values])
        return st.one_of(known, _integers(32, True, hostile)) if hostile else known
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return st.floats(width=32 if cpp == FieldDescriptor.CPPTYPE_FLOAT else 64)
    bits, signed = {
        FieldDescriptor.CPPTYPE_INT32: (32, True),
        FieldDescriptor.CPPTYPE_INT64: (64, True),
        FieldDescriptor.CPPTYPE_UINT32: (32, False),
        FieldDescriptor.CPPTYPE_UINT64: (64, False),
    }[cpp]
    return _integers(bits, signed, hostile)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field(field: FieldDescriptor, depth: int, hostile: bool) -> st.SearchStrategy[Any]:
    if _is_map(field):
        assert field.message_type is not None
        key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
        entries = st.dictionaries(_scalar(key, depth, hostile), _scalar(value, depth, hostile), max_size=4)
        if not hostile:
            return entries
        many = st.dictionaries(
            _scalar(key, depth, hostile), _scalar(value, depth, hostile), min_size=65, max_size=70
        )
        return st.one_of(entries, many)
    if field.is_repeated:
        return st.lists(_scalar(field, depth, hostile), max_size=4)
    return _scalar(field, depth, hostile)


def _build(cls: type[Message], descriptor: Descriptor, values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        if _is_map(field):
            target = getattr(message, name)
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            getattr(message, name).extend(value)
        elif isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def messages(descriptor: Descriptor, hostile: bool, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any instance of the message type, built by walking its descriptor; each field may be unset."""
    cls = GetMessageClass(descriptor)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    fields = {f.name: _field(f, depth, hostile) for f in descriptor.fields}
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, descriptor, values))


def _plausible(request: session_service_pb2.AppendMessagesRequest) -> None:
    """Mend the rules between fields (role, tool calls, empty content) that a field-by-field
    generator breaks almost every time."""
    for m in request.messages:
        if m.role not in (ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL):
            m.role = ROLE_USER
        if m.role != ROLE_ASSISTANT:
            del m.tool_calls[:]
        if m.role != ROLE_TOOL:
            m.tool_call_id = ""
        if not m.content and not m.tool_calls:
            m.content = "x"


@st.composite
def requests(draw: st.DrawFn) -> tuple[MethodDescriptor, bytes]:
    method: MethodDescriptor = draw(st.sampled_from(list(SERVICE.methods)))
    hostile = draw(st.booleans())
    request = draw(messages(method.input_type, hostile))
    if isinstance(request, session_service_pb2.AppendMessagesRequest) and not hostile:
        _plausible(request)
    payload = request.SerializeToString()
    how = draw(st.sampled_from(["as is"] * 4 + ["damaged", "random"]))
    if how == "random":
        payload = draw(st.binary(max_size=200))
    elif how == "damaged" and payload:  # a few bytes of a well-formed request overwritten
        damaged = bytearray(payload)
        for _ in range(draw(st.integers(1, 3))):
            damaged[draw(st.integers(0, len(damaged) - 1))] = draw(st.integers(0, 255))
        payload = bytes(damaged)
    return method, payload


Snapshot = dict[bytes, tuple[Any, int]]


async def snapshot(raw: GlideClient) -> Snapshot:
    """Every key of the fuzz database with its DUMP and PTTL, read in one transaction."""
    keys: list[bytes] = await raw.custom_command(["KEYS", "*"])
    if not keys:
        return {}
    batch = Batch(is_atomic=True)
    for key in keys:
        batch.custom_command(["DUMP", key])
        batch.pttl(key)
    values = await raw.exec(batch, raise_on_error=True) or []
    return {key: (values[2 * i], values[2 * i + 1]) for i, key in enumerate(keys)}


def _stable(snap: Snapshot, volatile: set[bytes]) -> dict[bytes, Any]:
    return {key: dump for key, (dump, _) in snap.items() if key not in volatile}


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        if method.server_streaming:  # the first event (or the error) is enough
            watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            stream = watch(payload, timeout=10)
            try:
                await stream.read()
            finally:
                stream.cancel()
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            await unary(payload, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def fuzz_address(valkey_url: str) -> ValkeyAddress:
    """A database of its own on the test Valkey, so a snapshot sees only what the fuzzing wrote."""
    address = ValkeyAddress.parse(valkey_url)
    return dataclasses.replace(address, database=(address.database + 1) % 16)


@pytest.fixture(scope="module")
async def fuzz_server(fuzz_address: ValkeyAddress) -> AsyncIterator[RunningServer]:
    running = await start_server(Settings(listen="127.0.0.1:0"), fuzz_address)
    yield running
    await running.stop(1.0)


@pytest.fixture(scope="module")
async def fuzz_raw(fuzz_address: ValkeyAddress) -> AsyncIterator[GlideClient]:
    config = GlideClientConfiguration(
        [NodeAddress(fuzz_address.host, fuzz_address.port)],
        database_id=fuzz_address.database,
        request_timeout=5000,
    )
    client = await GlideClient.create(config)
    yield client
    await client.close()


async def test_no_request_is_internal_or_unknown_and_refusals_write_nothing(
    fuzz_server: RunningServer, fuzz_raw: GlideClient, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    codes: Counter[str] = Counter()

    def on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    async with SessionClient(f"127.0.0.1:{fuzz_server.port}") as client:
        # Sessions under the ids the generator favours, so examples also meet existing state.
        for session_id, user_id in (("s1", "alice"), ("s2", "alice"), ("s3", "bob")):
            await client.delete_session(session_id, allow_missing=True)
            await client.create_session(user_id, session_id=session_id, labels={"a": "1"})
            await client.append(session_id, [system("be brief"), user("hi"), assistant("hello")])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:

        async def one(method: MethodDescriptor, payload: bytes) -> None:
            before = await snapshot(fuzz_raw)
            code = await call(channel, method, payload)
            codes[f"{method.name} {code.name}"] += 1
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method.name, payload)
            # OK may write; DEADLINE_EXCEEDED leaves the outcome open by definition.
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
                volatile = {key for key, (_, ttl) in before.items() if 0 <= ttl < VOLATILE_MS}
                after = await snapshot(fuzz_raw)
                assert _stable(after, volatile) == _stable(before, volatile), (method.name, code, payload)

        @settings(
            max_examples=int(os.environ.get("CHATSESSION_TEST_FUZZ_EXAMPLES", "150")),
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests())
        def check(request: tuple[MethodDescriptor, bytes]) -> None:
            on_loop(one(*request))

        with caplog.at_level(logging.WARNING):
            await asyncio.to_thread(check)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any(name.endswith(" OK") for name in codes), codes
    assert any(name.endswith(" INVALID_ARGUMENT") for name in codes), codes
