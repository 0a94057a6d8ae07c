"""The README is true where a test can tell: its generated tables are current (`make docs` writes
them) and its first snippet runs as written."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_tables_in_the_readme_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "tools/readme_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


async def test_the_first_session_snippet_runs_as_a_script(target: str) -> None:
    """The README's first Python snippet, run as it is written (a script), against a real server."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## A first session") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    script = code.group(1).replace("localhost:50051", target)
    # Asynchronous on purpose: the server under test runs on this very event loop.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines()[0] == "['You are a travel agent.', 'Hotels?']"
