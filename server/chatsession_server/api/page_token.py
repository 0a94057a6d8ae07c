"""Opaque, signed page tokens for ListSessions (AIP-158).

A token carries the cursor (last row's score and id) and the user it was issued for; the HMAC
makes a tampered or foreign token an INVALID_ARGUMENT instead of a silently wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

from chatsession_server.domain import SessionCursor
from chatsession_server.errors import FieldViolation, InvalidArgument

_MAC_BYTES = 16
_VERSION = 1


class PageTokens:
    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, user_id: str, cursor: SessionCursor) -> str:
        payload = json.dumps(
            {"v": _VERSION, "u": user_id, "s": cursor.last_active, "i": cursor.session_id},
            separators=(",", ":"),
        ).encode()
        return base64.urlsafe_b64encode(payload + self._mac(payload)).decode().rstrip("=")

    def decode(self, token: str, user_id: str) -> SessionCursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
            if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
                raise ValueError("bad signature")
            data = json.loads(payload)
            if data.get("v") != _VERSION:
                raise ValueError("unknown version")
            cursor = SessionCursor(float(data["s"]), str(data["i"]))
            owner = str(data["u"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise InvalidArgument(
                [FieldViolation("page_token", "is not a token this service issued")]
            ) from exc
        if owner != user_id:
            raise InvalidArgument([FieldViolation("page_token", "was issued for another user_id")])
        return cursor
