"""gRPC side: protobuf <-> domain, validation, status mapping. Never imports glide."""
