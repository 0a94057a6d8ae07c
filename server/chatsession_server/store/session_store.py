"""SessionStore: every RPC's storage step, one Valkey round trip each where the data allows.

A session's keys live in its own cluster slot, its owner's index and usage in the owner's: what
a write does there, in the same step or a second one, is owner_index.py's. The listing of a
user's sessions is listing.py's.

ForkSession is two steps in every mode: FORK_READ reads the source (owner check, at_seq check,
the prompt, summary and messages to copy) and writes nothing; FORK_WRITE writes the whole fork in
one script in the new session's slot, recording the request_id and "<source> <at_seq>" in its
meta. A crash between them leaves nothing; a crash after leaves a complete fork, which the retry
(same request_id) finds and returns (replayed) instead of ALREADY_EXISTS. If the source is gone or
trimmed by the time of the retry, a probe of the fork's slot still returns the fork. In a cluster
the fork also enters the index first and syncs usage after, exactly as a create.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from chatsession_server.domain import (
    AppendResult,
    Compaction,
    CompactResult,
    Context,
    ContextQuery,
    Listed,
    MessagePage,
    MessageQuery,
    NewFork,
    NewMessage,
    NewSession,
    Owned,
    Session,
    SessionCursor,
    SessionPage,
    SessionPatch,
    StateDelta,
    StateScope,
    TruncateResult,
    Truncation,
    UserUsage,
    owns,
    scope_owner,
    scope_rule,
)
from chatsession_server.errors import FieldViolation, InvalidArgument, SessionAlreadyExists, SessionNotFound
from chatsession_server.store import codec, keys, refusals
from chatsession_server.store.listing import PAGE_BYTES, SessionListing
from chatsession_server.store.lua import session_scripts, state_scripts
from chatsession_server.store.lua.runtime import LuaScript, ScriptRunner, Status, owners_arg
from chatsession_server.store.owner_index import INDEX_PRUNE_GRACE_SECONDS, owner_index_for
from chatsession_server.store.valkey import ValkeyConnection

# Appends up to this size (their stored JSON) travel to watchers inside the publish, which Valkey
# sends once to each process that has a watcher of the session: so every append within
# --max-append-bytes does, bar one whose content JSON escaping blows up several times. A larger
# one is only announced, and each process reads it from the LIST once for its watchers (see
# SessionFeed.read_shared). The bound keeps a publish well under Valkey's default output buffer
# limit for pub/sub clients (32 MB), past which it would drop the feed's connection.
INLINE_PUBLISH_BYTES = 8 * 1024 * 1024
# TruncateMessages returns at most this many removed messages (and PAGE_BYTES of them): a reply's
# bounds, as a ListMessages page's.
MAX_REMOVED_MESSAGES = 1000


class SessionStore:
    def __init__(
        self,
        conn: ValkeyConnection,
        *,
        idempotency_limit: int = 1000,
        max_labels: int = 64,
        max_session_bytes: int = 0,
        max_fork_bytes: int = 0,
        max_fork_messages: int = 0,
        max_state_keys: int = 1000,
        max_state_bytes: int = 512 * 1024,
        clock: Callable[[], float] = time.time,
        prune_grace_seconds: float = INDEX_PRUNE_GRACE_SECONDS,
        max_ttl_seconds: int = 30 * 86_400,
        key_space: keys.KeySpace = keys.DEFAULT_KEY_SPACE,
    ) -> None:
        self._conn = conn
        self._keys = key_space
        self._idempotency_limit = idempotency_limit
        self._max_labels = max_labels
        self._max_session_bytes = max_session_bytes
        self._max_fork_bytes = max_fork_bytes
        self._max_fork_messages = max_fork_messages
        self._max_state_keys = max_state_keys
        self._max_state_bytes = max_state_bytes
        self._clock = clock
        self._publish = "SPUBLISH" if conn.cluster else "PUBLISH"
        self._scripts = ScriptRunner(conn)
        self._owner_index = owner_index_for(
            conn,
            self._scripts,
            key_space,
            clock=clock,
            prune_grace_seconds=prune_grace_seconds,
            max_ttl_seconds=max_ttl_seconds,
        )
        self._listing = SessionListing(conn, key_space, self._owner_index)

    def _session_keys(self, session_id: str) -> list[str]:
        return [
            self._keys.chat(session_id),
            self._keys.meta(session_id),
            self._keys.requests(session_id),
            self._keys.summary(session_id),
        ]

    def _session_keys_and_state(self, session_id: str) -> list[str]:
        """The session's keys, its state's last: for the scripts that write or expire it too."""
        return [*self._session_keys(session_id), self._keys.state(session_id)]

    async def create(self, new: NewSession) -> tuple[Session, bool]:
        """Create a session; returns it and whether this was a replay of an earlier create."""
        now = codec.format_time(self._clock())
        fields = codec.new_session_fields(
            user_id=new.user_id,
            model=new.model,
            title=new.title,
            labels=new.labels,
            created_at=now,
            ttl_seconds=new.ttl_seconds,
            max_messages=new.max_messages,
            request_id=new.request_id,
            app=new.app,
        )
        args = session_scripts.CreateArgs(
            now=now,
            ttl=new.ttl_seconds,
            request_id=new.request_id,
            user_id=new.user_id,
            session_id=new.session_id,
            model=new.model,
            usage_key_head=self._owner_index.usage_head,
            usage_days=codec.usage_days(float(now)),
            app=new.app,
            app_index_head=self._owner_index.app_index_head,
            fields=fields,
        )
        return await self._write_new(
            session_scripts.CREATE, args, new.session_id, new.user_id, now, "creating", app=new.app
        )

    async def _write_new(
        self,
        script: LuaScript[Any],
        args: Any,
        session_id: str,
        user_id: str,
        now: str,
        doing: str,
        *,
        app: str,
    ) -> tuple[Session, bool]:
        """A create's or a fork's write (CREATE, FORK_WRITE) with the owner's index and usage (and
        the app's indexes) kept around it; returns the session and whether this was a replay."""
        status, reply = await self._owner_index.write_new(
            script,
            self._session_keys_and_state(session_id),
            args,
            user_id=user_id,
            session_id=session_id,
            now=now,
            doing=doing,
            app=app,
        )
        if status is Status.EXISTS:
            raise SessionAlreadyExists(session_id)
        session = codec.decode_described(session_id, reply[1])
        await self._conn.replicated(self._keys.meta(session_id))
        await self._owner_index.count_created(session, reply[1])
        return session, status is Status.REPLAYED

    async def get(
        self,
        session_id: str,
        *,
        owners: Owned = None,
        fields: Collection[str] | None = None,
    ) -> Session:
        """The session; not found when it belongs to none of `owners` (None: anyone's). With
        `fields` (Session field names, `labels.<key>`), only those are read: see `_get_fields`."""
        if fields is not None:
            return await self._get_fields(session_id, fields, owners)
        batch = self._conn.batch(atomic=True)
        batch.hgetall(self._keys.meta(session_id)).llen(self._keys.chat(session_id)).ttl(
            self._keys.meta(session_id)
        )
        meta, stored, ttl = await self._conn.run(batch)
        if not meta:
            raise SessionNotFound(session_id)
        session = codec.decode_session(session_id, meta, int(stored), int(ttl))
        if not owns(owners, session.user_id, session.app):
            raise SessionNotFound(session_id)
        return session

    async def _get_fields(self, session_id: str, fields: Collection[str], owners: Owned) -> Session:
        """One HMGET of the named meta fields (and of the owner, to check it); LLEN and TTL only
        when `messages_stored` or `expires_in_seconds` are named. `labels` (the whole map, whose
        keys are not known beforehand) reads the hash with HGETALL instead. Fields not named
        keep their zero values."""
        meta_key = self._keys.meta(session_id)
        wanted = [codec.MetaField.USER_ID.value, codec.MetaField.APP.value]
        wanted += [_META_OF_FIELD[f] for f in fields if f in _META_OF_FIELD and f != "app"]
        wanted += [codec.LABEL_FIELD_PREFIX + f[len("labels.") :] for f in fields if f.startswith("labels.")]
        whole = "labels" in fields
        batch = self._conn.batch(atomic=True)
        if whole:
            batch.hgetall(meta_key)
        else:
            batch.hmget(meta_key, wanted)
        if "messages_stored" in fields:
            batch.llen(self._keys.chat(session_id))
        if "expires_in_seconds" in fields:
            batch.ttl(meta_key)
        replies = await self._conn.run(batch)
        if whole:
            meta: dict[bytes, bytes] = replies[0]
        else:
            meta = {name.encode(): value for name, value in zip(wanted, replies[0], strict=True) if value}
        owner = meta.get(codec.MetaField.USER_ID.encode())
        app = meta.get(codec.MetaField.APP.encode(), b"")
        if owner is None or not owns(owners, owner.decode(), app.decode()):
            raise SessionNotFound(session_id)
        rest = iter(replies[1:])
        stored = int(next(rest)) if "messages_stored" in fields else 0
        ttl = int(next(rest)) if "expires_in_seconds" in fields else 0
        return codec.decode_session(session_id, meta, stored, ttl)

    async def update(self, session_id: str, patch: SessionPatch, *, owners: Owned = None) -> Session:
        to_set: dict[str, str] = {}
        if patch.title is not None:
            to_set["title"] = patch.title
        if patch.model is not None:
            to_set["model"] = patch.model
        labels_to_set = patch.replace_labels if patch.replace_labels is not None else patch.set_labels
        for key, value in labels_to_set.items():
            to_set[codec.LABEL_FIELD_PREFIX + key] = value
        to_delete = [codec.LABEL_FIELD_PREFIX + key for key in sorted(patch.remove_labels)]
        args = session_scripts.UpdateArgs(
            owners=owners_arg(owners),
            ttl=patch.ttl_seconds,
            max_messages=patch.max_messages,
            clear_labels=patch.replace_labels is not None,
            max_labels=self._max_labels,
            set_count=len(to_set),
            changes=[*codec.flatten(to_set.items()), *to_delete],
        )
        status, reply = await self._scripts.call(
            session_scripts.UPDATE, self._session_keys_and_state(session_id), args
        )
        if status is not Status.OK:
            raise refusals.update_refused(status, reply, session_id, self._max_labels)
        await self._conn.replicated(self._keys.meta(session_id))
        return codec.decode_described(session_id, reply[1])

    async def delete(self, session_id: str, *, owners: Owned = None) -> bool:
        """Delete a session; False when there was none (of `owners`)."""
        args = session_scripts.DeleteArgs(
            owners=owners_arg(owners),
            index_key_head=self._owner_index.index_head,
            app_index_head=self._owner_index.app_index_head,
            session_id=session_id,
            publish_command=self._publish,
            channel=self._keys.watch_channel(session_id),
        )
        status, reply = await self._scripts.call(
            session_scripts.DELETE, self._session_keys_and_state(session_id), args
        )
        if status is Status.NOT_FOUND:
            return False
        await self._conn.replicated(self._keys.meta(session_id))
        await self._owner_index.deleted(session_id, reply)
        return True

    async def append(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        request_id: str = "",
        expected_last_seq: int | None = None,
        owners: Owned = None,
        state_delta: StateDelta | None = None,
    ) -> AppendResult:
        now = self._clock()
        bodies = [codec.encode_body(m, now) for m in messages]
        own_times = [m.created_at for m in messages if m.created_at is not None]
        active_at = max(own_times) if len(own_times) == len(messages) else max([now, *own_times])
        delta = codec.encode_state_delta(state_delta.to_set, state_delta.to_remove) if state_delta else ""
        args = session_scripts.AppendArgs(
            owners=owners_arg(owners),
            now=codec.format_time(active_at),
            caller_time=bool(own_times),
            request_id=request_id,
            fingerprint=codec.state_fingerprint(codec.fingerprint(messages), delta) if request_id else "",
            expected_last_seq=expected_last_seq,
            token_sum=sum(m.tokens for m in messages),
            index_key_head=self._owner_index.index_head,
            app_index_head=self._owner_index.app_index_head,
            session_id=session_id,
            idempotency_limit=self._idempotency_limit,
            publish_command=self._publish,
            channel=self._keys.watch_channel(session_id),
            inline_publish_bytes=INLINE_PUBLISH_BYTES,
            max_session_bytes=self._max_session_bytes,
            usage_key_head=self._owner_index.usage_head,
            usage_days=codec.usage_days(now),
            with_payload=any(m.payload is not None for m in messages),
            state_delta=delta,
            max_state_keys=self._max_state_keys,
            max_state_bytes=self._max_state_bytes,
            bodies=bodies,
        )
        status, reply = await self._scripts.call(
            session_scripts.APPEND, self._session_keys_and_state(session_id), args
        )
        if status is Status.OK:
            first_seq = int(reply[1])
            # The script stored exactly stored_json(seq, body): the reply is built from the
            # request, with no read-back and no JSON round trip.
            stored = tuple(codec.stored_message(m, first_seq + i, now) for i, m in enumerate(messages))
            described = reply[2]
            result = AppendResult(stored, codec.decode_described(session_id, described), replayed=False)
        elif status is Status.REPLAYED:
            stored = codec.decode_messages(reply[2])
            described = reply[3]
            result = AppendResult(stored, codec.decode_described(session_id, described), replayed=True)
        elif status is Status.STATE_FULL:
            raise refusals.state_full(
                reply, field="state_delta", max_keys=self._max_state_keys, max_bytes=self._max_state_bytes
            )
        else:
            raise refusals.append_refused(
                status,
                reply,
                session_id=session_id,
                request_id=request_id,
                expected_last_seq=expected_last_seq,
                max_session_bytes=self._max_session_bytes,
            )
        await self._conn.replicated(self._keys.meta(session_id))
        await self._owner_index.appended(result, described, len(messages), args.token_sum, now)
        return result

    async def list_messages(
        self, session_id: str, query: MessageQuery, *, owners: Owned = None
    ) -> MessagePage:
        status, reply = await self._scripts.call(
            session_scripts.LIST_MESSAGES,
            [self._keys.chat(session_id), self._keys.meta(session_id), self._keys.summary(session_id)],
            session_scripts.ListMessagesArgs(
                owners_arg(owners),
                query.limit,
                query.after_seq,
                query.before_seq,
                PAGE_BYTES if query.max_bytes is None else min(query.max_bytes, PAGE_BYTES),
            ),
        )
        if status is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        (
            _,
            items,
            has_more,
            last_seq,
            window_start,
            trimmed,
            rewrites,
            cleared_at_seq,
            truncated,
            compacted,
        ) = reply
        removed = truncated.split() if truncated else []
        summarized = compacted.split() if compacted else []
        return MessagePage(
            messages=codec.decode_messages(items),
            has_more=bool(has_more),
            last_seq=int(last_seq),
            window_start_seq=int(window_start),
            history_trimmed=bool(trimmed),
            rewrites=int(rewrites),
            cleared_at_seq=int(cleared_at_seq),
            truncated=(int(removed[0]), int(removed[1])) if removed else None,
            truncation_rewrite=int(removed[2]) if len(removed) > 2 else 0,
            compacted=(int(summarized[0]), int(summarized[1])) if summarized else None,
            compaction_rewrite=int(summarized[2]) if summarized else 0,
        )

    async def fork(self, fork: NewFork, *, owners: Owned = None) -> tuple[Session, bool]:
        """Copy `fork.source_id` up to `fork.at_seq` into the new session `fork.session_id` (see
        the module docstring for the two steps); returns it and whether this was a replay."""
        source = fork.source_id
        origin = f"{source} {'' if fork.at_seq is None else fork.at_seq}"
        status, reply = await self._scripts.call(
            session_scripts.FORK_READ,
            [
                self._keys.chat(source),
                self._keys.meta(source),
                self._keys.summary(source),
                self._keys.state(source),
            ],
            session_scripts.ForkReadArgs(
                owners_arg(owners), fork.at_seq, self._max_fork_bytes, self._max_fork_messages
            ),
        )
        if status is not Status.OK:
            # A retry whose source has changed or gone since: the fork its first attempt made.
            found = await self._find_fork(fork, origin, owners) if fork.request_id else None
            if found is None:
                raise refusals.fork_read_refused(
                    status,
                    reply,
                    fork,
                    max_fork_bytes=self._max_fork_bytes,
                    max_fork_messages=self._max_fork_messages,
                )
            return found, True
        _, meta_flat, prompt, recent, summary, state_flat = reply
        items, summary_json, message_count, token_count = codec.fork_contents(prompt, summary, recent)
        now = codec.format_time(self._clock())
        fields = codec.fork_fields(
            codec.pairs_to_map(meta_flat),
            source_id=source,
            origin=origin,
            created_at=now,
            request_id=fork.request_id,
            message_count=message_count,
            token_count=token_count,
            pinned=len(prompt),
            stored_bytes=sum(len(item.encode()) for item in items) + len(summary_json.encode()),
        )
        labels = sum(1 for name in fields if name.startswith(codec.LABEL_FIELD_PREFIX))
        if labels > self._max_labels:
            raise refusals.fork_labels_full(source, labels, self._max_labels)
        user_id, app = fields[codec.MetaField.USER_ID], fields.get(codec.MetaField.APP, "")
        if scope_owner(fork.session_id) not in (None, user_id):  # 'bob/x' is only ever bob's
            raise InvalidArgument([FieldViolation("new_session_id", scope_rule(user_id))])
        args = self._fork_write_args(fork, origin, owners, user_id=user_id, now=now, probe=False)
        args = dataclasses.replace(
            args,
            ttl=int(fields[codec.MetaField.TTL_SECONDS]),
            model=fields.get(codec.MetaField.MODEL, ""),
            app=app,
            app_index_head=self._owner_index.app_index_head,
            summary_json=summary_json,
            state_copy=codec.encode_state_delta(codec.decode_state(state_flat), ()),
            field_count=len(fields),
            payload=[*codec.flatten(fields.items()), *items],
        )
        return await self._write_new(
            session_scripts.FORK_WRITE, args, fork.session_id, user_id, now, "forking", app=app
        )

    def _fork_write_args(
        self,
        fork: NewFork,
        origin: str,
        owners: Owned,
        *,
        user_id: str,
        now: str,
        probe: bool,
    ) -> session_scripts.ForkWriteArgs:
        """FORK_WRITE's arguments for a probe; a write replaces what it copies."""
        return session_scripts.ForkWriteArgs(
            owners=owners_arg(owners),
            now=now,
            ttl=0,
            request_id=fork.request_id,
            user_id=user_id,
            session_id=fork.session_id,
            origin=origin,
            probe=probe,
            usage_key_head=self._owner_index.usage_head,
            model="",
            usage_days=codec.usage_days(float(now)) if now else "",  # "": a probe counts nothing
            app="",
            app_index_head=self._owner_index.app_index_head,
            summary_json="",
            state_copy="",
            field_count=0,
            payload=[],
        )

    async def _find_fork(self, fork: NewFork, origin: str, owners: Owned) -> Session | None:
        """The fork a first attempt with this request_id made, or None; writes nothing (its index
        entry was entered by that attempt, before its write)."""
        args = self._fork_write_args(fork, origin, owners, user_id="", now="", probe=True)
        status, reply = await self._scripts.call(
            session_scripts.FORK_WRITE, self._session_keys(fork.session_id), args
        )
        if status is not Status.REPLAYED:
            return None
        session = codec.decode_described(fork.session_id, reply[1])
        await self._owner_index.count_created(session, reply[1])  # that attempt's may be what failed
        return session

    async def user_usage(self, user_id: str) -> UserUsage:
        """The user's usage; per-day figures for the last codec.USAGE_DAYS UTC days."""
        batch = self._conn.batch(atomic=False)
        batch.hgetall(self._keys.usage(user_id))
        (fields,) = await self._conn.run(batch)
        oldest = codec.usage_days(self._clock()).split()[1]
        return codec.decode_usage(fields, oldest)

    async def get_context(self, session_id: str, query: ContextQuery, *, owners: Owned = None) -> Context:
        """Pinned prompt, summary and the newest messages that fit the budget, in one script."""
        args = session_scripts.ContextArgs(
            owners_arg(owners), query.max_tokens, query.max_messages, PAGE_BYTES
        )
        keys_ = [self._keys.chat(session_id), self._keys.meta(session_id), self._keys.summary(session_id)]
        status, reply = await self._scripts.call(session_scripts.GET_CONTEXT, keys_, args)
        if status is not Status.OK:
            raise refusals.context_refused(
                status, reply, session_id=session_id, max_tokens=query.max_tokens, page_bytes=PAGE_BYTES
            )
        _, items, tokens, truncated = reply
        return Context(tuple(codec.decode_message(raw) for raw in items), int(tokens), bool(truncated))

    async def compact(
        self, session_id: str, compaction: Compaction, *, owners: Owned = None
    ) -> CompactResult:
        now = self._clock()
        summary = compaction.summary
        args = session_scripts.CompactArgs(
            owners=owners_arg(owners),
            request_id=compaction.request_id,
            # "c": never equal to an append's fingerprint, so a request_id of either kind
            # reused for the other is refused.
            fingerprint="c" + codec.fingerprint([summary]) + f":{compaction.up_to_seq}"
            if compaction.request_id
            else "",
            up_to_seq=compaction.up_to_seq,
            idempotency_limit=self._idempotency_limit,
            publish_command=self._publish,
            channel=self._keys.watch_channel(session_id),
            max_session_bytes=self._max_session_bytes,
            with_payload=summary.payload is not None,
            summary_body=codec.encode_body(summary, now),
        )
        status, reply = await self._scripts.call(
            session_scripts.COMPACT, self._session_keys(session_id), args
        )
        if status is not Status.OK and status is not Status.REPLAYED:
            raise refusals.compaction_refused(
                status,
                reply,
                session_id=session_id,
                compaction=compaction,
                max_session_bytes=self._max_session_bytes,
            )
        await self._conn.replicated(self._keys.meta(session_id))
        stored = codec.decode_message(reply[1]) if reply[1] else None
        session = codec.decode_described(session_id, reply[2])
        if stored is None:  # a replay after a clear: the summary is gone
            raise refusals.summary_cleared(compaction.request_id)
        return CompactResult(stored, session, replayed=status is Status.REPLAYED)

    async def clear(
        self,
        session_id: str,
        *,
        keep_system_prompt: bool,
        request_id: str = "",
        owners: Owned = None,
    ) -> Session:
        args = session_scripts.ClearArgs(
            owners_arg(owners),
            keep_system_prompt,
            request_id,
            # "x": never equal to an append's or a compaction's fingerprint (see compact).
            f"x{int(keep_system_prompt)}" if request_id else "",
            self._idempotency_limit,
            self._publish,
            self._keys.watch_channel(session_id),
        )
        status, reply = await self._scripts.call(session_scripts.CLEAR, self._session_keys(session_id), args)
        if status is not Status.OK and status is not Status.REPLAYED:
            raise refusals.clear_refused(status, session_id, request_id)
        await self._conn.replicated(self._keys.meta(session_id))
        return codec.decode_described(session_id, reply[1])

    async def truncate(
        self, session_id: str, truncation: Truncation, *, owners: Owned = None
    ) -> TruncateResult:
        """Removes the newest stored messages in one script (see session_scripts.TRUNCATE)."""
        t = truncation
        # "t": never equal to another kind's fingerprint (see compact); what the call removes is
        # named by after_seq or pop_count, not by expected_last_seq or return_removed.
        what = f"a{t.after_seq}" if t.after_seq is not None else f"p{t.pop_count}"
        args = session_scripts.TruncateArgs(
            owners=owners_arg(owners),
            after_seq=t.after_seq,
            pop_count=t.pop_count,
            expected_last_seq=t.expected_last_seq,
            request_id=t.request_id,
            fingerprint="t" + what if t.request_id else "",
            idempotency_limit=self._idempotency_limit,
            publish_command=self._publish,
            channel=self._keys.watch_channel(session_id),
            return_removed=t.return_removed,
            max_removed_messages=MAX_REMOVED_MESSAGES,
            max_removed_bytes=PAGE_BYTES,
        )
        status, reply = await self._scripts.call(
            session_scripts.TRUNCATE, self._session_keys(session_id), args
        )
        if status is not Status.OK and status is not Status.REPLAYED:
            raise refusals.truncation_refused(
                status,
                reply,
                session_id=session_id,
                truncation=t,
                max_removed_messages=MAX_REMOVED_MESSAGES,
                max_removed_bytes=PAGE_BYTES,
            )
        await self._conn.replicated(self._keys.meta(session_id))
        _, after_seq, removed_count, items, described = reply
        return TruncateResult(
            session=codec.decode_described(session_id, described),
            after_seq=int(after_seq),
            removed_count=int(removed_count),
            removed=codec.decode_messages(items),
            replayed=status is Status.REPLAYED,
        )

    async def list_sessions(
        self, user_id: str, limit: int, cursor: SessionCursor | None, *, app: str = ""
    ) -> SessionPage:
        """A page of the user's live sessions (of `app` only, if given), or with `user_id` '' of
        every user's sessions of `app`, most recently active first (see listing.py)."""
        return await self._listing.list_sessions(Listed(user_id, app), limit, cursor)

    def _state_keys(self, scope: StateScope) -> list[str]:
        """A session's state and its meta (whose owner the scripts check), or a user's or an
        app's state."""
        if scope.session_id:
            return [self._keys.state(scope.session_id), self._keys.meta(scope.session_id)]
        if scope.app:
            return [self._keys.app_state(scope.app)]
        return [self._keys.user_state(scope.user_id)]

    async def get_state(
        self, scope: StateScope, keys: Sequence[str] = (), *, owners: Owned = None
    ) -> dict[str, str]:
        """The state (key -> JSON text), or its `keys` that it holds; `owners` as for a session
        (a user's state is the caller's to check)."""
        status, reply = await self._scripts.call(
            state_scripts.GET_STATE,
            self._state_keys(scope),
            state_scripts.GetStateArgs(owners_arg(owners) if scope.session_id else "", list(keys)),
        )
        if status is Status.NOT_FOUND:
            raise SessionNotFound(scope.session_id)
        if not keys:
            return codec.decode_state(reply[1])
        return {key: value.decode() for key, value in zip(keys, reply[1], strict=True) if value is not None}

    async def update_state(
        self, scope: StateScope, delta: StateDelta, *, owners: Owned = None
    ) -> dict[str, str]:
        """Applies `delta` in one step; the whole state after it (key -> JSON text)."""
        state_keys = self._state_keys(scope)
        status, reply = await self._scripts.call(
            state_scripts.UPDATE_STATE,
            state_keys,
            state_scripts.UpdateStateArgs(
                owners_arg(owners) if scope.session_id else "",
                self._max_state_keys,
                self._max_state_bytes,
                codec.encode_state_delta(delta.to_set, delta.to_remove),
            ),
        )
        if status is Status.NOT_FOUND:
            raise SessionNotFound(scope.session_id)
        if status is Status.STATE_FULL:
            raise refusals.state_full(
                reply, field="delta", max_keys=self._max_state_keys, max_bytes=self._max_state_bytes
            )
        await self._conn.replicated(state_keys[0])
        return codec.decode_state(reply[1])


# GetSession read_mask paths read from a meta field of their own.
_META_OF_FIELD = {
    "user_id": codec.MetaField.USER_ID.value,
    "model": codec.MetaField.MODEL.value,
    "title": codec.MetaField.TITLE.value,
    "created_at": codec.MetaField.CREATED_AT.value,
    "last_active": codec.MetaField.LAST_ACTIVE.value,
    "message_count": codec.MetaField.MESSAGE_COUNT.value,
    "token_count": codec.MetaField.TOKEN_COUNT.value,
    "ttl_seconds": codec.MetaField.TTL_SECONDS.value,
    "max_messages": codec.MetaField.MAX_MESSAGES.value,
    "app": codec.MetaField.APP.value,
}
