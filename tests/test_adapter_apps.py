"""The framework adapters as applications use them: the README's examples (an OpenAI Agents SDK
runner with a custom offline Model, a LangChain RunnableWithMessageHistory with
GenericFakeChatModel) run as processes against the suite's server, and a second process, the
application restarted, goes on with the conversation the first one stored. The client installed
with its three extras beside google-adk 2.13 passes `pip check` and runs the same examples, and
the ADK one (whose own tests run in .venv-adk: tests/adk/)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import CLIENT, fresh_venv, run_in, venv_env
from tests.processes import ROOT

README = ROOT / "README.md"
CLIENT_README = CLIENT / "README.md"


def example(readme: Path, heading: str) -> str:
    """The first Python block under `heading` in `readme`."""
    text = readme.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, heading
    return code.group(1)


AGENTS = example(README, "### OpenAI Agents SDK")
LANGCHAIN = example(README, "### LangChain")
ADK = example(README, "### Google ADK")


def as_run_here(script: str, target: str, uid: str) -> str:
    """The example against the suite's server, for a user and session of this test's own."""
    script = script.replace("localhost:50051", target).replace('user_id="ada"', f'user_id="{uid}"')
    return re.sub(r'"(chat-ada-\d)"', rf'"{uid}-\1"', script)


async def run_app(python: str | Path, script: str, argument: str, cwd: Path) -> str:
    """One run of the application: a process of its own (the suite's server answers on this
    process's event loop, hence asynchronous), its standard output."""
    proc = await asyncio.create_subprocess_exec(
        str(python), "-c", script, argument,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=venv_env(), cwd=cwd,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def agents_conversation(python: str | Path, target: str, uid: str, cwd: Path) -> None:
    script = as_run_here(AGENTS, target, uid)
    assert await run_app(python, script, "My name is Ada.", cwd) == "Nice to meet you."
    # The application restarted: only the session remembers the first turn.
    assert await run_app(python, script, "What is my name?", cwd) == "You first said: My name is Ada."


async def langchain_conversation(python: str | Path, target: str, uid: str, cwd: Path) -> None:
    script = as_run_here(LANGCHAIN, target, uid)
    assert await run_app(python, script, "Where is Oslo?", cwd) == "['Where is Oslo?', 'Noted.']"
    assert await run_app(python, script, "And Bergen?", cwd) == (
        "['Where is Oslo?', 'Noted.', 'And Bergen?', 'Noted.']"
    )


def test_both_readmes_show_the_same_examples() -> None:
    assert example(CLIENT_README, "### OpenAI Agents SDK") == AGENTS
    assert example(CLIENT_README, "### LangChain") == LANGCHAIN
    assert example(CLIENT_README, "### Google ADK") == ADK
    assert "Runner.run(agent" in AGENTS
    assert "session=session" in AGENTS
    assert "RunnableWithMessageHistory(" in LANGCHAIN
    assert "GenericFakeChatModel" in LANGCHAIN


async def test_an_agents_conversation_survives_a_restart_of_the_app(
    target: str, uid: str, tmp_path: Path
) -> None:
    await agents_conversation(sys.executable, target, uid, tmp_path)


async def test_a_langchain_conversation_survives_a_restart_of_the_app(
    target: str, uid: str, tmp_path: Path
) -> None:
    await langchain_conversation(sys.executable, target, uid, tmp_path)


# The install is the same whichever Valkey the server keeps its sessions in.
@pytest.mark.standalone_only
@pytest.mark.timeout(420)
async def test_the_adapters_install_beside_google_adk_and_run_from_the_install(
    tmp_path: Path, target: str, uid: str
) -> None:
    venv = await asyncio.to_thread(
        fresh_venv,
        tmp_path / "venv",
        "google-adk==2.13.0",
        client=f"{CLIENT}[openai-agents,langchain,adk]",
        timeout=420,
    )
    python = venv / "bin" / "python"
    run_in(venv, python, "-m", "pip", "check")
    await agents_conversation(python, target, f"{uid}a", venv)
    await langchain_conversation(python, target, f"{uid}l", venv)
    # The ADK session service from the install too (tests/adk/ runs it from .venv-adk, editable).
    adk = ADK.replace("localhost:50051", target).replace('"ada"', f'"{uid}k"')
    assert await run_app(python, adk, "My name is Ada.", venv) == "Nice to meet you."
    assert await run_app(python, adk, "What is my name?", venv) == "You first said: My name is Ada."
