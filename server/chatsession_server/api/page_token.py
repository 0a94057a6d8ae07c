"""Opaque, signed page tokens for ListSessions (AIP-158).

A token carries the cursor (last row's score and id) and what it lists: the user (empty for an
app's sessions of every user) and the app (absent for none, so tokens issued before apps
existed still verify); the HMAC
makes a tampered or foreign token an INVALID_ARGUMENT instead of a silently wrong page. Whatever
does not verify or parse into exactly what `encode` writes is INVALID_ARGUMENT too, so a leaked
key still cannot smuggle a NaN or a huge number into the store's range queries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from typing import NoReturn

from chatsession_server.api.validation import is_valid_session_id
from chatsession_server.domain import Listed, SessionCursor
from chatsession_server.errors import FieldViolation, InvalidArgument

_MAC_BYTES = 16
_VERSION = 1


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a score")


def _parse(payload: bytes) -> tuple[SessionCursor, Listed]:
    data = json.loads(payload, parse_constant=_no_constants)
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        raise ValueError("unknown version")
    score, session_id, owner, app = data.get("s"), data.get("i"), data.get("u"), data.get("a", "")
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError("score is not a number")
    if not math.isfinite(float(score)):  # OverflowError for a huge int
        raise ValueError("score is not finite")
    if not isinstance(session_id, str) or not is_valid_session_id(session_id):
        raise ValueError("not a session id")
    if not isinstance(owner, str):
        raise ValueError("not a user id")
    if not isinstance(app, str):
        raise ValueError("not an app")
    return SessionCursor(float(score), session_id), Listed(owner, app)


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, listed: Listed, cursor: SessionCursor) -> str:
        fields: dict[str, object] = {"v": _VERSION, "u": listed.user_id}
        if listed.app:
            fields["a"] = listed.app
        fields.update({"s": cursor.last_active, "i": cursor.session_id})
        payload = json.dumps(fields, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(payload + self._mac(payload)).decode().rstrip("=")

    def decode(self, token: str, listed: Listed) -> SessionCursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
            if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
                raise ValueError("bad signature")
            cursor, issued_for = _parse(payload)
        except (ValueError, OverflowError, RecursionError, binascii.Error) as exc:
            raise InvalidArgument(
                [FieldViolation("page_token", "is not a token this service issued")]
            ) from exc
        if issued_for.user_id != listed.user_id:
            raise InvalidArgument([FieldViolation("page_token", "was issued for another user_id")])
        if issued_for.app != listed.app:
            raise InvalidArgument([FieldViolation("page_token", "was issued for another app")])
        return cursor
