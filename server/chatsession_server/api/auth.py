"""Caller authentication and per-user authorization (README "Security").

A tokens file says which users each caller may act for. `AuthInterceptor` authenticates every call
but health and reflection (UNAUTHENTICATED otherwise) and puts the caller's `Grant` in `CALLER` for
that call; `AuthorizedStorage` is the servicer's storage as that caller sees it: a session of another
user does not exist for it (NOT_FOUND), and listing, creating or reading the usage for another user
is PERMISSION_DENIED. A call is refused before its request is read when its metadata already
says it has no caller (`_refuse`), or under mTLS when no `cert:` line names its certificate
(`CertificateGate`, which goes before every other interceptor).

Tokens are kept only as SHA-256 digests: a lookup by digest takes no time that depends on how much
of a guessed token is right, and the plaintext is dropped as soon as a line is parsed. Never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from grpc import aio

from chatsession_server.api.interceptors import Handler, WrappingInterceptor
from chatsession_server.api.status import to_grpc_status
from chatsession_server.api.storage_layer import StorageLayer
from chatsession_server.domain import (
    AppendResult,
    Compaction,
    CompactResult,
    Context,
    ContextQuery,
    MessagePage,
    MessageQuery,
    NewFork,
    NewMessage,
    NewSession,
    Owned,
    Owners,
    Session,
    SessionCursor,
    SessionPage,
    SessionPatch,
    StateDelta,
    StateScope,
    TruncateResult,
    Truncation,
    UserUsage,
    scope_owner,
)
from chatsession_server.errors import PermissionDenied, Unauthenticated
from chatsession_server.ports import SessionStorage

log = logging.getLogger(__name__)

K = TypeVar("K", str, bytes)
MIN_TOKEN_LENGTH = 16
LINE_FORMAT = (
    "expected '<token> <user_id>[,<user_id>...] [apps=<app>[,<app>...]]' or "
    "'cert:CN=<name> <user_ids> [apps=...]' (users '*' = all, apps=* = every app)"
)
_APP = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True, slots=True)
class Grant:
    """The users a caller may act for: those listed, or every user (`*`); and the apps it is
    granted (`apps=`), see README "Security"."""

    users: frozenset[str]
    every_user: bool = False
    apps: frozenset[str] | None = None
    """the apps of `apps=<app>,...`; None: the line has no `apps=`"""
    every_app: bool = False
    """`apps=*`"""

    def allows(self, user_id: str) -> bool:
        return self.every_user or user_id in self.users

    def allows_app(self, app: str) -> bool:
        """Whether the grant names `app` (by name or `apps=*`)."""
        return self.every_app or (self.apps is not None and app in self.apps)

    @property
    def confined_apps(self) -> frozenset[str] | None:
        """The apps whose sessions alone the caller may touch (`apps=<app>,...`); None when it is
        not confined (no `apps=`, or `apps=*`)."""
        return None if self.every_app else self.apps


CALLER: ContextVar[Grant | None] = ContextVar("chatsession_caller", default=None)
"""The current call's grant. Each gRPC call runs in its own task, so a value set for one call never
reaches another."""


@dataclass(frozen=True, slots=True)
class Callers:
    """A parsed tokens file."""

    by_token_digest: Mapping[bytes, Grant]
    by_common_name: Mapping[str, Grant]
    """Client certificate subject CN (mTLS) -> grant."""
    by_alt_name: Mapping[str, Grant]
    """Any client certificate subjectAltName (URI, DNS, ...) -> grant."""

    def __len__(self) -> int:
        return len(self.by_token_digest) + len(self.by_common_name) + len(self.by_alt_name)

    @property
    def has_certificates(self) -> bool:
        return bool(self.by_common_name or self.by_alt_name)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _grant(users: str, apps: str | None) -> Grant | None:
    """The grant of a line's users field and its `apps=` field (None: the line has none)."""
    granted: frozenset[str] | None = None
    if apps is not None:
        if apps == "*":
            granted = frozenset()
        else:
            names = apps.split(",")
            if not all(_APP.fullmatch(name) for name in names):
                return None
            granted = frozenset(names)
    every_app = apps == "*"
    if users == "*":
        return Grant(frozenset(), every_user=True, apps=granted, every_app=every_app)
    names = users.split(",")
    if any(not name or name == "*" for name in names):
        return None
    return Grant(frozenset(names), apps=granted, every_app=every_app)


def _add(table: dict[K, Grant], key: K, grant: Grant, where: str) -> None:
    if key in table:
        raise RuntimeError(f"{where}: the same token or certificate name as an earlier line")
    table[key] = grant


def load_callers(path: str) -> Callers:
    """Parse a tokens file; any problem is a one-line RuntimeError naming the line, never its token."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RuntimeError(f"cannot read auth tokens file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RuntimeError(f"auth tokens file {path} is not UTF-8 text") from None
    tokens: dict[bytes, Grant] = {}
    common_names: dict[str, Grant] = {}
    alt_names: dict[str, Grant] = {}
    cert_tables = {"CN": common_names, "SAN": alt_names}
    for number, line in enumerate(text.splitlines(), 1):
        content = line.strip()
        if not content or content.startswith("#"):
            continue
        where = f"auth tokens file {path}, line {number}"
        fields = content.split()
        apps = fields[2].removeprefix("apps=") if len(fields) == 3 and fields[2].startswith("apps=") else None
        grant = _grant(fields[1], apps) if len(fields) == 2 or apps is not None else None
        if grant is None:
            raise RuntimeError(f"{where}: {LINE_FORMAT}")
        credential = fields[0]
        if credential.startswith("cert:"):
            kind, equals, name = credential.removeprefix("cert:").partition("=")
            if not equals or not name or kind not in cert_tables:
                raise RuntimeError(f"{where}: expected cert:CN=<common name> or cert:SAN=<alternative name>")
            _add(cert_tables[kind], name, grant, where)
        else:
            if len(credential) < MIN_TOKEN_LENGTH:
                raise RuntimeError(f"{where}: token shorter than {MIN_TOKEN_LENGTH} characters")
            if not (credential.isascii() and credential.isprintable()):
                raise RuntimeError(f"{where}: token must be printable ASCII")
            _add(tokens, _digest(credential), grant, where)
    return Callers(tokens, common_names, alt_names)


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    values = [value for key, value in metadata if key == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    scheme, _, token = str(values[0]).partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization header must be 'Bearer <token>'")
    return token


def _refuse(error: Unauthenticated) -> Handler:
    """A handler that aborts with `error` without reading the request: a client stream for every
    kind of method (it ends the call before a reply, streaming ones included). gRPC reads a unary
    request whole before its handler runs; a client stream's messages only as the handler asks,
    and this one never does: the call is refused with at most its HTTP/2 window (64 KiB, see
    --http2-bdp-probe) taken in, whatever size of message it announced."""

    async def refuse(requests: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(to_grpc_status(error))

    return grpc.stream_unary_rpc_method_handler(cast(Any, refuse))


def refused_before_reading(
    callers: Callers, metadata: Iterable[tuple[str, str | bytes]], client_certificates: bool
) -> Unauthenticated | None:
    """Why a call must be refused from its metadata alone (a bad or unknown token, or none where
    no client certificate could stand for it), before its request is even parsed; else None."""
    try:
        token = _bearer_token(metadata)
    except Unauthenticated as exc:
        return exc
    if token is not None:
        return None if _digest(token) in callers.by_token_digest else Unauthenticated("unknown token")
    if callers.has_certificates and client_certificates:
        return None  # the certificate is known only to the call's context: see CertificateGate
    return Unauthenticated("no credentials: send 'authorization: Bearer <token>'")


def authenticate(callers: Callers, context: aio.ServicerContext[Any, Any]) -> Grant:
    """The grant of a bearer token if the call has one, else of its verified client certificate."""
    token = _bearer_token(context.invocation_metadata() or ())
    if token is not None:
        grant = callers.by_token_digest.get(_digest(token))
        if grant is None:
            raise Unauthenticated("unknown token")
        return grant
    if callers.has_certificates:
        # Filled by gRPC only from a client certificate it verified against --tls-client-ca.
        peer = context.auth_context()
        for name in peer.get("x509_common_name", ()):
            if (grant := callers.by_common_name.get(name.decode(errors="replace"))) is not None:
                return grant
        for name in peer.get("x509_subject_alternative_name", ()):
            if (grant := callers.by_alt_name.get(name.decode(errors="replace"))) is not None:
                return grant
    raise Unauthenticated("no credentials: send 'authorization: Bearer <token>'")


class AuthInterceptor(WrappingInterceptor):
    """Authenticates every call except those to `open_services`; `reload()` re-reads the tokens file."""

    def __init__(
        self, tokens_file: str, open_services: Collection[str], *, client_certificates: bool = False
    ) -> None:
        super().__init__()
        self._path = tokens_file
        self._callers = load_callers(tokens_file)
        self._open = tuple(f"/{service}/" for service in open_services)
        # Whether callers can present verified certificates at all (mTLS is on): without it, no
        # `cert:` line can stand for a missing token.
        self._client_certificates = client_certificates

    @property
    def callers(self) -> Callers:
        return self._callers

    def reload(self) -> bool:
        """Re-read the tokens file (SIGHUP); a bad file keeps the current table. Calls already
        running (open watch streams) keep the grant they started with."""
        try:
            callers = load_callers(self._path)
        except RuntimeError as exc:
            log.error("%s; keeping the previous %d callers", exc, len(self._callers))
            return False
        self._callers = callers
        log.info("auth tokens file %s reloaded: %d callers", self._path, len(callers))
        return True

    def certificate_decides(self, handler_call_details: grpc.HandlerCallDetails) -> bool:
        """Whether the call's client certificate alone can say who it is: mTLS on, `cert:` lines
        in the file, a method that needs credentials, and no `authorization` header (with one,
        the token decides, from the metadata)."""
        if not (self._client_certificates and self._callers.has_certificates):
            return False
        method: str = handler_call_details.method
        if method.startswith(self._open):
            return False
        return not any(key == "authorization" for key, _ in handler_call_details.invocation_metadata or ())

    async def _authenticate(self, request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        if isinstance(request, Unread):  # turned away by the certificate gate, its request unread
            await context.abort_with_status(to_grpc_status(request.refusal))
        try:
            CALLER.set(authenticate(self._callers, context))
        except Unauthenticated as exc:
            await context.abort_with_status(to_grpc_status(exc))

    def applies(self, method: str, handler: Handler) -> bool:
        return not method.startswith(self._open)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        # A caller without valid credentials is turned away before gRPC parses its request: a
        # stranger must not make the server decode megabytes.
        method: str = handler_call_details.method
        if not method.startswith(self._open):
            refused = refused_before_reading(
                self._callers, handler_call_details.invocation_metadata or (), self._client_certificates
            )
            if refused is not None:
                return _refuse(refused)
        return await super().intercept_service(continuation, handler_call_details)

    def wrap(self, handler: Handler, method: str) -> Handler:
        if not (handler.unary_unary or handler.unary_stream):
            # Fail closed: a new kind of RPC must not slip through unauthenticated.
            raise TypeError(f"{method}: AuthInterceptor does not cover client-streaming RPCs")
        return self.rebuilt(handler, unary=self._authenticated_unary, stream=self._authenticated_stream)

    # The behaviours are the servicer's coroutines and async generators; grpc's stubs type them as sync.
    def _authenticated_unary(self, respond: Any) -> Any:
        async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await self._authenticate(request, context)
            return await respond(request, context)

        return unary

    def _authenticated_stream(self, produce: Any) -> Any:
        async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await self._authenticate(request, context)
            items = produce(request, context)
            try:
                async for item in items:
                    yield item
                    del item  # an idle stream does not hold its last reply
            finally:  # as the error mapping's: not contextlib.aclosing, an object per stream
                await items.aclose()

        return stream


@dataclass(frozen=True, slots=True)
class Unread:
    """Stands in for the request of a call `CertificateGate` turned away: its interceptors see
    this in the request's place (no session_id to log, nothing to parse) and auth refuses it."""

    refusal: Unauthenticated


class CertificateGate(WrappingInterceptor):
    """With mTLS, a call without a token is authenticated from its client certificate before its
    request is read: a certificate that no `cert:` line names is refused UNAUTHENTICATED with at
    most its HTTP/2 window taken in, as a bad token is (`_refuse`), however large its request.

    gRPC shows interceptors the call's metadata only; the verified certificate is in the call's
    context, which a unary or server-streaming handler gets after gRPC has read and parsed the
    request. So for such calls the gate, the outermost interceptor, gives gRPC the method as a
    client stream (which gRPC reads only when asked), holding the handler every other interceptor
    built: it asks for the one request message once the certificate names a caller, then runs
    that handler with it, so access log, metrics, error mapping (undecodable requests included),
    spans, auth and the watch quota see the call exactly as gRPC would have shown it to them. A
    certificate that names nobody runs the same handler with `Unread` for the request: auth
    refuses it, and the refusal is logged, counted and traced like any other."""

    def __init__(self, auth: AuthInterceptor) -> None:
        super().__init__()
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        if not self._auth.certificate_decides(handler_call_details):
            return await continuation(handler_call_details)
        return await super().intercept_service(continuation, handler_call_details)

    def applies(self, method: str, handler: Handler) -> bool:
        # A client-streaming handler (auth's refusal is one) reads nothing before it runs: it
        # needs no gate.
        return handler.unary_unary is not None or handler.unary_stream is not None

    def wrap(self, handler: Handler, method: str) -> Handler:
        if handler.unary_stream is not None and not inspect.iscoroutinefunction(handler.unary_stream):
            # Fail closed: the gate runs a stream as the coroutine that writes it (the error
            # mapping's); one it would have to iterate must not pass unread or unauthenticated.
            raise TypeError(f"{method}: CertificateGate runs only streams written by a coroutine")
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _request(self, context: aio.ServicerContext[Any, Any]) -> Any:
        """The call's request, read only once its certificate names a caller; else `Unread`."""
        try:
            authenticate(self._auth.callers, context)
        except Unauthenticated as exc:
            return Unread(exc)
        request = await context.read()
        if request is aio.EOF:
            # No message: one over --max-request-bytes (gRPC has answered RESOURCE_EXHAUSTED
            # already), or a client that closed its side without sending one. gRPC answers a
            # unary call nothing then; ending as a cancelled call does the same here.
            raise asyncio.CancelledError
        return request

    # The behaviours are coroutines; grpc's stubs type them as sync.
    def _unary(self, respond: Any) -> Any:
        async def unary(requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            return await respond(await self._request(context), context)

        return unary

    def _stream(self, produce: Any) -> Any:
        async def written(requests: Any, context: aio.ServicerContext[Any, Any]) -> None:
            await produce(await self._request(context), context)

        return written


def _caller() -> Grant:
    grant = CALLER.get()
    if grant is None:  # AuthorizedStorage used outside an authenticated call: refuse, never allow
        raise Unauthenticated("no authenticated caller")
    return grant


def _require_user(user_id: str) -> None:
    if not _caller().allows(user_id):
        raise PermissionDenied(f"this caller may not act for user {user_id!r}")


def _require_app_of_grant(app: str, doing: str) -> None:
    """A caller confined to some apps (`apps=<app>,...`) works in those apps only."""
    apps = _caller().confined_apps
    if apps is None or app in apps:
        return
    if not app:
        raise PermissionDenied(f"app: this caller may {doing} only in the apps of its grant: set app")
    raise PermissionDenied(f"app: this caller may not {doing} in app {app!r}: its grant does not name it")


def _require_app_listing(app: str) -> None:
    """Listing an app across its users shows every user's sessions of it: the grant must name
    the app and every user."""
    grant = _caller()
    if not grant.allows_app(app):
        raise PermissionDenied(f"this caller may not list app {app!r}: its grant does not name the app")
    if not grant.every_user:
        raise PermissionDenied(
            f"this caller may not list every user's sessions of app {app!r}: "
            "its grant is limited to some users"
        )


def _require_scoped_id(session_id: str, field: str) -> None:
    """A caller limited to some users chooses new session ids in their namespaces only
    ('<user_id>/<name>'): decided from the grant alone, before anything is read, so the answer
    says nothing about which ids exist."""
    grant = _caller()
    if grant.every_user:
        return
    owner = scope_owner(session_id)
    if owner is None:
        raise PermissionDenied(
            f"{field}: this caller may choose only ids of its users' own, '<user_id>/<name>' "
            f"(or leave {field} empty for one the server makes)"
        )
    if not grant.allows(owner):
        raise PermissionDenied(f"this caller may not act for user {owner!r}")


class AuthorizedStorage(StorageLayer):
    """The store as the current caller (`CALLER`) sees it; the servicer uses it unchanged.

    Session-scoped calls pass the caller's users down as `owners`: the store checks the owner in
    the same atomic step as the operation (no extra round trip, no window in which the session
    could change hands). Calls naming a user are checked here.

    `scoped_ids`: a caller limited to some users may choose a new session's id (CreateSession,
    ForkSession) only as '<user_id>/<name>' of one of its users. Session ids are one namespace:
    were any id its to choose, ALREADY_EXISTS would tell it that another user's session has one.
    """

    def __init__(self, inner: SessionStorage, *, scoped_ids: bool = True) -> None:
        super().__init__(inner)
        self._scoped_ids = scoped_ids

    async def create(self, new: NewSession) -> tuple[Session, bool]:
        _require_user(new.user_id)
        _require_app_of_grant(new.app, "create sessions")
        if self._scoped_ids and new.chosen_id:
            _require_scoped_id(new.session_id, "session_id")
        return await super().create(new)

    async def get(
        self,
        session_id: str,
        *,
        owners: Owned = None,
        fields: Collection[str] | None = None,
    ) -> Session:
        return await super().get(session_id, owners=_owners(owners), fields=fields)

    async def update(self, session_id: str, patch: SessionPatch, *, owners: Owned = None) -> Session:
        return await super().update(session_id, patch, owners=_owners(owners))

    async def delete(self, session_id: str, *, owners: Owned = None) -> bool:
        return await super().delete(session_id, owners=_owners(owners))

    async def list_sessions(
        self, user_id: str, limit: int, cursor: SessionCursor | None, *, app: str = ""
    ) -> SessionPage:
        if user_id:
            _require_user(user_id)
            _require_app_of_grant(app, "list sessions")
        else:
            _require_app_listing(app)
        return await super().list_sessions(user_id, limit, cursor, app=app)

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
        return await super().append(
            session_id,
            messages,
            request_id=request_id,
            expected_last_seq=expected_last_seq,
            owners=_owners(owners),
            state_delta=state_delta,
        )

    async def list_messages(
        self, session_id: str, query: MessageQuery, *, owners: Owned = None
    ) -> MessagePage:
        return await super().list_messages(session_id, query, owners=_owners(owners))

    async def fork(self, fork: NewFork, *, owners: Owned = None) -> tuple[Session, bool]:
        # The fork belongs to the source's owner: checked with the source, in its read step.
        if self._scoped_ids and fork.chosen_id:
            _require_scoped_id(fork.session_id, "new_session_id")
        return await super().fork(fork, owners=_owners(owners))

    async def user_usage(self, user_id: str) -> UserUsage:
        _require_user(user_id)
        return await super().user_usage(user_id)

    async def get_context(self, session_id: str, query: ContextQuery, *, owners: Owned = None) -> Context:
        return await super().get_context(session_id, query, owners=_owners(owners))

    async def compact(
        self, session_id: str, compaction: Compaction, *, owners: Owned = None
    ) -> CompactResult:
        return await super().compact(session_id, compaction, owners=_owners(owners))

    async def clear(
        self,
        session_id: str,
        *,
        keep_system_prompt: bool,
        request_id: str = "",
        owners: Owned = None,
    ) -> Session:
        return await super().clear(
            session_id, keep_system_prompt=keep_system_prompt, request_id=request_id, owners=_owners(owners)
        )

    async def get_state(
        self, scope: StateScope, keys: Sequence[str] = (), *, owners: Owned = None
    ) -> dict[str, str]:
        return await super().get_state(scope, keys, owners=_state_owners(scope, owners))

    async def update_state(
        self, scope: StateScope, delta: StateDelta, *, owners: Owned = None
    ) -> dict[str, str]:
        return await super().update_state(scope, delta, owners=_state_owners(scope, owners))

    async def truncate(
        self, session_id: str, truncation: Truncation, *, owners: Owned = None
    ) -> TruncateResult:
        return await super().truncate(session_id, truncation, owners=_owners(owners))


def _state_owners(scope: StateScope, asked: Owned) -> Owned:
    """A session's state is the session's: its owner is checked with it (another user's is not
    found); a user's state needs a grant for that user (PERMISSION_DENIED, as ListSessions), an
    app's a grant naming the app (whatever its users: every user's sessions of the app share it)."""
    if scope.session_id:
        return _owners(asked)
    if scope.app:
        if not _caller().allows_app(scope.app):
            raise PermissionDenied(
                f"scope.app: this caller may not use the state of app {scope.app!r}: "
                "its grant does not name it"
            )
        return asked
    _require_user(scope.user_id)
    return asked


def _owners(asked: Owned) -> Owned:
    """The users whose sessions this call may touch: the caller's (None when it may act for
    anyone), narrowed to `asked` when the caller of the storage named some itself; for a caller
    confined to some apps, only their sessions of those apps (an `Owners`)."""
    if isinstance(asked, Owners):  # only this layer makes one: never asked by the layers above
        raise TypeError("owners already narrowed by an AuthorizedStorage")
    grant = _caller()
    if grant.every_user:
        users = None if asked is None else frozenset(asked)
    else:
        users = grant.users if asked is None else grant.users & frozenset(asked)
    apps = grant.confined_apps
    return users if apps is None else Owners(users, apps)
