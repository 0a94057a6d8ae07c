"""Valkey storage: domain types in, Valkey commands out. Never imports grpc."""
