"""A real local Valkey Cluster from the valkey-server binary, for tests and benchmarks.

Starts `primaries` nodes (and as many replicas per primary as asked), forms the cluster with
plain commands (CLUSTER ADDSLOTSRANGE / MEET / REPLICATE), waits for `cluster_state:ok` on every
node, and on `stop()` leaves no process or directory behind. Each node is an EmbeddedValkey, so a
killed parent takes the nodes with it.

The cluster bus port is given explicitly (`--cluster-port`): the default, port + 10000, does not
exist for ports above 55535.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from chatsession_server.embedded import EmbeddedValkey, free_port

SLOTS = 16384
# Short enough that a killed primary is failed over within a few seconds in tests.
NODE_TIMEOUT_MS = 1500


def command(host: str, port: int, *args: str, timeout: float = 2.0) -> Any:
    """One command over a fresh connection (RESP2), for forming and inspecting the cluster."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(payload.encode())
        with conn.makefile("rb") as reader:
            return _read_reply(reader)


def _read_reply(reader: Any) -> Any:
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected reply {line[:40]!r}")


def _info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


class ClusterNode(EmbeddedValkey):
    """A cluster node; `persistent` keeps its data in an append-only file, so a node restarted
    (on the same port and directory) comes back with its data and its place in the cluster."""

    def __init__(self, *, persistent: bool = False) -> None:
        self.bus_port = free_port()
        durability = ("--appendonly", "yes", "--appendfsync", "always") if persistent else ()
        super().__init__(
            extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_port),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # A replica with no primary yet should still answer (it serves nothing meanwhile).
                "--cluster-require-full-coverage", "no",
                *durability,
            )
        )  # fmt: skip

    def call(self, *args: str) -> Any:
        return command(self.host, self.port, *args)

    @property
    def node_id(self) -> str:
        return str(self.call("CLUSTER", "MYID"))


class EmbeddedCluster:
    """`with EmbeddedCluster(primaries=3, replicas=1) as cluster:` ... `cluster.url`."""

    def __init__(self, primaries: int = 3, replicas: int = 0, *, persistent: bool = False) -> None:
        self.primaries = [ClusterNode(persistent=persistent) for _ in range(primaries)]
        self.replicas = [ClusterNode(persistent=persistent) for _ in range(primaries * replicas)]
        self._replicas_per_primary = replicas

    @property
    def nodes(self) -> list[ClusterNode]:
        return self.primaries + self.replicas

    @property
    def url(self) -> str:
        return "valkey://" + ",".join(f"{n.host}:{n.port}" for n in self.primaries)

    def start(self, timeout: float = 30.0) -> None:
        try:
            for node in self.nodes:
                node.start()
            self._form(timeout)
        except BaseException:
            self.stop()
            raise

    def _form(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        per = SLOTS // len(self.primaries)
        for i, node in enumerate(self.primaries):
            last = SLOTS - 1 if i == len(self.primaries) - 1 else (i + 1) * per - 1
            node.call("CLUSTER", "ADDSLOTSRANGE", str(i * per), str(last))
        first = self.primaries[0]
        for node in self.nodes[1:]:
            node.call("CLUSTER", "MEET", first.host, str(first.port), str(first.bus_port))
        self._wait(
            deadline,
            lambda n: int(_info(n.call("CLUSTER", "INFO"))["cluster_known_nodes"]) == len(self.nodes),
        )
        for i, replica in enumerate(self.replicas):
            primary = self.primaries[i // self._replicas_per_primary]
            self._wait(deadline, lambda n, p=primary: self._knows(n, p.node_id), [replica])
            replica.call("CLUSTER", "REPLICATE", primary.node_id)
        self._wait(deadline, lambda n: _info(n.call("CLUSTER", "INFO"))["cluster_state"] == "ok")
        self._wait(
            deadline,
            lambda n: _info(n.call("INFO", "replication")).get("master_link_status") == "up",
            self.replicas,
        )

    @staticmethod
    def _knows(node: ClusterNode, node_id: str) -> bool:
        return node_id in str(node.call("CLUSTER", "NODES"))

    def _wait(self, deadline: float, ready: Any, nodes: list[ClusterNode] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            while True:
                with contextlib.suppress(OSError, RuntimeError, KeyError, ValueError):
                    if ready(node):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster did not form in time (node {node.port})")
                time.sleep(0.05)

    def primary_for(self, key: str) -> ClusterNode:
        """The node serving `key`'s slot now (asks the cluster, so it follows failovers)."""
        slot = -1
        for node in self.nodes:  # any live node can tell the slot
            with contextlib.suppress(OSError, RuntimeError):
                slot = int(node.call("CLUSTER", "KEYSLOT", key))
                break
        for node in self.nodes:
            with contextlib.suppress(OSError, RuntimeError):
                for lo, hi, *owners in node.call("CLUSTER", "SLOTS"):
                    if lo <= slot <= hi:
                        port = int(owners[0][1])
                        return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def wait_for_new_primary(self, key: str, old: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """After `old` was killed: the node that took over `key`'s slot (asked of live nodes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RuntimeError, StopIteration):
                node = self.primary_for(key)
                if node is not old:
                    return node
            time.sleep(0.1)
        raise RuntimeError(f"no replica took over {key!r} within {timeout}s")

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> EmbeddedCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
