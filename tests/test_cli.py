"""The `chatsession` command line against a real server: its main() in a thread (the server runs
on the test's event loop), and the installed console script as a subprocess for `tail -f`."""

from __future__ import annotations

import asyncio
import io
import json
import queue
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from glide import GlideClient

from chatsession_client import SessionClient, assistant, system, user
from chatsession_client.cli import main
from chatsession_server.settings import Settings
from tests.helpers import serving, stored_messages
from tests.pki import CertificateAuthority, Issued


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def cli(*argv: str, stdin: str = "") -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


async def test_create_append_show_ls_tail_rm_with_json(target: str, raw: GlideClient, uid: str) -> None:
    base = ("--address", target, "--json")
    created = await cli(*base, "create", "--user", uid, "--title", "Oslo", "--label", "team=travel")
    assert created.code == 0, created.err
    session = created.json()
    session_id = session["session_id"]
    assert (session["user_id"], session["title"], session["labels"]) == (uid, "Oslo", {"team": "travel"})

    appended = await cli(*base, "append", session_id, "You are terse.", "--role", "system", "--tokens", "4")
    assert appended.json()["messages"][0]["seq"] == "1"  # int64 is a string in protobuf's JSON
    from_stdin = await cli(*base, "append", session_id, stdin="Hotels in Oslo?\n")
    assert from_stdin.json()["messages"][0]["content"] == "Hotels in Oslo?"  # without echo's newline
    assert [m["content"] for m in await stored_messages(raw, session_id)] == [
        "You are terse.",
        "Hotels in Oslo?",
    ]

    shown = (await cli(*base, "show", session_id)).json()
    assert shown["session"]["message_count"] == "2"
    assert [(m["role"], m["seq"]) for m in shown["messages"]] == [("ROLE_SYSTEM", "1"), ("ROLE_USER", "2")]
    listed = (await cli("--address", target, "ls", "--user", uid, "--json")).json()  # options after, too
    assert [s["session_id"] for s in listed["sessions"]] == [session_id]
    tail = (await cli(*base, "tail", "-n", "1", session_id)).json()
    assert [m["seq"] for m in tail["messages"]] == ["2"]

    removed = await cli(*base, "rm", session_id)
    assert removed.json() == {"session_id": session_id, "deleted": True}
    assert await stored_messages(raw, session_id) == []
    gone = await cli(*base, "show", session_id)
    assert gone.code == 4
    assert gone.out == ""
    assert gone.err.count("\n") == 1
    assert gone.err.startswith("chatsession: NOT_FOUND: ")


async def test_text_output(target: str, uid: str) -> None:
    session_id = (await cli("--address", target, "create", "--user", uid)).out.strip()
    assert (await cli("--address", target, "append", session_id, "first")).out == "1\n"
    await cli("--address", target, "append", session_id, "--role", "assistant", "second")
    tail = await cli("--address", target, "tail", session_id)
    assert tail.out == "[1] user: first\n[2] assistant: second\n"
    listed = await cli("--address", target, "ls", "--user", uid)
    assert listed.out.split("\t")[:2] == [session_id, "2"]


async def test_context_fork_clear_usage_with_json(
    client: SessionClient, target: str, raw: GlideClient, uid: str
) -> None:
    base = ("--address", target, "--json")
    session = await client.create_session(uid, model="m1")
    sid = session.session_id
    opening = [
        system("be brief", tokens=2),
        user("a", tokens=3),
        assistant("b", tokens=4),
        user("c", tokens=5),
    ]
    await client.append(sid, opening)

    context = (await cli(*base, "context", sid, "--max-tokens", "7")).json()
    assert [m["seq"] for m in context["messages"]] == ["1", "4"]
    assert (context["tokens"], context["truncated"]) == ("7", True)

    forked = await cli(*base, "fork", sid, "--at-seq", "3", "--new-id", f"{uid}-f")
    assert forked.code == 0, forked.err
    assert forked.json()["replayed"] is False
    assert (forked.json()["session"]["session_id"], forked.json()["session"]["message_count"]) == (
        f"{uid}-f",
        "3",
    )
    assert [m["content"] for m in await stored_messages(raw, f"{uid}-f")] == ["be brief", "a", "b"]

    usage = (await cli(*base, "usage", "--user", uid)).json()
    assert usage["total"] == {"messages": "4", "tokens": "14", "sessions": "2"}
    assert [m["model"] for m in usage["models"]] == ["m1"]

    cleared = (await cli(*base, "clear", sid, "--keep-system-prompt")).json()
    assert (cleared["session_id"], cleared["message_count"]) == (sid, "4")  # the counters stay
    assert [m["content"] for m in await stored_messages(raw, sid)] == ["be brief"]


async def test_text_output_of_context_fork_clear_usage(client: SessionClient, target: str, uid: str) -> None:
    session = await client.create_session(uid)
    sid = session.session_id
    await client.append(sid, [system("be brief", tokens=2), user("a", tokens=3), user("b", tokens=4)])
    await client.compact_messages(sid, 2, assistant("asked a", tokens=1))

    context = await cli("--address", target, "context", sid)
    assert (
        context.out
        == "[1] system: be brief\n[2] assistant (summary of 2-2): asked a\n[3] user: b\n(7 tokens)\n"
    )
    forked = await cli("--address", target, "fork", sid)
    fork_id = forked.out.strip()
    assert (await client.get_session(fork_id)).labels["forked_from"] == sid
    usage = await cli("--address", target, "usage", "--user", uid)
    assert usage.out.splitlines()[:2] == [
        "total: 3 messages, 9 tokens, 2 sessions",
        "model (none): 3 messages, 9 tokens, 2 sessions",
    ]
    assert (await cli("--address", target, "clear", sid)).out == ""
    assert (await client.get_context(sid)).messages == []


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["append", "{s}", ""], 3, "INVALID_ARGUMENT: "),  # an empty message
        (["append", "{s}", "late", "--expected-last-seq", "0"], 5, "FAILED_PRECONDITION: "),
        (["create", "--user", "{u}", "--id", "{s}"], 5, "ALREADY_EXISTS: "),
        (["create", "--user", "{u}", "--label", "no-equals-sign"], 2, "--label 'no-equals-sign'"),
        (["--token-file", "/nonexistent/token", "ls", "--user", "{u}"], 2, "cannot read --token-file"),
        (["fork", "{s}", "--at-seq", "9"], 5, "FAILED_PRECONDITION: "),  # beyond the last seq
        (["context", "{s}", "--max-tokens", "-1"], 3, "INVALID_ARGUMENT: "),
        (["clear", "missing-{s}"], 4, "NOT_FOUND: "),
    ],
)
async def test_errors_are_one_line_and_an_exit_code_per_status_class(
    client: SessionClient, target: str, uid: str, argv: list[str], code: int, says: str
) -> None:
    session = await client.create_session(uid)
    await client.append(session.session_id, [user("one")])
    result = await cli("--address", target, *(a.format(s=session.session_id, u=uid) for a in argv))
    assert (result.code, result.out) == (code, "")
    assert result.err.count("\n") == 1
    assert says in result.err


async def test_tail_follow_prints_json_lines_until_the_session_is_deleted(
    client: SessionClient, target: str, uid: str
) -> None:
    session = await client.create_session(uid)
    await client.append(session.session_id, [user("old"), user("recent")])
    script = Path(sys.executable).parent / "chatsession"
    process = await asyncio.create_subprocess_exec(
        str(script),
        *("--address", target, "--json", "tail", "-f", "-n", "1", session.session_id),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None

    async def next_line() -> Any:
        assert process.stdout is not None
        return json.loads(await asyncio.wait_for(process.stdout.readline(), 30))

    try:
        assert (await next_line())["message"]["content"] == "recent"
        await client.append(session.session_id, [user("live")])
        live = await next_line()
        assert (live["message"]["seq"], live["message"]["content"]) == ("3", "live")
        await client.delete_session(session.session_id)
        assert await asyncio.wait_for(process.wait(), 30) == 4
        assert (await process.stderr.read()).decode().startswith("chatsession: NOT_FOUND: ")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class Lines(io.StringIO):
    """A stdout whose lines a test can wait for, one by one, while the command still runs."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: queue.Queue[str] = queue.Queue()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.put(line)
        return len(text)

    async def next(self) -> str:
        return await asyncio.to_thread(self.lines.get, timeout=30)


async def test_truncate_and_pop_print_what_they_removed(client: SessionClient, target: str, uid: str) -> None:
    session = await client.create_session(uid)
    sid = session.session_id
    await client.append(sid, [system("Be brief."), user("one"), user("two"), user("three")])
    cut = await cli("--address", target, "truncate", sid, "--after-seq", "2", "--show-removed")
    assert (cut.code, cut.out.splitlines()) == (
        0,
        ["[3] user: two", "[4] user: three", "(2 removed; the history ends at seq 2)"],
    )
    popped = await cli("--address", target, "--json", "pop", sid)
    assert popped.json()["message"]["content"] == "one"
    assert (await cli("--address", target, "pop", sid)).out == "[1] system: Be brief.\n"
    assert (await cli("--address", target, "--json", "pop", sid)).json() == {"message": None}
    with pytest.raises(SystemExit):  # argparse: one of the two
        await cli("--address", target, "truncate", sid, "--after-seq", "0", "--pop", "1")
    ahead = await cli("--address", target, "truncate", sid, "--after-seq", "9")
    assert (ahead.code, ahead.err) == (
        5,
        "chatsession: FAILED_PRECONDITION: after_seq 9 is beyond the session's last seq 4\n",
    )
    pops = await cli("--address", target, "--json", "truncate", sid, "--pop", "3")
    assert pops.json()["session"]["message_count"] == "4"


async def test_tail_follow_says_in_text_when_messages_were_compacted_or_cleared(
    client: SessionClient, target: str, uid: str
) -> None:
    session = await client.create_session(uid)
    sid = session.session_id
    await client.append(sid, [user("old"), user("recent")])
    out = Lines()
    argv = ["--address", target, "tail", "-f", "-n", "1", sid]
    following = asyncio.create_task(asyncio.to_thread(main, argv, stdout=out, stderr=io.StringIO()))
    try:
        assert await out.next() == "[2] user: recent"
        await client.append(sid, [user("live")])
        assert await out.next() == "[3] user: live"  # the watch is live: the next events are too
        await client.compact_messages(sid, 3, assistant("three messages"))
        assert await out.next() == "[1..3 compacted into a summary]"
        await client.clear_messages(sid)
        assert await out.next() == "[history cleared after seq 3]"
        await client.append(sid, [user("four"), user("five")])
        assert await out.next() == "[4] user: four"
        assert await out.next() == "[5] user: five"
        await client.truncate_messages(sid, 4)
        assert await out.next() == "[messages after seq 4 removed; seqs go on after 5]"
        await client.delete_session(sid)
        assert await asyncio.wait_for(following, 30) == 4
    finally:
        if not following.done():
            await client.delete_session(sid, allow_missing=True)
            await asyncio.wait_for(following, 30)


TOKEN = "cli-token-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, Issued, Issued, Path]:
    directory = tmp_path_factory.mktemp("cli-pki")
    ca = CertificateAuthority(directory, "ca")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    return ca, ca.issue("server", server=True), ca.issue("svc-cli"), token_file


@pytest.fixture
async def mtls_target(
    settings: Settings,
    valkey_url: str,
    client_pki: tuple[CertificateAuthority, Issued, Issued, Path],
    uid: str,
) -> AsyncIterator[str]:
    ca, server, _, token_file = client_pki
    tokens = token_file.parent / "tokens"
    tokens.write_text(f"{TOKEN} {uid}\n")
    async with serving(
        settings,
        valkey_url,
        tls_cert=str(server.cert),
        tls_key=str(server.key),
        tls_client_ca=str(ca.cert),
        auth_tokens_file=str(tokens),
    ) as running:
        yield f"127.0.0.1:{running.port}"


async def test_tls_client_certificate_and_token_options(
    mtls_target: str, client_pki: tuple[CertificateAuthority, Issued, Issued, Path], uid: str
) -> None:
    ca, _, identity, token_file = client_pki
    tls = ["--address", mtls_target, "--tls-ca", str(ca.cert)]
    tls += ["--tls-cert", str(identity.cert), "--tls-key", str(identity.key)]
    created = await cli(*tls, "--token-file", str(token_file), "--json", "create", "--user", uid)
    assert created.code == 0, created.err
    assert created.json()["user_id"] == uid
    anonymous = await cli(*tls, "ls", "--user", uid)  # a certificate the tokens file does not name
    assert anonymous.code == 6
    assert anonymous.err.startswith("chatsession: UNAUTHENTICATED: ")


async def test_append_with_a_payload_shows_it_and_refuses_what_json_cannot_hold(
    target: str, raw: GlideClient, uid: str
) -> None:
    created = await cli("--address", target, "create", "--user", uid)
    session_id = created.out.strip()
    payload = '{"call": {"x": 0.30000000000000004, "n": [1, null, true]}}'
    appended = await cli("--address", target, "append", session_id, "hi", "--payload", payload)
    assert appended.code == 0, appended.err
    (stored,) = await stored_messages(raw, session_id)
    assert json.loads(stored["payload"]) == json.loads(payload)
    shown = await cli("--address", target, "show", session_id)
    assert '[1] user: hi  payload: {"call":{"n":[1,null,true],"x":0.30000000000000004}}' in shown.out
    for bad in ("{oops", "NaN", str(2**53 + 1)):
        # A usage error, as argparse reports one: exit status 2, before any call.
        with pytest.raises(SystemExit) as exited:
            await cli("--address", target, "append", session_id, "x", "--payload", bad)
        assert exited.value.code == 2
    assert len(await stored_messages(raw, session_id)) == 1
