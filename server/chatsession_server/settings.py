"""Server settings: one frozen dataclass, built once at the edge from flags and environment.

Every field is a flag (`--default-ttl-seconds`) and an environment variable
(`CHATSESSION_DEFAULT_TTL_SECONDS`); a flag wins over the environment, the environment over the
default. A new option is one new field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

ENV_PREFIX = "CHATSESSION_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
# gRPC's compression algorithms, in the order of its bitset (grpc_compression_algorithm).
COMPRESSION_ALGORITHMS = ("identity", "deflate", "gzip")
KEY_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{0,64}")
"""What `--key-prefix` may be: no hash-tag braces (a prefix never changes which part of a key is
hashed to a cluster slot), no spaces or glob characters, at most 64."""


@dataclass(frozen=True, slots=True)
class ValkeyAddress:
    """Where Valkey is, parsed from `valkey[s]://[user:password@]host:port[,host:port...][/db]`.

    Several `host:port` seeds name nodes of one cluster (any one of them is enough to find the rest).
    """

    nodes: tuple[tuple[str, int], ...]
    use_tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    database: int = 0

    @property
    def host(self) -> str:
        return self.nodes[0][0]

    @property
    def port(self) -> int:
        return self.nodes[0][1]

    @classmethod
    def parse(cls, url: str) -> ValkeyAddress:
        schemes = {"valkey": False, "redis": False, "valkeys": True, "rediss": True}
        # Errors name the part that is wrong, never the URL: it may hold a password.
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in schemes:
            raise ValueError("Valkey URL must start with valkey:// or valkeys://")
        # The credentials end at the last '@' (a password may hold '/', as base64 does).
        userinfo, at, location = rest.rpartition("@")
        hosts, _, path = location.partition("/")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) if user else None
            password = unquote(secret) if colon and secret else None
        nodes = tuple(_node(seed) for seed in hosts.split(","))
        path = path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"Valkey URL database must be a number, got {path!r}")
        return cls(
            nodes=nodes,
            use_tls=schemes[scheme],
            username=username,
            password=password,
            database=int(path) if path else 0,
        )

    def redacted(self) -> str:
        scheme = "valkeys" if self.use_tls else "valkey"
        auth = "***@" if self.password else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{auth}{hosts}" + (f"/{self.database}" if self.database else "")


def _node(seed: str) -> tuple[str, int]:
    """One `host:port` (or `[v6]:port`, or a bare host) of a Valkey URL."""
    parts = urlsplit(f"//{seed}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("Valkey URL has a bad port (or its password is not followed by @host)") from None
    if not parts.hostname:
        raise ValueError("Valkey URL has no host")
    return parts.hostname, port


def _meta(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = field(default="127.0.0.1:50051", metadata=_meta("gRPC address to listen on, HOST:PORT"))
    valkey_url: str = field(
        default="",
        repr=False,
        metadata=_meta("valkey[s]://[user:password@]host:port[/db]; empty starts an embedded valkey-server"),
    )
    default_ttl_seconds: int = field(default=86_400, metadata=_meta("idle lifetime of a new session"))
    max_ttl_seconds: int = field(default=30 * 86_400, metadata=_meta("largest ttl_seconds a session may ask"))
    default_max_messages: int = field(
        default=-1, metadata=_meta("sliding window of a new session; -1 keeps every message")
    )
    max_content_bytes: int = field(default=256 * 1024, metadata=_meta("largest message content, UTF-8"))
    max_clock_skew_seconds: int = field(
        default=300,
        metadata=_meta("how far ahead of this server's clock a message's own created_at may be, in seconds"),
    )
    max_messages_per_append: int = field(default=1000, metadata=_meta("most messages in one AppendMessages"))
    idempotency_keys_per_session: int = field(
        default=1000, metadata=_meta("newest request_ids remembered per session")
    )
    valkey_cluster: bool = field(
        default=False,
        metadata=_meta("Valkey is a cluster: --valkey-url names one or more seed nodes, host:port,host:port"),
    )
    valkey_wait_replicas: int = field(
        default=0,
        metadata=_meta(
            "acknowledge a write only once this many replicas of its primary have it (WAIT); 0 does not wait"
        ),
    )
    valkey_wait_timeout_ms: int = field(
        default=1000, metadata=_meta("how long a write waits for --valkey-wait-replicas before UNAVAILABLE")
    )
    valkey_timeout_ms: int = field(default=2000, metadata=_meta("Valkey request timeout"))
    valkey_connect_timeout_ms: int = field(default=2000, metadata=_meta("Valkey connection timeout"))
    valkey_inflight_limit: int = field(default=5000, metadata=_meta("most Valkey requests in flight"))
    max_pending_calls: int = field(
        default=20_000,
        metadata=_meta("calls that may wait to be picked up, as in a reconnect storm of watchers"),
    )
    grace_seconds: float = field(
        default=10.0, metadata=_meta("how long in-flight RPCs may finish on SIGTERM")
    )
    page_token_key: str = field(
        default="",
        repr=False,
        metadata=_meta(
            "key that signs page tokens; empty: a random key kept in Valkey "
            "(chatsession:page_token_key), which every replica shares"
        ),
    )
    watch_heartbeat_seconds: float = field(
        default=15.0, metadata=_meta("idle time after which a watch stream gets a heartbeat")
    )
    watch_poll_seconds: float = field(
        default=2.0, metadata=_meta("how often watched sessions are checked for missed appends and expiry")
    )
    # What one watcher may hold for a client that reads slowly: the events buffered for it, and a
    # page it reads back from Valkey (a page is at most 3 MiB whatever this says). Past it, the
    # watcher drops its oldest buffered events and reads them back by seq once the client reads.
    watch_buffer_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata=_meta(
            "bytes of messages buffered per watcher; a watcher past it drops its oldest and reads them "
            "back from Valkey, by seq, when its client reads again"
        ),
    )
    # How much of the event loop's time stream writes may take before unary calls get theirs
    # (api/pacing.py): smaller keeps other calls' latency lower under a large fan-out.
    watch_write_bytes_per_pass: int = field(
        default=1024 * 1024,
        metadata=_meta(
            "bytes of watch replies the server starts writing in one pass of its event loop (and the "
            "reply that crosses it); the rest wait for the next, so a large fan-out does not hold up "
            "other calls"
        ),
    )
    log_level: str = field(default="INFO", metadata=_meta("DEBUG, INFO, WARNING or ERROR"))
    # Transport security and caller authorization (README "Security"); the files are read at start-up.
    tls_cert: str = field(default="", metadata=_meta("PEM certificate chain: serve TLS (with --tls-key)"))
    tls_key: str = field(default="", metadata=_meta("PEM private key of --tls-cert"))
    tls_client_ca: str = field(
        default="", metadata=_meta("PEM CA certificates: require client certificates they signed (mTLS)")
    )
    auth_tokens_file: str = field(
        default="",
        metadata=_meta(
            "callers and the users each may act for: '<token> <user_id>[,...]' lines; SIGHUP re-reads it"
        ),
    )
    global_session_ids: bool = field(
        default=False,
        metadata=_meta(
            "with auth on, let a caller limited to some users choose any new session id (ALREADY_EXISTS "
            "then tells it that an id is taken, by another user's session too); false: only "
            "'<user_id>/<name>' ids of its users, or none (the server makes one)"
        ),
    )
    # -- request size limits. gRPC clients receive at most 4 MiB by default: requests are held to
    # that, and an append to 3 MiB so that its reply (the messages echoed with seq and created_at,
    # plus the session, labels and all) always fits a default client.
    max_request_bytes: int = field(
        default=4 * 1024 * 1024, metadata=_meta("largest gRPC request (RESOURCE_EXHAUSTED above it)")
    )
    max_message_bytes: int = field(
        default=1024 * 1024,
        metadata=_meta(
            "largest message, protobuf-encoded: content, name, metadata, tool calls and payload together"
        ),
    )
    max_append_bytes: int = field(
        default=3 * 1024 * 1024, metadata=_meta("largest AppendMessages, its messages protobuf-encoded")
    )
    # Processes and start-up: worker processes under a supervisor; waiting for Valkey at start.
    workers: int = field(
        default=1,
        metadata=_meta("server processes sharing the listening port, under a supervisor; 0: one per core"),
    )
    valkey_startup_timeout: float = field(
        default=30.0, metadata=_meta("how long to wait for Valkey at start before giving up, in seconds")
    )
    # -- Valkey TLS and credentials (README "Valkey TLS and credentials"). The password is given one
    # way only: in --valkey-url, in --valkey-password (better: its environment variable, which `ps`
    # does not show) or in --valkey-password-file; the files are read once, at start-up.
    valkey_ca_file: str = field(
        default="",
        metadata=_meta("PEM CA certificates that verify the Valkey server (valkeys://); empty: the system's"),
    )
    valkey_tls_insecure: bool = field(
        default=False,
        metadata=_meta("valkeys:// without verifying the server's certificate: for testing only"),
    )
    valkey_password: str = field(
        default="",
        repr=False,
        metadata=_meta("Valkey password; prefer the environment variable or --valkey-password-file"),
    )
    valkey_password_file: str = field(
        default="", metadata=_meta("file holding the Valkey password (a trailing newline is ignored)")
    )
    # -- quotas (README "Quotas"): RESOURCE_EXHAUSTED with a google.rpc.QuotaFailure beyond them.
    max_watchers: int = field(
        default=20_000, metadata=_meta("most WatchMessages streams open at once in this process")
    )
    # A quarter of the process: one client cannot take it all, yet a backend multiplexing its
    # users' watches over one connection (gRPC channels to one target share it) has room.
    max_watchers_per_connection: int = field(
        default=5000, metadata=_meta("most WatchMessages streams open at once on one client connection")
    )
    max_session_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_meta("most bytes of messages one session may store (before its window trims); 0: no cap"),
    )
    max_sessions_per_user: int = field(
        default=0,
        metadata=_meta(
            "most live sessions a user may have (checked at CreateSession and ForkSession, soft); 0: no limit"
        ),
    )
    # -- ForkSession (README "Fork and usage"): a fork reads and writes its copy in one script each,
    # during which Valkey serves no one else; a source larger than these is refused.
    max_fork_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata=_meta("most bytes of stored messages a session may hold to be forked"),
    )
    max_fork_messages: int = field(
        default=20_000,
        metadata=_meta("most stored messages a session may hold to be forked"),
    )
    # -- state (README "State"): what one state (a session's, or a user's) may hold, keys and
    # values as their JSON text. A whole state comes back in GetState and UpdateState: at 512 KiB
    # of JSON even one dense in small numbers (5.5 times larger as protobuf) fits a client's 4 MiB.
    max_state_keys: int = field(default=1000, metadata=_meta("most keys one state may hold"))
    max_state_bytes: int = field(
        default=512 * 1024, metadata=_meta("most bytes of keys and JSON values one state may hold")
    )
    # -- the embedded Valkey (README "Containers"). The image turns it off: a container given no
    # Valkey URL stops with one line instead of keeping its sessions inside itself.
    embedded_valkey: bool = field(
        default=True,
        metadata=_meta("with no --valkey-url, start a private valkey-server (its data is not kept)"),
    )

    # -- key namespace (README "Data model"): several deployments may share one Valkey.
    key_prefix: str = field(
        default="",
        metadata=_meta(
            "put before every key and channel name (e.g. 'staging:'); empty: the cookbook's names. "
            "At most 64 characters from [A-Za-z0-9_.:-]"
        ),
    )

    # -- observability (README "Observability"): metrics, traces, logs; and gRPC server options.
    metrics_listen: str = field(
        default="",
        metadata=_meta(
            "HOST:PORT serving Prometheus text at /metrics (worker N of --workers: PORT+N-1); empty: none"
        ),
    )
    otlp_endpoint: str = field(
        default="",
        metadata=_meta("OTLP/gRPC collector for metrics and traces, e.g. http://otel:4317; empty: none"),
    )
    log_format: str = field(default="text", metadata=_meta("text or json (one JSON object per line)"))
    access_log: bool = field(default=True, metadata=_meta("one log line per RPC (--access-log false: none)"))
    keepalive_time_ms: int = field(
        default=30_000, metadata=_meta("ping a connection idle this long, to keep it through proxies")
    )
    keepalive_timeout_ms: int = field(
        default=10_000, metadata=_meta("close a connection whose ping is not answered within this")
    )
    keepalive_permit_without_calls: bool = field(
        default=True, metadata=_meta("let clients ping (and the server ping) connections with no call open")
    )
    keepalive_min_ping_interval_ms: int = field(
        default=10_000,
        metadata=_meta("closest client pings may come without data (GOAWAY too_many_pings below it)"),
    )
    max_concurrent_streams: int = field(
        default=0, metadata=_meta("most calls open at once on one HTTP/2 connection; 0: gRPC's default")
    )
    http2_bdp_probe: bool = field(
        default=False,
        metadata=_meta(
            "let gRPC widen HTTP/2 receive windows by bandwidth probing (a connection may then take in "
            "megabytes of a call before it is authenticated); false: a call is let in 64 KiB at a "
            "time until its handler reads the request, which then comes in whole"
        ),
    )
    memory_trim_seconds: float = field(
        default=10.0,
        metadata=_meta(
            "every this often, hand memory the process freed back to the OS (glibc malloc_trim); 0: never"
        ),
    )
    compression_algorithms: str = field(
        default="identity,deflate,gzip",
        metadata=_meta("compression accepted from clients (identity is always accepted), comma-separated"),
    )
    default_compression: str = field(
        default="identity", metadata=_meta("compression of replies: identity, deflate or gzip")
    )

    def __post_init__(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if not host or (host.startswith("[") != host.endswith("]")) or not port.lstrip("-").isdigit():
            raise ValueError(f"listen must be HOST:PORT, got {self.listen!r}")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"listen port must be 0..65535, got {port}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.workers < 0:
            raise ValueError("workers must be 0 (one per CPU core) or more")
        if self.valkey_startup_timeout <= 0:
            raise ValueError("valkey_startup_timeout must be positive")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must not be negative")
        address = ValkeyAddress.parse(self.valkey_url) if self.valkey_url else None
        if address is not None and len(address.nodes) > 1 and not self.valkey_cluster:
            raise ValueError("several Valkey nodes in valkey_url need --valkey-cluster")
        if address is not None and self.valkey_cluster and address.database:
            raise ValueError("a Valkey Cluster keeps its data in database 0: drop the /N from valkey_url")
        self._check_valkey_security(address)
        if self.valkey_wait_replicas < 0 or self.valkey_wait_timeout_ms <= 0:
            raise ValueError(
                "valkey_wait_replicas must not be negative, valkey_wait_timeout_ms must be positive"
            )
        if not 1 <= self.default_ttl_seconds <= self.max_ttl_seconds:
            raise ValueError("default_ttl_seconds must be between 1 and max_ttl_seconds")
        if self.max_clock_skew_seconds < 0:
            raise ValueError("max_clock_skew_seconds must not be negative")
        if self.default_max_messages == 0 or self.default_max_messages < -1:
            raise ValueError("default_max_messages must be positive or -1")
        for name in (
            "max_content_bytes",
            "max_messages_per_append",
            "idempotency_keys_per_session",
            "watch_buffer_bytes",
            "watch_write_bytes_per_pass",
            "watch_heartbeat_seconds",
            "watch_poll_seconds",
            "max_pending_calls",
            "max_request_bytes",
            "max_message_bytes",
            "max_append_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.idempotency_keys_per_session > 100_000:
            # Forgetting the oldest reads every record inside one script: keep that bounded.
            raise ValueError("idempotency_keys_per_session must be at most 100000")
        if self.max_messages_per_append > 5000:
            raise ValueError("max_messages_per_append must be at most 5000 (Lua argument limits)")
        if self.max_watchers <= 0 or self.max_watchers_per_connection <= 0:
            raise ValueError("max_watchers and max_watchers_per_connection must be positive")
        if self.max_sessions_per_user < 0:
            raise ValueError("max_sessions_per_user must not be negative (0: no limit)")
        if self.max_state_keys <= 0 or self.max_state_bytes <= 0:
            raise ValueError("max_state_keys and max_state_bytes must be positive")
        if self.max_fork_bytes <= 0 or self.max_fork_messages <= 0:
            raise ValueError("max_fork_bytes and max_fork_messages must be positive")
        if not KEY_PREFIX_PATTERN.fullmatch(self.key_prefix):
            raise ValueError("key_prefix must be at most 64 characters from [A-Za-z0-9_.:-]")
        if not self.valkey_url and not self.embedded_valkey:
            raise ValueError(
                f"no Valkey configured: set --valkey-url ({ENV_PREFIX}VALKEY_URL), or --embedded-valkey "
                f"({ENV_PREFIX}EMBEDDED_VALKEY=1) for a private valkey-server whose data is not kept"
            )

        self._check_observability()

    def _check_observability(self) -> None:
        if self.metrics_listen:
            host, _, port = self.metrics_listen.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"metrics_listen must be HOST:PORT, got {self.metrics_listen!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        for name in ("keepalive_time_ms", "keepalive_timeout_ms", "keepalive_min_ping_interval_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.memory_trim_seconds < 0:
            raise ValueError("memory_trim_seconds must not be negative (0: never)")
        if self.max_concurrent_streams < 0:
            raise ValueError("max_concurrent_streams must not be negative (0: gRPC's default)")
        unknown = set(self.accepted_compression) - set(COMPRESSION_ALGORITHMS)
        if unknown:
            raise ValueError(
                f"compression_algorithms: unknown {', '.join(sorted(unknown))} "
                f"(known: {', '.join(COMPRESSION_ALGORITHMS)})"
            )
        if self.default_compression not in self.accepted_compression:
            raise ValueError(
                f"default_compression must be one of compression_algorithms, got {self.default_compression!r}"
            )

    @property
    def accepted_compression(self) -> tuple[str, ...]:
        """The algorithms of --compression-algorithms, identity always among them."""
        names = [name.strip() for name in self.compression_algorithms.split(",") if name.strip()]
        return tuple(dict.fromkeys(["identity", *names]))

    def _check_valkey_security(self, address: ValkeyAddress | None) -> None:
        """The Valkey TLS and password options fit together (the messages never hold a secret)."""
        tls = address is not None and address.use_tls
        if self.valkey_ca_file and not tls:
            raise ValueError("--valkey-ca-file needs a valkeys:// URL (TLS)")
        if self.valkey_tls_insecure and not tls:
            raise ValueError("--valkey-tls-insecure needs a valkeys:// URL (TLS)")
        if self.valkey_tls_insecure and self.valkey_ca_file:
            raise ValueError("--valkey-tls-insecure verifies nothing: it does not go with --valkey-ca-file")
        sources = [
            name
            for name, given in (
                ("the URL", address is not None and address.password is not None),
                (f"--valkey-password ({ENV_PREFIX}VALKEY_PASSWORD)", bool(self.valkey_password)),
                ("--valkey-password-file", bool(self.valkey_password_file)),
            )
            if given
        ]
        if sources and address is None:
            raise ValueError(f"a Valkey password in {sources[0]} needs --valkey-url")
        if len(sources) > 1:
            raise ValueError(
                f"the Valkey password is given more than once ({', '.join(sources)}): give it one way"
            )

    @property
    def listen_host(self) -> str:
        """The host part of `listen` as written (an IPv6 address keeps its brackets)."""
        return self.listen.rpartition(":")[0]

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def valkey(self) -> ValkeyAddress | None:
        """Where Valkey is, with its password from wherever it was given; None: start an embedded one.

        This reads --valkey-password-file (RuntimeError, one line, when it cannot): ask once, at start-up.
        """
        if not self.valkey_url:
            return None
        address = ValkeyAddress.parse(self.valkey_url)
        if self.valkey_password_file:
            return dataclasses.replace(address, password=read_password_file(self.valkey_password_file))
        if self.valkey_password:
            return dataclasses.replace(address, password=self.valkey_password)
        return address

    def valkey_root_certificates(self) -> bytes | None:
        """The PEM CA certificates of --valkey-ca-file (read now), or None for the system's."""
        if not self.valkey_ca_file:
            return None
        try:
            pem = Path(self.valkey_ca_file).read_bytes()
        except OSError as exc:
            raise RuntimeError(
                f"cannot read --valkey-ca-file {self.valkey_ca_file}: {exc.strerror or exc}"
            ) from None
        # GLIDE would only time out on a file it cannot use; OpenSSL says so now.
        try:
            ssl.create_default_context(cadata=pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise RuntimeError(
                f"--valkey-ca-file {self.valkey_ca_file}: no PEM CA certificate in it"
            ) from None
        return pem

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        environ = os.environ if environ is None else environ
        parser = _OneLineErrorParser(
            prog="chatsession-server",
            description="gRPC session store for LLM conversations, on Valkey.",
            epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<NAME>.",
        )
        for f in dataclasses.fields(cls):
            env_name = ENV_PREFIX + f.name.upper()
            # A bare boolean flag (`--valkey-cluster`) means true; `--valkey-cluster false` also works.
            is_bool = f.type == "bool"
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=_field_type(f),
                default=None,
                nargs="?" if is_bool else None,
                const=True if is_bool else None,
                help=f"{f.metadata.get('help', '')} (env {env_name}, default {f.default!r})",
            )
        args = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            flag_value = getattr(args, f.name)
            env_value = environ.get(ENV_PREFIX + f.name.upper())
            if flag_value is not None:
                values[f.name] = flag_value
            elif env_value is not None:
                try:
                    values[f.name] = _field_type(f)(env_value)
                except ValueError as exc:
                    parser.error(f"{ENV_PREFIX}{f.name.upper()}: {exc}")
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))


class _OneLineErrorParser(argparse.ArgumentParser):
    """A configuration error is one line on stderr (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def read_password_file(path: str) -> str:
    """The password in `path`, without the trailing newline editors and `echo` leave."""
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise RuntimeError(f"cannot read --valkey-password-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:  # its message would quote the bytes
        raise RuntimeError(f"cannot read --valkey-password-file {path}: not UTF-8 text") from None
    if not password:
        raise RuntimeError(f"--valkey-password-file {path} is empty")
    return password


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _field_type(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    parsers: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _parse_bool}
    return parsers[str(f.type)]


def configuration_table() -> str:
    """The README's configuration table (flag, environment variable, default, meaning), made from the
    fields themselves so that it cannot drift: `make docs` writes it, a test compares."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        if isinstance(f.default, bool):
            default = f"`{str(f.default).lower()}`"
        else:
            default = "(empty)" if f.default == "" else f"`{f.default}`"
        meaning = str(f.metadata.get("help", "")).replace("|", "\\|")
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | {default} | {meaning} |"
        )
    return "\n".join(rows) + "\n"
