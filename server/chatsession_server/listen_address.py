"""Check the listening address before anything starts.

gRPC would not say it clearly: with SO_REUSEPORT (its default) a second server binds a busy port
and silently shares it, and without it gRPC logs a multi-line error of its own. A plain bind
without SO_REUSEPORT finds the conflict first and says it in one line.
"""

from __future__ import annotations

import errno
import socket

# Addresses a host name may resolve to but this machine cannot bind (e.g. ::1 without IPv6).
_UNBINDABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def claim_listen_port(host: str, port: int) -> int:
    """`port` if nothing is bound on HOST:PORT, or a free port if `port` is 0.

    Raises RuntimeError with one clear line when the address is taken or cannot be bound.
    """
    bare_host = host[1:-1] if host.startswith("[") else host
    try:
        addresses = socket.getaddrinfo(bare_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound_any = False
    last_error = ""
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: connections of an earlier server in TIME_WAIT do not block the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((sockaddr[0], port, *sockaddr[2:]))
            except OSError as exc:
                if exc.errno in _UNBINDABLE:
                    last_error = exc.strerror or str(exc)
                    continue
                raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            bound_any = True
            # Port 0: the first address picks the port; the others must have it free too.
            port = port or int(probe.getsockname()[1])
    if not bound_any:
        raise RuntimeError(f"cannot listen on {host}:{port}: {last_error}")
    return port
