"""`chatsession`: the command-line client, on the blocking SyncSessionClient.

    chatsession --address HOST:PORT create --user alice --title "Trip"
    chatsession append SESSION "Find me a hotel" --role user
    chatsession show SESSION
    chatsession ls --user alice --json
    chatsession ls --app travel
    chatsession tail -f SESSION
    chatsession context SESSION --max-tokens 4000
    chatsession fork SESSION --at-seq 4
    chatsession clear SESSION --keep-system-prompt
    chatsession truncate SESSION --after-seq 4 --show-removed
    chatsession pop SESSION
    chatsession usage --user alice
    chatsession state SESSION --set 'cart={"nights": 3}' --remove draft
    chatsession state --user alice
    chatsession state --app travel --set 'banner="Spring sale"'
    chatsession rm SESSION

--json prints one JSON document (the protobuf JSON mapping, as grpcurl prints it), or one JSON
line per event for `tail -f`. A failed call prints one line on stderr and exits with the code
of its status class (EXIT_CODES).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_client._calls import Message, Session, message
from chatsession_client._payload import payload_of, payload_value
from chatsession_client._state import state_delta
from chatsession_client.errors import ChatSessionError
from chatsession_client.retry import Retry
from chatsession_client.sync import SyncSessionClient

USAGE_ERROR = 2
INTERRUPTED = 130
EXIT_CODES: dict[grpc.StatusCode, int] = {
    # 1: any other status (INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED, ...); 2: a bad command line.
    grpc.StatusCode.INVALID_ARGUMENT: 3,
    grpc.StatusCode.OUT_OF_RANGE: 3,
    grpc.StatusCode.NOT_FOUND: 4,
    grpc.StatusCode.ALREADY_EXISTS: 5,
    grpc.StatusCode.FAILED_PRECONDITION: 5,
    grpc.StatusCode.ABORTED: 5,
    grpc.StatusCode.UNAUTHENTICATED: 6,
    grpc.StatusCode.PERMISSION_DENIED: 6,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 7,
    grpc.StatusCode.UNAVAILABLE: 8,
    grpc.StatusCode.DEADLINE_EXCEEDED: 8,
}


class UsageError(Exception):
    """A command line that cannot be run (an unreadable file, a malformed label)."""


EPILOG = (
    "Options may come before or after the command. Exit codes: 0 ok, 1 other errors, 2 bad command "
    "line, 3 INVALID_ARGUMENT, 4 NOT_FOUND, 5 ALREADY_EXISTS/FAILED_PRECONDITION, "
    "6 UNAUTHENTICATED/PERMISSION_DENIED, 7 RESOURCE_EXHAUSTED, 8 UNAVAILABLE/DEADLINE_EXCEEDED, "
    "130 interrupted."
)


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes. A command's own copy has no defaults, so that it only
    overrides what was given before the command when given again after it."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--address",
        default=default(os.environ.get("CHATSESSION_ADDRESS", "localhost:50051")),
        help="server HOST:PORT (env CHATSESSION_ADDRESS; default localhost:50051)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON (JSON lines for tail -f)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(10.0),
        help="seconds a call may take, retries included (default 10)",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help="TLS with the system's root certificates"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=default(None),
        help="TLS, verifying the server against this CA (PEM)",
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", default=default(None), help="client certificate (PEM), for mTLS"
    )
    parser.add_argument(
        "--tls-key", metavar="FILE", default=default(None), help="client certificate's private key (PEM)"
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help="bearer token, read from FILE (a trailing newline ignored); or env CHATSESSION_TOKEN",
    )


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    def command(name: str, description: str) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"chatsession {name}", description=description, epilog=EPILOG)
        _connection_options(parser, defaults=False)
        return parser

    create = command("create", "Create a session and print its id.")
    create.add_argument("--user", required=True, help="the owner's user id")
    create.add_argument("--id", default="", help="session id (default: the server makes one)")
    create.add_argument("--title", default="")
    create.add_argument("--model", default="")
    create.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="repeatable; KEY is 1-128 characters from [A-Za-z0-9._/-], not forked_from",
    )
    create.add_argument(
        "--ttl", type=int, default=0, metavar="SECONDS", help="expiry (default: the server's; -1: never)"
    )
    create.add_argument("--max-messages", type=int, default=0, help="window size (default: the server's)")
    create.add_argument("--request-id", help="idempotency key (default: a fresh one)")
    create.add_argument("--app", default="", help="the app (namespace) the session belongs to, for good")

    append = command("append", "Append one message and print its seq.")
    append.add_argument("session")
    append.add_argument(
        "content", nargs="?", default="-", help="the message (default or '-': stdin, less its final newline)"
    )
    append.add_argument("--role", default="user", choices=["system", "user", "assistant", "tool"])
    append.add_argument("--tokens", type=int, default=0)
    append.add_argument("--name", default="")
    append.add_argument(
        "--payload",
        type=_json_value,
        default=_NO_PAYLOAD,
        help="the message's payload: any JSON value, stored and returned as given",
    )
    append.add_argument("--request-id", help="idempotency key (default: a fresh one)")
    append.add_argument("--expected-last-seq", type=int, help="append only if this is the last seq")
    _state_change_options(append, "state-", "with the message: ")

    show = command("show", "A session's metadata and its stored messages.")
    show.add_argument("session")

    ls = command(
        "ls", "A user's live sessions (of one app, with --app), or an app's (--app alone), newest first."
    )
    ls.add_argument("--user", help="the user whose sessions to list (required without --app)")
    ls.add_argument("--app", help="only sessions of this app; without --user, every user's")
    ls.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")

    tail = command("tail", "The newest messages; with -f, then each new one as it comes.")
    tail.add_argument("session")
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many of the newest (default 10)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep following until interrupted")

    context = command(
        "context", "What a prompt is built from: the pinned prompt, the summary, the newest messages."
    )
    context.add_argument("session")
    context.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="the newest messages that fit this many tokens (default: all)",
    )

    fork = command("fork", "Copy a session into a new one of the same user and print its id.")
    fork.add_argument("session")
    fork.add_argument("--at-seq", type=int, help="copy up to and including this seq (default: all)")
    fork.add_argument("--new-id", default="", help="the new session's id (default: the server makes one)")
    fork.add_argument("--request-id", help="idempotency key (default: a fresh one)")

    clear = command("clear", "Empty a session's history and summary; the session and its counters stay.")
    clear.add_argument("session")
    clear.add_argument("--keep-system-prompt", action="store_true", help="keep the pinned system prompt")

    truncate = command(
        "truncate",
        "Remove the newest messages: those after --after-seq (0: all, the prompt too), or the newest "
        "--pop N. Seqs are never reused: the next message appended gets the session's message_count + 1.",
    )
    truncate.add_argument("session")
    which = truncate.add_mutually_exclusive_group(required=True)
    which.add_argument("--after-seq", type=int, help="keep the messages up to and including this seq")
    which.add_argument("--pop", type=int, metavar="N", help="remove the newest N stored messages")
    truncate.add_argument(
        "--expected-last-seq", type=int, help="only if the session's last seq (message_count) is this"
    )
    truncate.add_argument("--show-removed", action="store_true", help="print the removed messages")
    truncate.add_argument("--request-id", help="idempotency key (default: a fresh one)")

    pop = command("pop", "Remove the newest stored message and print it (nothing when there is none).")
    pop.add_argument("session")

    usage = command("usage", "Messages, tokens and sessions a user created: in total, per model, per day.")
    usage.add_argument("--user", required=True)

    state = command(
        "state",
        "A session's state (or with --user or --app, the one a user's or an app's sessions share): "
        "print it, or change "
        "it with --set and --remove (in one step) and print it after.",
    )
    state.add_argument("session", nargs="?", help="the session (or --user)")
    state.add_argument("--user", help="the user whose shared state to read or change")
    state.add_argument("--app", help="the app whose shared state to read or change")
    state.add_argument("--key", action="append", default=[], help="repeatable; print only these keys")
    _state_change_options(state, "", "")

    rm = command("rm", "Delete a session.")
    rm.add_argument("session")
    rm.add_argument("--allow-missing", action="store_true", help="succeed if it does not exist")
    return {
        "create": create,
        "append": append,
        "show": show,
        "ls": ls,
        "tail": tail,
        "context": context,
        "fork": fork,
        "clear": clear,
        "truncate": truncate,
        "pop": pop,
        "usage": usage,
        "state": state,
        "rm": rm,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    commands = _command_parsers()
    parser = argparse.ArgumentParser(
        prog="chatsession",
        description="Command-line client of a chatsession server. "
        "'chatsession COMMAND --help' shows a command's options.",
        epilog=EPILOG,
    )
    _connection_options(parser, defaults=True)
    parser.add_argument("command", choices=commands, metavar="{" + ",".join(commands) + "}")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Intermixed: `append SESSION --role assistant TEXT` as well as `append SESSION TEXT --role ...`.
    return commands[args.command].parse_intermixed_args(args.arguments, namespace=args)


def _read(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {option} {path}: {exc.strerror}") from exc


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        token = _read(args.token_file, "--token-file")
        assert token is not None
        return token.decode().rstrip("\r\n")
    return os.environ.get("CHATSESSION_TOKEN") or None


def _client(args: argparse.Namespace) -> SyncSessionClient:
    return SyncSessionClient(
        args.address,
        timeout=args.timeout,
        retry=Retry(deadline=args.timeout),
        token=_token(args),
        tls=args.tls,
        root_certificates=_read(args.tls_ca, "--tls-ca"),
        certificate_chain=_read(args.tls_cert, "--tls-cert"),
        private_key=_read(args.tls_key, "--tls-key"),
    )


def _as_dict(proto: ProtoMessage) -> dict[str, Any]:
    return json_format.MessageToDict(
        proto, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _role(m: Message) -> str:
    return session_pb2.Role.Name(m.role).removeprefix("ROLE_").lower()


def _message_line(m: Message) -> str:
    payload = ""
    if m.HasField("payload"):
        payload = "  payload: " + json.dumps(
            payload_of(m), ensure_ascii=False, separators=(",", ":"), sort_keys=True
        )
    if m.HasField("summarizes"):
        return (
            f"[{m.seq}] {_role(m)} (summary of {m.summarizes.first_seq}-{m.summarizes.last_seq}): {m.content}"
            + payload
        )
    return f"[{m.seq}] {_role(m)}: {m.content}{payload}"


_NO_PAYLOAD: Any = object()


def _json_value(text: str) -> Any:
    """--payload's value: JSON text, parsed, that a payload holds as it is."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
        payload_value(value)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _counts_line(label: str, counts: session_service_pb2.UsageCounts) -> str:
    return f"{label}: {counts.messages} messages, {counts.tokens} tokens, {counts.sessions} sessions"


def _newest(client: SyncSessionClient, session_id: str, count: int) -> list[Message]:
    """The newest `count` messages, oldest first (a page may hold fewer: read backward)."""
    newest: list[Message] = []
    if count <= 0:
        return newest
    page = client.list_messages(session_id, page_size=count)
    while True:
        newest[:0] = page.messages
        if len(newest) >= count or not page.has_more or not page.messages:
            return newest[-count:]
        page = client.list_messages(session_id, page_size=count - len(newest), before_seq=newest[0].seq)


class _Output:
    def __init__(self, json_output: bool, stdout: TextIO) -> None:
        self.json = json_output
        self._stdout = stdout

    def line(self, text: str) -> None:
        self._stdout.write(text + "\n")
        self._stdout.flush()

    def document(self, value: Any) -> None:
        self.line(json.dumps(value, indent=2, ensure_ascii=False))

    def json_line(self, value: Any) -> None:
        self.line(json.dumps(value, ensure_ascii=False))

    def session(self, session: Session) -> None:
        for key, value in _as_dict(session).items():
            self.line(f"{key}: {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}")


def _labels(pairs: Iterable[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _run(args: argparse.Namespace, client: SyncSessionClient, out: _Output, stdin: TextIO) -> None:
    if args.command == "create":
        session = client.create_session(
            args.user,
            session_id=args.id,
            model=args.model,
            title=args.title,
            labels=_labels(args.label),
            ttl_seconds=args.ttl,
            max_messages=args.max_messages,
            request_id=args.request_id,
            app=args.app,
        )
        if out.json:
            out.document(_as_dict(session))
        else:
            out.line(session.session_id)
    elif args.command == "append":
        # The newline `echo` or an editor leaves at the end is not part of the message.
        content = stdin.read().removesuffix("\n") if args.content == "-" else args.content
        payload = {} if args.payload is _NO_PAYLOAD else {"payload": args.payload}
        appended = client.append(
            args.session,
            [message(args.role, content, tokens=args.tokens, name=args.name, **payload)],
            request_id=args.request_id,
            expected_last_seq=args.expected_last_seq,
            state_delta=state_delta(_state_values(args.state_set, "--state-set"), args.state_remove)
            if args.state_set or args.state_remove
            else None,
        )
        if out.json:
            out.document(_as_dict(appended))
        else:
            for m in appended.messages:
                out.line(str(m.seq))
    elif args.command == "show":
        session = client.get_session(args.session)
        messages = list(client.iter_messages(args.session))
        if out.json:
            out.document({"session": _as_dict(session), "messages": [_as_dict(m) for m in messages]})
        else:
            out.session(session)
            out.line("")
            for m in messages:
                out.line(_message_line(m))
    elif args.command == "ls":
        sessions: list[Session] = []
        if args.user is None and args.app is None:
            raise UsageError("name a --user, an --app, or both")
        for s in client.iter_sessions(args.user, app=args.app):
            sessions.append(s)
            if len(sessions) == args.limit:
                break
        if out.json:
            out.document({"sessions": [_as_dict(s) for s in sessions]})
        else:
            for s in sessions:
                out.line(f"{s.session_id}\t{s.message_count}\t{s.last_active.ToJsonString()}\t{s.title}")
    elif args.command == "tail":
        _tail(args, client, out)
    elif args.command == "context":
        context = client.get_context(args.session, max_tokens=args.max_tokens)
        if out.json:
            out.document(_as_dict(context))
        else:
            for m in context.messages:
                out.line(_message_line(m))
            left_out = "; older messages left out" if context.truncated else ""
            out.line(f"({context.tokens} tokens{left_out})")
    elif args.command == "fork":
        forked = client.fork_session(
            args.session, at_seq=args.at_seq, new_session_id=args.new_id, request_id=args.request_id
        )
        if out.json:
            out.document(_as_dict(forked))
        else:
            out.line(forked.session.session_id)
    elif args.command == "clear":
        cleared = client.clear_messages(args.session, keep_system_prompt=args.keep_system_prompt)
        if out.json:
            out.document(_as_dict(cleared))
    elif args.command == "truncate":
        truncated = client.truncate_messages(
            args.session,
            args.after_seq,
            pop_count=args.pop or 0,
            expected_last_seq=args.expected_last_seq,
            request_id=args.request_id,
            return_removed=args.show_removed,
        )
        if out.json:
            out.document(_as_dict(truncated))
        else:
            for m in truncated.removed_messages:
                out.line(_message_line(m))
            replayed = " (a retry: removed before)" if truncated.replayed else ""
            ends = f"the history ends at seq {truncated.after_seq}"
            out.line(f"({truncated.removed_count} removed{replayed}; {ends})")
    elif args.command == "pop":
        popped = client.pop_message(args.session)
        if out.json:
            out.document({"message": _as_dict(popped) if popped is not None else None})
        elif popped is not None:
            out.line(_message_line(popped))
    elif args.command == "usage":
        usage = client.get_user_usage(args.user)
        if out.json:
            out.document(_as_dict(usage))
        else:
            out.line(_counts_line("total", usage.total))
            for per_model in usage.models:
                out.line(_counts_line(f"model {per_model.model or '(none)'}", per_model.usage))
            for per_day in usage.days:
                out.line(_counts_line(per_day.day, per_day.usage))
    elif args.command == "state":
        _state(args, client, out)
    elif args.command == "rm":
        client.delete_session(args.session, allow_missing=args.allow_missing)
        if out.json:
            out.document({"session_id": args.session, "deleted": True})


def _tail(args: argparse.Namespace, client: SyncSessionClient, out: _Output) -> None:
    newest = _newest(client, args.session, args.lines)
    if out.json and not args.follow:
        out.document({"messages": [_as_dict(m) for m in newest]})
        return
    for m in newest:
        if out.json:
            out.json_line({"message": _as_dict(m)})
        else:
            out.line(_message_line(m))
    if not args.follow:
        return
    # After the last message shown; with none shown, from the oldest stored (there was none
    # when we looked: so, everything appended since), or only new ones with -n 0.
    after_seq = newest[-1].seq if newest else (0 if args.lines > 0 else None)
    for event in client.watch(args.session, after_seq=after_seq):
        if out.json:
            out.json_line(_as_dict(event))
        elif event.HasField("message"):
            out.line(_message_line(event.message))
        elif event.HasField("history_trimmed"):
            gone = event.history_trimmed
            out.line(f"[{gone.first_missing_seq}..{gone.last_missing_seq} trimmed by the window]")
        elif event.HasField("compacted"):
            replaced = event.compacted.summarizes
            out.line(f"[{replaced.first_seq}..{replaced.last_seq} compacted into a summary]")
        elif event.HasField("cleared"):
            out.line(f"[history cleared after seq {event.cleared.last_seq}]")
        elif event.HasField("truncated"):
            cut = event.truncated
            out.line(f"[messages after seq {cut.after_seq} removed; seqs go on after {cut.last_seq}]")


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command; the exit code (see EXIT_CODES)."""
    args = _parse(argv)
    stderr = stderr or sys.stderr
    try:
        with _client(args) as client:
            _run(args, client, _Output(args.json, stdout or sys.stdout), stdin or sys.stdin)
    except UsageError as exc:
        stderr.write(f"chatsession: {exc}\n")
        return USAGE_ERROR
    except ChatSessionError as exc:
        stderr.write(f"chatsession: {exc}\n")
        return EXIT_CODES.get(exc.code, 1)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`chatsession tail -f ... | head`): stop quietly, and keep Python's
        # flush at exit from reporting the same broken pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _state_change_options(parser: argparse.ArgumentParser, prefix: str, purpose: str) -> None:
    parser.add_argument(
        f"--{prefix}set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help=f"repeatable; {purpose}set KEY of the state to the JSON value (a bare word is a string)",
    )
    parser.add_argument(
        f"--{prefix}remove", action="append", default=[], metavar="KEY", help=f"repeatable; {purpose}drop KEY"
    )


def _state_values(pairs: Iterable[str], option: str) -> dict[str, Any]:
    """The values --set (or --state-set) KEY=JSON pairs give."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise UsageError(f"{option} {pair!r}: expected KEY=JSON")
        try:
            values[key] = json.loads(text)
        except ValueError:
            values[key] = text  # `--set step=done`: a word is meant as a string
    return values


def _state(args: argparse.Namespace, client: SyncSessionClient, out: _Output) -> None:
    if [args.session, args.user, args.app].count(None) != 2:
        raise UsageError(
            "name one state: a SESSION, --user USER or --app APP (the state their sessions share)"
        )
    values = _state_values(args.set, "--set")
    if not values and not args.remove:
        state = client.get_state(args.session, user_id=args.user, app=args.app, keys=args.key or None)
    elif args.key:
        raise UsageError("--key reads part of a state: not with --set or --remove")
    else:
        state = client.update_state(args.session, values, remove=args.remove, user_id=args.user, app=args.app)
    if out.json:
        out.document({"state": state})
    else:
        for key, value in state.items():
            out.line(f"{key}: {json.dumps(value, ensure_ascii=False)}")
