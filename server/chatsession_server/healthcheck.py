"""`python -m chatsession_server.healthcheck [HOST:PORT]`: exit 0 when the server's gRPC health is SERVING.

The container's HEALTHCHECK. It asks `grpc.health.v1.Health/Check` for the server as a whole, which
is NOT_SERVING while the server waits for Valkey and once it drains on SIGTERM. Without an address
it asks this machine on the port of `CHATSESSION_LISTEN` (the server's own setting), so the image
needs no second place to name the port. Plaintext only: behind TLS, point the probe elsewhere.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# A server listening on every interface is asked on the loopback one.
_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]", "::")


def default_address(environ: Mapping[str, str] = os.environ) -> str:
    """Where the server of this machine listens, from CHATSESSION_LISTEN (default 127.0.0.1:50051)."""
    host, _, port = environ.get("CHATSESSION_LISTEN", "127.0.0.1:50051").rpartition(":")
    return f"{'127.0.0.1' if host in _WILDCARD_HOSTS else host}:{port}"


def check(address: str, timeout: float) -> str | None:
    """None when `address` answers SERVING, else why not (one line)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"{address}: {code.name if code else 'error'}: {exc.details() if code else exc}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatsession_server.healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", help="HOST:PORT (default: from CHATSESSION_LISTEN)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    problem = check(args.address or default_address(), args.timeout)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
