"""chatsession: a gRPC service that keeps the conversations of LLM applications in Valkey."""

__version__ = "0.1.0"
