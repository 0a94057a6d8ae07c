"""Valkey storage: domain types in, Valkey commands out. Never imports grpc."""

from chatsession_server.store.session_store import SessionStore
from chatsession_server.store.valkey import ValkeyConnection

__all__ = ["SessionStore", "ValkeyConnection"]
