"""The ADK adapter's tests (tests/adk/) against this suite's server, standalone and on a cluster.

They run in .venv-adk (`make venv` builds it): google-adk pins opentelemetry-api<=1.44, which
cannot share this virtualenv with the server's OpenTelemetry 1.45."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.helpers import venv_env
from tests.processes import ROOT

ADK_PYTHON = ROOT / os.environ.get("ADK_VENV", ".venv-adk") / "bin" / "python"


@pytest.mark.timeout(600)
async def test_the_adk_session_service_suite_passes_in_its_own_virtualenv(target: str) -> None:
    if not ADK_PYTHON.exists():
        pytest.fail(f"{ADK_PYTHON} is missing: `make venv` builds it")
    proc = await asyncio.create_subprocess_exec(
        str(ADK_PYTHON), "-m", "pytest", "tests/adk", "--confcutdir=tests/adk", "-q",
        "-p", "no:cacheprovider",
        cwd=ROOT, env={**venv_env(), "CHATSESSION_ADK_TARGET": target},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 580)
    report = out.decode()
    assert proc.returncode == 0, report
    assert " passed" in report, report
    assert "skipped" not in report, report
