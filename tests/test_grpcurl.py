"""A real grpcurl against the running server, through reflection (no proto files)."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
from pathlib import Path

from chatsession_client import SessionClient, assistant, system, user
from tests.helpers import grpcurl


async def test_list_describe_and_call(target: str, uid: str) -> None:
    code, out = await grpcurl("-plaintext", target, "list")
    assert code == 0, out
    assert "chatsession.v1.SessionService" in out.split()
    assert "grpc.health.v1.Health" in out.split()

    code, out = await grpcurl("-plaintext", target, "describe", "chatsession.v1.SessionService")
    assert code == 0, out
    for rpc in ("CreateSession", "AppendMessages", "ListMessages", "ListSessions"):
        assert f"rpc {rpc}" in out

    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps({"user_id": uid, "session_id": f"{uid}-g", "title": "via grpcurl"}),
        target, "chatsession.v1.SessionService/CreateSession",
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["session"]["title"] == "via grpcurl"

    body = {"session_id": f"{uid}-g", "messages": [{"role": "ROLE_USER", "content": "hi", "tokens": 2}]}
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps(body), target, "chatsession.v1.SessionService/AppendMessages"
    )
    assert code == 0, out
    assert json.loads(out)["messages"][0]["seq"] == "1"

    code, out = await grpcurl(
        "-plaintext", "-d", '{"session_id":"nope-x"}', target, "chatsession.v1.SessionService/GetSession"
    )
    assert code != 0
    assert "NotFound" in out

    code, out = await grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert code == 0, out
    assert "SERVING" in out


async def test_buf_curl_through_reflection(target: str, uid: str) -> None:
    """The README's `buf curl` recipe: reflection, the gRPC protocol, and rich error details."""
    buf = Path(sys.executable).parent / "buf"
    session_id = f"{uid}-buf"
    for body, rpc in (
        ({"user_id": uid, "session_id": session_id, "title": "via buf"}, "CreateSession"),
        ({"session_id": session_id}, "GetSession"),
    ):
        proc = await asyncio.create_subprocess_exec(
            str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(body),
            f"http://{target}/chatsession.v1.SessionService/{rpc}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["session"]["title"] == "via buf"
    proc = await asyncio.create_subprocess_exec(
        str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", '{"session_id": "nope-x"}',
        f"http://{target}/chatsession.v1.SessionService/GetSession",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    error = json.loads(err)
    assert error["code"] == "not_found"
    assert error["details"][0]["type"] == "google.rpc.ResourceInfo"


def readme_recipes(*methods: str, containing: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The README's first grpcurl command for each of `methods` (whose request holds the text
    `containing[method]`, when given), as argument lists."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    found: dict[str, list[str]] = {}
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        tokens = shlex.split(block.replace("\\\n", " "), comments=True)
        starts = [i for i, token in enumerate(tokens) if token == "grpcurl"]
        for i in starts:
            end = next(j for j in range(i, len(tokens)) if "/" in tokens[j] or j + 1 == len(tokens))
            method = tokens[end].rpartition("/")[2]
            wanted = (containing or {}).get(method, "")
            if method in methods and method not in found and wanted in " ".join(tokens[i : end + 1]):
                found[method] = tokens[i + 1 : end + 1]
    assert set(found) == set(methods), f"README recipes missing: {set(methods) - set(found)}"
    return found


async def test_readme_recipes_for_context_compaction_and_clearing(
    target: str, client: SessionClient, uid: str
) -> None:
    recipes = readme_recipes(
        "GetContext", "CompactMessages", "GetSession", "ClearMessages", containing={"GetSession": "read_mask"}
    )
    session_id = f"{uid}-trip"
    await client.create_session(uid, session_id=session_id)
    await client.append(
        session_id,
        [system("You are a travel agent.", tokens=6), user("Find me a hotel in Oslo.", tokens=7)],
    )
    await client.append(session_id, [assistant("Here are three.", tokens=4), user("The second.", tokens=3)])

    def run(method: str) -> list[str]:
        args = recipes[method]
        return [session_id if a == "trip-42" else target if a == "localhost:50051" else a for a in args]

    def body(method: str) -> list[str]:
        args = run(method)
        at = args.index("-d") + 1
        args[at] = args[at].replace('"trip-42"', json.dumps(session_id))
        return args

    code, out = await grpcurl(*body("GetContext"))
    assert code == 0, out
    assert [m["seq"] for m in json.loads(out)["messages"]] == ["1", "2", "3", "4"]
    code, out = await grpcurl(*body("CompactMessages"))
    assert code == 0, out
    assert json.loads(out)["summary"]["summarizes"] == {"first_seq": "2", "last_seq": "3"}
    code, out = await grpcurl(*body("GetSession"))
    assert code == 0, out
    assert json.loads(out)["session"] == {"token_count": "20"}
    code, out = await grpcurl(*body("ClearMessages"))
    assert code == 0, out
    assert json.loads(out)["session"]["messages_stored"] == "1"


async def test_readme_recipes_for_removing_the_tail(target: str, client: SessionClient, uid: str) -> None:
    rewind = readme_recipes("TruncateMessages", containing={"TruncateMessages": "after_seq"})[
        "TruncateMessages"
    ]
    pop = readme_recipes("TruncateMessages", containing={"TruncateMessages": "pop_count"})["TruncateMessages"]
    session_id = f"{uid}-tail"
    await client.create_session(uid, session_id=session_id)
    await client.append(session_id, [system("You are a travel agent."), user("Oslo?"), user("A"), user("B")])

    def run(args: list[str]) -> list[str]:
        out = [target if a == "localhost:50051" else a for a in args]
        at = out.index("-d") + 1
        out[at] = out[at].replace('"trip-42"', json.dumps(session_id))
        return out

    code, out = await grpcurl(*run(rewind))
    assert code == 0, out
    reply = json.loads(out)
    assert [m["seq"] for m in reply["removed_messages"]] == ["3", "4"]
    assert (reply["removed_count"], reply["after_seq"], reply["session"]["message_count"]) == ("2", "2", "4")
    code, out = await grpcurl(*run(rewind))  # the same request_id: a replay
    assert code == 0, out
    assert json.loads(out)["replayed"] is True
    code, out = await grpcurl(*run(pop))
    assert code == 0, out
    assert [m["content"] for m in json.loads(out)["removed_messages"]] == ["Oslo?"]
    assert [m.seq for m in (await client.list_messages(session_id)).messages] == [1]


async def test_every_recipe_of_the_readme_grpcurl_section_works_in_order(target: str, uid: str) -> None:
    """The README's grpcurl section, run command by command as a reader would (with ids of this
    test's own): each succeeds, and the session it builds ends up deleted."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("## grpcurl") :]
    block = re.search(r"```sh\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    assert block is not None
    # Commands span lines (inside quotes, or after a backslash): split the block's words at "grpcurl".
    words = shlex.split(block.group(1).replace("\\\n", " "), comments=True)
    starts = [i for i, word in enumerate(words) if word == "grpcurl"]
    assert starts[0] == 0
    ran = []
    for start, end in zip(starts, [*starts[1:], len(words)], strict=True):
        args = [
            target if a == "localhost:50051" else a.replace("trip-42", f"{uid}-trip").replace("alice", uid)
            for a in words[start + 1 : end]
        ]
        code, out = await grpcurl(*args)
        assert code == 0, (args, out)
        ran.append(args[-1].rpartition("/")[2])
    assert {"CreateSession", "AppendMessages", "ListMessages", "GetSession", "UpdateSession"} <= set(ran)
    assert ran[-2:] == ["DeleteSession", "Check"]
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps({"session_id": f"{uid}-trip"}), target,
        "chatsession.v1.SessionService/GetSession",
    )  # fmt: skip
    assert code != 0
    assert "NotFound" in out
