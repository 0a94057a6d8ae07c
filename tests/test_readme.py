"""The README is true where a test can tell: its generated tables are current (`make docs` writes
them) and its Python snippets (the first, and those of the payload, never-expire and
removing-the-tail sections) run as written."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_tables_in_the_readme_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "tools/readme_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


async def run_snippet(target: str, heading: str) -> str:
    """The first Python snippet after `heading`, run as it is written (a script) against a real
    server; its output."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.DOTALL)
    assert code is not None
    script = code.group(1).replace("localhost:50051", target)
    # Asynchronous on purpose: the server under test runs on this very event loop.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_the_first_session_snippet_runs_as_a_script(target: str) -> None:
    out = await run_snippet(target, "## A first session")
    assert out.splitlines()[0] == "['You are a travel agent.', 'Hotels?']"


@pytest.mark.parametrize(
    "heading", ["## Message payloads", "## Sessions that never expire", "## Removing the tail"]
)
async def test_a_sections_python_snippet_runs_as_a_script(target: str, heading: str) -> None:
    await run_snippet(target, heading)
