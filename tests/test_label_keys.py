"""Label keys: 1-128 characters from [A-Za-z0-9._/-], and never one the service sets itself
(`forked_from`), on CreateSession and UpdateSession (a whole-map replacement, or a `labels.<key>`
path setting or removing one). A refused request names the label and writes nothing; a label
stored before the rule stays readable and removable."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from glide import GlideClient
from google.protobuf.field_mask_pb2 import FieldMask

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_client import InvalidArgumentError, SessionClient
from chatsession_client.errors import from_rpc_error
from chatsession_server.domain import FORKED_FROM_LABEL, RESERVED_LABELS
from tests.helpers import meta, raises, session_keys_exist, violated_fields

HOSTILE_KEYS = {
    "newline": "team\nforged",
    "brace": "{x}",
    "star": "*",
    "space": "a b",
    "colon": "team:x",
    "empty": "",
    "too long": "k" * 129,
    "unicode": "équipe",
    "control": "a\x1bb",
    "reserved": FORKED_FROM_LABEL,
}
# What Kubernetes and cloud-label users write, and the longest a key may be.
ACCEPTED_KEYS = ("team", "app.kubernetes.io/name", "Tier_2-b.x/y", "k" * 128)


async def update(client: SessionClient, session_id: str, labels: dict[str, str], paths: list[str]) -> None:
    request = session_service_pb2.UpdateSessionRequest(
        session=session_pb2.Session(session_id=session_id, labels=labels), update_mask=FieldMask(paths=paths)
    )
    try:
        await client._stub.UpdateSession(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


def test_the_reserved_labels_are_the_ones_the_service_writes() -> None:
    assert {"forked_from"} == RESERVED_LABELS


async def test_accepted_keys_are_stored(client: SessionClient, raw: GlideClient, uid: str) -> None:
    labels = {key: "v" for key in ACCEPTED_KEYS}
    s = await client.create_session(uid, session_id=f"{uid}-ok", labels=labels)
    assert dict(s.labels) == labels
    stored = await meta(raw, s.session_id)
    assert {key for key in stored if key.startswith("label:")} == {f"label:{key}" for key in ACCEPTED_KEYS}


@pytest.mark.parametrize("key", HOSTILE_KEYS.values(), ids=HOSTILE_KEYS.keys())
async def test_create_refuses_a_hostile_key_and_writes_nothing(
    client: SessionClient, raw: GlideClient, uid: str, key: str
) -> None:
    # The same reads see an accepted create.
    await client.create_session(uid, session_id=f"{uid}-ok", labels={"team": "a"})
    assert (await meta(raw, f"{uid}-ok"))["label:team"] == "a"
    assert await raw.zcard(f"user_sessions:{{{uid}}}") == 1

    err = await raises(
        InvalidArgumentError,
        client.create_session(uid, session_id=f"{uid}-bad", labels={"team": "a", key: "v"}),
    )
    assert violated_fields(err) == {f"labels[{key!r}]"}
    expected = "the service sets" if key in RESERVED_LABELS else "[A-Za-z0-9._/-]"
    assert expected in err.field_violations[0].description
    assert await session_keys_exist(raw, f"{uid}-bad") == 0
    assert await raw.zcard(f"user_sessions:{{{uid}}}") == 1


@pytest.mark.parametrize("key", HOSTILE_KEYS.values(), ids=HOSTILE_KEYS.keys())
async def test_update_refuses_a_hostile_key_and_writes_nothing(
    client: SessionClient, raw: GlideClient, uid: str, key: str
) -> None:
    s = await client.create_session(uid, labels={"keep": "1"})
    await update(client, s.session_id, {"added": "2"}, ["labels.added"])  # the same read sees it
    before = await meta(raw, s.session_id)
    assert before["label:added"] == "2"

    # A whole-map replacement holding it.
    err = await raises(
        InvalidArgumentError, client.update_session(s.session_id, labels={"ok": "1", key: "v"})
    )
    assert violated_fields(err) == {f"session.labels[{key!r}]"}
    # A `labels.<key>` path setting it (an empty or too long key is a bad path).
    err = await raises(
        InvalidArgumentError, update(client, s.session_id, {key: "v"}, [f"labels.{key}", "title"])
    )
    bad_path = key == "" or len(key) > 128
    assert violated_fields(err) == ({"update_mask"} if bad_path else {f"session.labels[{key!r}]"})
    assert await meta(raw, s.session_id) == before


async def test_a_reserved_label_cannot_be_removed_or_replaced_on_a_fork(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    source = await client.create_session(uid, labels={"team": "a"})
    fork = (await client.fork_session(source.session_id)).session
    assert dict(fork.labels) == {"team": "a", FORKED_FROM_LABEL: source.session_id}
    before = await meta(raw, fork.session_id)
    assert before[f"label:{FORKED_FROM_LABEL}"] == source.session_id

    err = await raises(
        InvalidArgumentError, update(client, fork.session_id, {}, [f"labels.{FORKED_FROM_LABEL}"])
    )
    assert violated_fields(err) == {f"session.labels[{FORKED_FROM_LABEL!r}]"}
    err = await raises(
        InvalidArgumentError,
        update(client, fork.session_id, {FORKED_FROM_LABEL: "other"}, [f"labels.{FORKED_FROM_LABEL}"]),
    )
    assert violated_fields(err) == {f"session.labels[{FORKED_FROM_LABEL!r}]"}
    # Reading the labels and sending them back whole names it too.
    err = await raises(InvalidArgumentError, client.update_session(fork.session_id, labels=dict(fork.labels)))
    assert violated_fields(err) == {f"session.labels[{FORKED_FROM_LABEL!r}]"}
    assert await meta(raw, fork.session_id) == before


async def test_a_label_stored_before_the_rule_stays_readable_and_removable(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, labels={"team": "a"})
    await raw.hset(f"meta:{{{s.session_id}}}", {"label:old key": "kept", "label:équipe": "x"})
    assert dict((await client.get_session(s.session_id)).labels) == {
        "team": "a",
        "old key": "kept",
        "équipe": "x",
    }
    read = await client.get_session(s.session_id, read_mask=["labels.old key"])
    assert dict(read.labels) == {"old key": "kept"}
    # Updating other fields keeps it; a `labels.<key>` path without a value removes it.
    await client.update_session(s.session_id, title="t")
    await update(client, s.session_id, {}, ["labels.old key"])
    assert dict((await client.get_session(s.session_id)).labels) == {"team": "a", "équipe": "x"}
    assert "label:old key" not in await meta(raw, s.session_id)


async def test_a_whole_map_labels_update_does_not_remove_a_forks_reserved_label(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    source = await client.create_session(uid, labels={"team": "a"})
    fork = (await client.fork_session(source.session_id)).session
    assert dict(fork.labels)[FORKED_FROM_LABEL] == source.session_id
    with contextlib.suppress(InvalidArgumentError):  # refusing the removal would keep the rule too
        await client.update_session(fork.session_id, labels={"team": "b"})
    stored = await meta(raw, fork.session_id)
    assert stored.get(f"label:{FORKED_FROM_LABEL}") == source.session_id
