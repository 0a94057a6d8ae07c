"""ForkSession through a real server and Valkey (both passes): what a fork copies, at every edge
of at_seq, with a summary (and how long a copied summary lives), idempotent retries (also under a
session limit, and against a create reusing the fork's request_id), the label limit, a source at
--max-session-bytes, and refusals that write nothing (checked with a raw client)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from glide import GlideClient

from chatsession_client import (
    NO_RETRY,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SessionClient,
    UnavailableError,
    assistant,
    system,
    user,
)
from chatsession_server.app import RunningServer
from chatsession_server.errors import StoreUnavailable
from chatsession_server.settings import Settings
from chatsession_server.store.lua import session_scripts
from tests.helpers import grpcurl, meta, raises, serving, session_keys_exist, stored_messages, violated_fields

TTL = 1234


async def conversation(client: SessionClient, session_id: str, uid: str, **create: Any) -> None:
    """Seqs 1-2 the pinned prompt, 3-6 the conversation; tokens = seq."""
    await client.create_session(
        uid, session_id=session_id, model="gpt-4o", title="Trip", labels={"team": "travel"}, **create
    )
    await client.append(session_id, [system("You plan trips.", tokens=1), system("Be brief.", tokens=2)])
    await client.append(session_id, [user("Oslo?", tokens=3), assistant("Yes.", tokens=4)])
    await client.append(session_id, [user("Hotel?", tokens=5), assistant("The Grand.", tokens=6)])


async def index_score(raw: GlideClient, uid: str, session_id: str) -> float | None:
    return await raw.zscore(f"user_sessions:{{{uid}}}", session_id)


async def test_a_fork_copies_metadata_prompt_and_messages_up_to_at_seq(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid, ttl_seconds=TTL, max_messages=50)
    reply = await client.fork_session(f"{uid}-src", at_seq=4, new_session_id=f"{uid}-f")
    fork = reply.session
    assert not reply.replayed
    assert (fork.user_id, fork.model, fork.title) == (uid, "gpt-4o", "Trip")
    assert dict(fork.labels) == {"team": "travel", "forked_from": f"{uid}-src"}
    assert (fork.ttl_seconds, fork.max_messages) == (TTL, 50)
    assert (fork.message_count, fork.token_count, fork.messages_stored) == (4, 1 + 2 + 3 + 4, 4)
    page = await client.list_messages(fork.session_id)
    assert [(m.seq, m.content) for m in page.messages] == [
        (1, "You plan trips."),
        (2, "Be brief."),
        (3, "Oslo?"),
        (4, "Yes."),
    ]
    # Raw: counters match what the LIST holds, the prompt is pinned, no idempotency records
    # were copied, the keys expire with the source's TTL and the owner's index lists the fork.
    stored = await raw.lrange(f"chat:{{{uid}-f}}", 0, -1)
    fields = await meta(raw, f"{uid}-f")
    assert fields["pinned"] == "2"
    assert int(fields["stored_bytes"]) == sum(len(item) for item in stored)
    assert (fields["message_count"], fields["token_count"]) == ("4", "10")
    assert await raw.exists([f"reqs:{{{uid}-f}}", f"summary:{{{uid}-f}}"]) == 0
    assert 0 < await raw.ttl(f"chat:{{{uid}-f}}") <= TTL
    assert 0 < await raw.ttl(f"meta:{{{uid}-f}}") <= TTL
    assert await index_score(raw, uid, f"{uid}-f") is not None
    assert [s.session_id async for s in client.iter_sessions(uid)] == [f"{uid}-f", f"{uid}-src"]
    # The fork is a session like any other, the source is unchanged.
    appended = await client.append(fork.session_id, [user("Bergen instead?")])
    assert appended.messages[0].seq == 5
    assert (await client.get_session(f"{uid}-src")).message_count == 6


@pytest.mark.parametrize("at_seq", [0, 1, 2])
async def test_at_seq_within_the_prompt_copies_the_setup_only(
    client: SessionClient, uid: str, at_seq: int
) -> None:
    await conversation(client, f"{uid}-src", uid)
    fork = (await client.fork_session(f"{uid}-src", at_seq=at_seq, new_session_id=f"{uid}-f")).session
    assert (fork.message_count, fork.token_count) == (2, 3)
    assert [m.content for m in (await client.list_messages(fork.session_id)).messages] == [
        "You plan trips.",
        "Be brief.",
    ]


async def test_at_seq_last_or_absent_copies_everything(client: SessionClient, uid: str) -> None:
    await conversation(client, f"{uid}-src", uid)
    source = await client.list_messages(f"{uid}-src")
    for name, at_seq in (("last", 6), ("absent", None)):
        fork = (
            await client.fork_session(f"{uid}-src", at_seq=at_seq, new_session_id=f"{uid}-{name}")
        ).session
        assert (fork.message_count, fork.token_count) == (6, 21)
        copied = await client.list_messages(fork.session_id)
        assert [(m.seq, m.role, m.content, m.tokens) for m in copied.messages] == [
            (m.seq, m.role, m.content, m.tokens) for m in source.messages
        ]


async def test_at_seq_beyond_the_last_is_a_failed_precondition_and_writes_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid)
    error = await raises(
        FailedPreconditionError, client.fork_session(f"{uid}-src", at_seq=7, new_session_id=f"{uid}-f")
    )
    assert (error.precondition_violations[0].type, error.precondition_violations[0].subject) == (
        "AT_SEQ_BEYOND_LAST",
        "at_seq",
    )
    assert await session_keys_exist(raw, f"{uid}-f") == 0
    assert await index_score(raw, uid, f"{uid}-f") is None
    # The same reads see the fork at the last seq.
    await client.fork_session(f"{uid}-src", at_seq=6, new_session_id=f"{uid}-f")
    assert await session_keys_exist(raw, f"{uid}-f") == 2
    assert await index_score(raw, uid, f"{uid}-f") is not None


async def test_a_seq_the_window_trimmed_is_a_failed_precondition_and_one_after_it_renumbers(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    # Window of 4: the prompt (1-2) and the newest two; seqs 3-4 are trimmed.
    await conversation(client, f"{uid}-src", uid, max_messages=4)
    assert [m.seq for m in (await client.list_messages(f"{uid}-src")).messages] == [1, 2, 5, 6]
    for trimmed in (3, 4):
        error = await raises(
            FailedPreconditionError,
            client.fork_session(f"{uid}-src", at_seq=trimmed, new_session_id=f"{uid}-f"),
        )
        assert error.precondition_violations[0].type == "AT_SEQ_TRIMMED"
    assert await session_keys_exist(raw, f"{uid}-f") == 0
    fork = (await client.fork_session(f"{uid}-src", at_seq=5, new_session_id=f"{uid}-f")).session
    assert (fork.message_count, fork.token_count, fork.max_messages) == (3, 1 + 2 + 5, 4)
    assert await session_keys_exist(raw, f"{uid}-f") == 2
    copied = await stored_messages(raw, f"{uid}-f")
    assert [(m["seq"], m["content"]) for m in copied] == [
        (1, "You plan trips."),
        (2, "Be brief."),
        (3, "Hotel?"),
    ]


async def compact(raw: GlideClient, session_id: str, first: int, last: int, tokens: int) -> None:
    """What a compaction leaves (the context helper's stored form): the LIST without seqs
    first..last, and the summary in `summary:{id}` with seq = last and their range."""
    chat = f"chat:{{{session_id}}}"
    kept = [item for item in await raw.lrange(chat, 0, -1) if not first <= json.loads(item)["seq"] <= last]
    await raw.delete([chat])
    await raw.rpush(chat, kept)
    summary = {
        "seq": last,
        "role": "system",
        "content": f"Summary of {first}-{last}",
        "tokens": tokens,
        "created_at": 1710000000.5,
        "summarizes": [first, last],
    }
    await raw.set(f"summary:{{{session_id}}}", json.dumps(summary, separators=(",", ":")))
    await raw.expire(f"summary:{{{session_id}}}", TTL)


async def test_a_summary_is_copied_renumbered_after_the_prompt(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid)
    await compact(raw, f"{uid}-src", 3, 4, tokens=9)
    # Inside the compacted range: refused. Its end: the prompt and the summary.
    error = await raises(
        FailedPreconditionError, client.fork_session(f"{uid}-src", at_seq=3, new_session_id=f"{uid}-x")
    )
    assert error.precondition_violations[0].type == "AT_SEQ_TRIMMED"
    assert await session_keys_exist(raw, f"{uid}-x") == 0
    at_end = (await client.fork_session(f"{uid}-src", at_seq=4, new_session_id=f"{uid}-s")).session
    assert (at_end.message_count, at_end.token_count, at_end.messages_stored) == (3, 1 + 2 + 9, 2)
    assert await session_keys_exist(raw, f"{uid}-s") == 2
    summary = json.loads(await raw.get(f"summary:{{{uid}-s}}") or b"null")
    assert (summary["seq"], summary["summarizes"], summary["content"]) == (3, [3, 3], "Summary of 3-4")
    assert 0 < await raw.ttl(f"summary:{{{uid}-s}}") <= 3600
    # Past it: prompt, summary (seq 3), then the messages after the compaction, from seq 4.
    whole = (await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-w")).session
    assert (whole.message_count, whole.token_count) == (5, 1 + 2 + 9 + 5 + 6)
    copied = await stored_messages(raw, f"{uid}-w")
    assert [(m["seq"], m["content"]) for m in copied] == [
        (1, "You plan trips."),
        (2, "Be brief."),
        (4, "Hotel?"),
        (5, "The Grand."),
    ]
    assert json.loads(await raw.get(f"summary:{{{uid}-w}}") or b"null")["summarizes"] == [3, 3]
    # Within the prompt: no summary.
    setup = (await client.fork_session(f"{uid}-src", at_seq=0, new_session_id=f"{uid}-p")).session
    assert setup.message_count == 2
    assert await raw.exists([f"summary:{{{uid}-s}}"]) == 1  # the same read sees a copied summary
    assert await raw.exists([f"summary:{{{uid}-p}}"]) == 0


async def test_a_retry_with_the_same_request_id_returns_the_same_fork(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid)
    first = await client.fork_session(f"{uid}-src", at_seq=4, new_session_id=f"{uid}-f", request_id="r1")
    await client.append(f"{uid}-src", [user("more")])  # the source moves on meanwhile
    again = await client.fork_session(f"{uid}-src", at_seq=4, new_session_id=f"{uid}-f", request_id="r1")
    assert again.replayed
    assert again.session.created_at == first.session.created_at
    assert again.session.message_count == 4
    # Another request, or the same request_id asking for something else: the id is taken.
    await raises(AlreadyExistsError, client.fork_session(f"{uid}-src", at_seq=4, new_session_id=f"{uid}-f"))
    await raises(
        AlreadyExistsError,
        client.fork_session(f"{uid}-src", at_seq=5, new_session_id=f"{uid}-f", request_id="r1"),
    )
    # Even with the source gone, the retry finds the fork it made.
    await client.delete_session(f"{uid}-src")
    late = await client.fork_session(f"{uid}-src", at_seq=4, new_session_id=f"{uid}-f", request_id="r1")
    assert late.replayed
    assert late.session.session_id == f"{uid}-f"
    await raises(
        NotFoundError, client.fork_session(f"{uid}-src", at_seq=4, new_session_id=f"{uid}-g", request_id="r1")
    )
    assert await session_keys_exist(raw, f"{uid}-f") == 2  # the same read sees the fork
    assert await session_keys_exist(raw, f"{uid}-g") == 0


async def test_a_fork_onto_an_existing_session_is_already_exists_and_changes_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid)
    other = await client.create_session(uid, session_id=f"{uid}-taken", title="mine")
    await raises(AlreadyExistsError, client.fork_session(f"{uid}-src", new_session_id=f"{uid}-taken"))
    assert await meta(raw, f"{uid}-taken") == await meta(raw, other.session_id)
    assert (await client.get_session(f"{uid}-taken")).title == "mine"
    assert await raw.llen(f"chat:{{{uid}-taken}}") == 0


async def test_a_generated_id_is_derived_from_the_request_id(client: SessionClient, uid: str) -> None:
    await conversation(client, f"{uid}-src", uid)
    first = await client.fork_session(f"{uid}-src", request_id=f"{uid}-r")
    again = await client.fork_session(f"{uid}-src", request_id=f"{uid}-r")
    assert again.replayed
    assert again.session.session_id == first.session.session_id


async def test_bad_requests_name_the_field_and_write_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"session_id": "", "new_session_id": f"{uid}-f"}, {"session_id"}),
        ({"session_id": f"{uid}-src", "new_session_id": "bad id"}, {"new_session_id"}),
        ({"session_id": f"{uid}-src", "new_session_id": f"{uid}-src"}, {"new_session_id"}),
        ({"session_id": f"{uid}-src", "new_session_id": f"{uid}-f", "at_seq": -1}, {"at_seq"}),
        ({"session_id": f"{uid}-src", "new_session_id": f"{uid}-f", "request_id": "x" * 129}, {"request_id"}),
        (
            {"session_id": "a b", "new_session_id": "{x}", "at_seq": -5},
            {"session_id", "new_session_id", "at_seq"},
        ),
    ]
    for kwargs, fields in cases:
        session_id = kwargs.pop("session_id")
        error = await raises(InvalidArgumentError, client.fork_session(session_id, **kwargs))
        assert violated_fields(error) == fields, kwargs
    assert await session_keys_exist(raw, f"{uid}-f") == 0
    assert await index_score(raw, uid, f"{uid}-f") is None
    await raises(NotFoundError, client.fork_session(f"{uid}-nope", new_session_id=f"{uid}-f"))
    assert await session_keys_exist(raw, f"{uid}-f") == 0
    # The same reads see a fork that is accepted.
    await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")
    assert await session_keys_exist(raw, f"{uid}-f") == 2
    assert await index_score(raw, uid, f"{uid}-f") is not None


@pytest.mark.cluster_only
async def test_cluster_a_fork_cut_off_between_its_steps_leaves_no_session_and_the_retry_completes(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid)
    store = server.store
    original = store._scripts.call

    async def run(which: Any, keys_: Any, args: Any) -> Any:
        if which is session_scripts.FORK_WRITE:  # the read step happened; the node of the fork is lost
            raise StoreUnavailable("injected: the connection to the node was lost")
        return await original(which, keys_, args)

    monkeypatch.setattr(store._scripts, "call", run)
    await raises(
        UnavailableError, client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
    )
    assert await session_keys_exist(raw, f"{uid}-f") == 0
    assert [s.session_id async for s in client.iter_sessions(uid)] == [f"{uid}-src"]
    monkeypatch.undo()
    retried = await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
    assert not retried.replayed
    assert retried.session.message_count == 6
    assert await session_keys_exist(raw, f"{uid}-f") == 2
    assert [s.session_id async for s in client.iter_sessions(uid)] == [f"{uid}-f", f"{uid}-src"]
    # The write done but its reply lost: the retry returns that fork.
    lost = await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
    assert lost.replayed
    assert lost.session.created_at == retried.session.created_at


async def test_a_fork_counts_against_the_owners_session_limit(
    settings: Settings, valkey_url: str, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, max_sessions_per_user=1) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as limited,
    ):
        await limited.create_session(uid, session_id=f"{uid}-src")
        error = await raises(
            ResourceExhaustedError, limited.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")
        )
        assert "--max-sessions-per-user" in str(error)
    assert await session_keys_exist(raw, f"{uid}-f") == 0
    # The same read sees the fork a server without the limit makes.
    await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")
    assert await session_keys_exist(raw, f"{uid}-f") == 1  # the source has no messages: its meta


async def test_the_readme_grpcurl_recipe(target: str, client: SessionClient, uid: str) -> None:
    await conversation(client, f"{uid}-src", uid)
    body = {"session_id": f"{uid}-src", "at_seq": 4, "new_session_id": f"{uid}-f", "request_id": "fork-1"}
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps(body), target, "chatsession.v1.SessionService/ForkSession"
    )
    assert code == 0, out
    session = json.loads(out)["session"]
    assert (session["message_count"], session["labels"]["forked_from"]) == ("4", f"{uid}-src")


async def test_without_at_seq_a_fork_copies_what_is_stored_even_when_the_newest_is_gone(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await conversation(client, f"{uid}-src", uid)
    await raw.ltrim(f"chat:{{{uid}-src}}", 0, 1)  # as a clear that keeps the prompt leaves it
    await raises(
        FailedPreconditionError, client.fork_session(f"{uid}-src", at_seq=6, new_session_id=f"{uid}-x")
    )
    fork = (await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")).session
    assert (fork.message_count, fork.token_count, fork.messages_stored) == (2, 3, 2)


async def test_a_fork_of_a_really_compacted_session_reads_like_its_source(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    """CompactMessages, then ForkSession: the fork's context is the source's, renumbered, and its
    stored_bytes counts its LIST and its summary as a compaction does; it can be compacted again."""
    await conversation(client, f"{uid}-src", uid)
    summary = assistant("They settled on Oslo.", tokens=7)
    await client.compact_messages(f"{uid}-src", 4, summary)
    source = await client.get_context(f"{uid}-src")
    fork = (await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")).session
    forked = await client.get_context(f"{uid}-f")
    assert [m.content for m in forked.messages] == [m.content for m in source.messages]
    assert [m.seq for m in forked.messages] == [1, 2, 3, 4, 5]
    assert forked.messages[2].summarizes.first_seq == forked.messages[2].summarizes.last_seq == 3
    assert forked.tokens == source.tokens == fork.token_count
    listed = await client.list_messages(f"{uid}-f", page_size=10)
    assert [m.seq for m in listed.messages] == [1, 2, 3, 4, 5]
    stored = sum(len(item) for item in await raw.lrange(f"chat:{{{uid}-f}}", 0, -1))
    stored += len(await raw.get(f"summary:{{{uid}-f}}") or b"")
    assert int((await meta(raw, f"{uid}-f"))["stored_bytes"]) == stored
    again = await client.compact_messages(f"{uid}-f", 4, assistant("Oslo, the Grand.", tokens=3))
    assert (again.summary.summarizes.first_seq, again.summary.summarizes.last_seq) == (3, 4)
    assert [m.seq for m in (await client.get_context(f"{uid}-f")).messages] == [1, 2, 4, 5]


@pytest.mark.parametrize(
    ("limits", "quota"),
    [
        ({"max_fork_messages": 3}, ("max_fork_messages", 3)),
        ({"max_fork_bytes": 400}, ("max_fork_bytes", 400)),
    ],
)
async def test_a_source_past_the_fork_limits_is_resource_exhausted_and_writes_nothing(
    settings: Settings,
    valkey_url: str,
    raw: GlideClient,
    uid: str,
    limits: dict[str, int],
    quota: tuple[str, int],
) -> None:
    async with (
        serving(settings, valkey_url, **limits) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as limited,
    ):
        await limited.create_session(uid, session_id=f"{uid}-src")
        await limited.append(f"{uid}-src", [user("a"), user("b"), user("c")])  # 3 messages, < 400 bytes
        await limited.fork_session(f"{uid}-src", new_session_id=f"{uid}-ok")
        await limited.append(f"{uid}-src", [user("d" * 400)])
        error = await raises(
            ResourceExhaustedError,
            limited.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1"),
        )
        assert [(v.quota_id, v.quota_value) for v in error.quota_violations] == [quota]
        assert "--" + quota[0].replace("_", "-") in str(error)
    assert await session_keys_exist(raw, f"{uid}-ok") == 2  # the same read sees the fork made
    assert await session_keys_exist(raw, f"{uid}-f") == 0
    assert (await meta(raw, f"{uid}-src"))["message_count"] == "4"


async def test_a_fork_of_a_fork_at_the_label_limit_replaces_forked_from(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    labels = {f"k{i}": "v" for i in range(63)}
    await client.create_session(uid, session_id=f"{uid}-src", labels=labels)
    first = (await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")).session
    assert len(first.labels) == 64
    second = (await client.fork_session(f"{uid}-f", new_session_id=f"{uid}-g")).session
    assert (len(second.labels), second.labels["forked_from"]) == (64, f"{uid}-f")
    # A source with 64 labels and no forked_from: its fork would have 65.
    await client.create_session(uid, session_id=f"{uid}-full", labels={**labels, "k63": "v"})
    error = await raises(
        FailedPreconditionError, client.fork_session(f"{uid}-full", new_session_id=f"{uid}-h")
    )
    assert [(v.type, v.subject) for v in error.precondition_violations] == [("LABELS_FULL", "session_id")]
    assert await session_keys_exist(raw, f"{uid}-g") == 1  # the same read sees a fork (its meta)
    assert await session_keys_exist(raw, f"{uid}-h") == 0


# --- a fork's labels, summary, request_id and size, as the rest of the service meets them -------


async def compacted_source(client: SessionClient, raw: GlideClient, session_id: str, uid: str) -> None:
    """A session as a compaction of seqs 2-3 leaves it (the stored form `compact` above writes):
    the prompt (seq 1), the summary (seq 3) in `summary:{id}`, then seq 4."""
    await client.create_session(uid, session_id=session_id, ttl_seconds=TTL)
    await client.append(session_id, [system("Be brief.", tokens=1)])
    await client.append(session_id, [user("a", tokens=2), user("b", tokens=3), user("c", tokens=4)])
    chat = f"chat:{{{session_id}}}"
    kept = [item for item in await raw.lrange(chat, 0, -1) if json.loads(item)["seq"] not in (2, 3)]
    await raw.delete([chat])
    await raw.rpush(chat, kept)
    await raw.expire(chat, TTL)
    summary = {"seq": 3, "role": "system", "content": "a and b", "tokens": 5, "summarizes": [2, 3]}
    await raw.set(f"summary:{{{session_id}}}", json.dumps(summary, separators=(",", ":")))
    await raw.expire(f"summary:{{{session_id}}}", TTL)


async def test_with_a_session_limit_a_retry_still_returns_the_fork_after_the_source_is_gone(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, max_sessions_per_user=10) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as limited,
    ):
        await limited.create_session(uid, session_id=f"{uid}-src")
        await limited.append(f"{uid}-src", [user("hi")])
        first = await limited.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
        await limited.delete_session(f"{uid}-src")
        late = await limited.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
        assert late.replayed
        assert late.session.created_at == first.session.created_at


async def test_a_forks_summary_lives_as_long_as_the_fork(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await compacted_source(client, raw, f"{uid}-src", uid)
    fork = (await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")).session
    assert fork.message_count == 3  # prompt, summary, "c"
    summary_key = f"summary:{{{uid}-f}}"
    # As if 1134 s passed: every key of the fork has 100 s left; an append restarts the clock.
    for key in (f"chat:{{{uid}-f}}", f"meta:{{{uid}-f}}", summary_key):
        await raw.expire(key, 100)
    await client.append(f"{uid}-f", [user("d")])
    assert await raw.ttl(f"meta:{{{uid}-f}}") > 1000
    assert await raw.ttl(summary_key) > 1000
    # A longer TTL asked by an update applies to the summary too.
    await client.update_session(f"{uid}-f", ttl_seconds=5000)
    assert await raw.ttl(summary_key) > 4000


async def test_deleting_a_fork_removes_its_summary(client: SessionClient, raw: GlideClient, uid: str) -> None:
    await compacted_source(client, raw, f"{uid}-src", uid)
    await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")
    assert await raw.exists([f"summary:{{{uid}-f}}"]) == 1
    await client.delete_session(f"{uid}-f")
    # A namesake created afterwards by another user, then forked: its fork must not carry the old
    # summary (another user's conversation, in its stored form).
    await client.create_session(f"{uid}-other", session_id=f"{uid}-f")
    await client.append(f"{uid}-f", [user("fresh", tokens=1)])
    again = (await client.fork_session(f"{uid}-f", new_session_id=f"{uid}-g")).session
    assert (again.message_count, again.token_count) == (1, 1)
    assert await raw.exists([f"summary:{{{uid}-f}}", f"summary:{{{uid}-g}}"]) == 0


async def test_a_create_with_a_forks_request_id_is_not_a_replay_of_the_fork(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await client.create_session(uid, session_id=f"{uid}-src", title="source")
    await client.append(f"{uid}-src", [user("hi")])
    await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
    await raises(
        AlreadyExistsError, client.create_session(uid, session_id=f"{uid}-f", title="new", request_id="r1")
    )


MESSAGES_AT_THE_CAP = 780_000
"""Small messages (~84 bytes stored) filling the default --max-session-bytes (64 MiB) of a session
without a window: what 780 appends of 1000 leave."""


async def test_a_session_at_the_size_cap_is_refused_a_fork_before_valkey_copies_it(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, valkey_timeout_ms=500) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY, timeout=60) as client,
    ):
        await client.create_session(uid, session_id=f"{uid}-src", max_messages=-1)
        # Seeded raw, in the stored form the append script writes (780 appends take a minute).
        chat = f"chat:{{{uid}-src}}"
        stored = 0
        for first in range(1, MESSAGES_AT_THE_CAP + 1, 10_000):
            items = [
                f'{{"seq":{seq},"role":"user","content":"y","tokens":1,"created_at":1764000000.5}}'
                for seq in range(first, first + 10_000)
            ]
            stored += sum(len(item) for item in items)
            await raw.rpush(chat, items)
        await raw.hset(
            f"meta:{{{uid}-src}}",
            {
                "message_count": str(MESSAGES_AT_THE_CAP),
                "token_count": str(MESSAGES_AT_THE_CAP),
                "stored_bytes": str(stored),
            },
        )
        assert stored <= settings.max_session_bytes
        try:
            # Refused before the source is read: a script copying it would hold Valkey (the
            # 500 ms timeout above) for everyone.
            error = await raises(
                ResourceExhaustedError,
                client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1"),
            )
            assert [(v.quota_id, v.quota_value) for v in error.quota_violations] == [
                ("max_fork_bytes", settings.max_fork_bytes)
            ]
            assert await session_keys_exist(raw, f"{uid}-src") == 2  # the same read sees the source
            assert await session_keys_exist(raw, f"{uid}-f") == 0
            assert (await client.get_session(f"{uid}-src")).message_count == MESSAGES_AT_THE_CAP
        finally:
            await raw.delete([chat, f"chat:{{{uid}-f}}"])
