"""The Lua runtime: how a script is built, called, and its reply's status read.

The contract between the two languages is defined on the Python side, once: each script's KEYS
and ARGV are named (a keys tuple and an argument dataclass whose field order is ARGV's);
`LuaScript` prepends Lua locals of those names, of the reply statuses (`Status`) and of every
name the stored forms and the watch publishes share with Python (`_constants`: codec.py's meta
fields, prefixes, limits and publish letters, keys.py's hash-tag end), then the shared library
(prelude.py). A Lua body refers only to those names for them (what is left literal is the
punctuation between the parts of a value: spaces, commas); Valkey refuses a script that reads an
undefined global, so a name that drifts fails every test that runs the script. `ScriptRunner`
runs the scripts.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from glide import Script

from chatsession_server.domain import RESERVED_LABELS, Owned, Owners, Role
from chatsession_server.store import codec, keys
from chatsession_server.store.lua.prelude import PRELUDE
from chatsession_server.store.valkey import ValkeyConnection


class Status(enum.StrEnum):
    """First element of every script's reply."""

    OK = "ok"
    CREATED = "created"
    REPLAYED = "replayed"
    EXISTS = "exists"
    NOT_FOUND = "not_found"
    REQUEST_ID_REUSED = "request_id_reused"
    SEQ_MISMATCH = "seq_mismatch"
    TOO_MANY_LABELS = "too_many_labels"
    TOO_LARGE = "too_large"
    BEYOND_LAST = "beyond_last"
    TRIMMED = "trimmed"
    OVER_BUDGET = "over_budget"
    REPLY_TOO_LARGE = "reply_too_large"
    UP_TO_SEQ_AHEAD = "up_to_seq_ahead"
    UP_TO_SEQ_IN_PROMPT = "up_to_seq_in_prompt"
    ALREADY_COMPACTED = "already_compacted"
    STATE_FULL = "state_full"

    @classmethod
    def of(cls, reply: Any) -> Status:
        head = reply[0]
        return cls(head.decode() if isinstance(head, bytes) else head)


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _constants() -> str:
    names = [f"ST_{s.name}" for s in Status] + [f"F_{f.name}" for f in codec.MetaField]
    values = [s.value for s in Status] + [f.value for f in codec.MetaField]
    lines = [f"local {n} = {_lua_string(v)}" for n, v in zip(names, values, strict=True)]
    lines += [
        f"local LABEL_PREFIX = {_lua_string(codec.LABEL_FIELD_PREFIX)}",
        "local RESERVED_LABEL_FIELDS = {"
        + "".join(
            f"[{_lua_string(codec.LABEL_FIELD_PREFIX + key)}] = true, " for key in sorted(RESERVED_LABELS)
        )
        + "}",
        f"local SYSTEM_BODY_PREFIX = {_lua_string(codec.body_prefix(Role.SYSTEM))}",
        f"local TOOL_BODY_PREFIX = {_lua_string(codec.body_prefix(Role.TOOL))}",
        f"local SEQ_HEAD = {_lua_string(codec.SEQ_HEAD)}",
        f"local MAX_PINNED = {codec.MAX_PINNED}",
        f"local TIME_FORMAT = {_lua_string(codec.TIME_FORMAT)}",
        f"local USAGE_SEPARATOR = {_lua_string(codec.USAGE_SEPARATOR)}",
        f"local USAGE_TOTAL_PREFIX = {_lua_string(codec.USAGE_TOTAL_PREFIX)}",
        f"local USAGE_DAY_PREFIX = {_lua_string(codec.USAGE_DAY_PREFIX)}",
        f"local USAGE_MODEL_PREFIX = {_lua_string(codec.USAGE_MODEL_PREFIX)}",
        f"local USAGE_PRUNED_FIELD = {_lua_string(codec.USAGE_PRUNED_FIELD)}",
        f"local USAGE_MAX_MODELS = {codec.USAGE_MAX_MODELS}",
        f"local USAGE_OTHER_MODEL = {_lua_string(codec.USAGE_OTHER_MODEL)}",
        f"local USAGE_MODELS_FIELD = {_lua_string(codec.USAGE_MODELS_FIELD)}",
        f"local SEEN_PRUNED_FIELD = {_lua_string(codec.SEEN_PRUNED_FIELD)}",
        f"local TOKENS_HEAD = {_lua_string(codec.TOKENS_HEAD)}",
        f"local REPLY_BYTES_PATTERN = {_lua_string(codec.REPLY_BYTES_PATTERN)}",
        f"local SUMMARIZES_HEAD = {_lua_string(codec.SUMMARIZES_HEAD)}",
        f"local HASH_TAG_END = {_lua_string(keys.HASH_TAG_END)}",
        f"local STATE_BYTES_FIELD = {_lua_string(codec.STATE_BYTES_FIELD)}",
    ]
    lines += [f"local PUBLISH_{kind.name} = {_lua_string(kind.value)}" for kind in codec.PublishKind]
    lines += [f"local USAGE_{m.upper()} = {_lua_string(m)}" for m in codec.USAGE_METRICS]
    return "\n".join(lines) + "\n"


A = TypeVar("A")


def owners_arg(owners: Owned) -> str:
    """The `owners` argument: the user ids whose sessions the caller may touch (None: anyone's),
    and for an `Owners` the apps it is confined to: ' a b ' or '*' (every user), then
    '#|app|app|' (prelude.owned reads it)."""
    if owners is None:
        return ""
    if isinstance(owners, Owners):
        users = "*" if owners.users is None else owners_arg(owners.users)
        return f"{users}#|{'|'.join(sorted(owners.apps))}|"
    return " " + " ".join(sorted(owners)) + " " if owners else " "


class LuaScript(Generic[A]):
    """A Lua script with named KEYS (`keys`) and ARGV (the fields of the dataclass `args`, in
    order). A field typed as a sequence must come last: it fills the rest of ARGV, and the body
    finds its first index as `<name>_from`. Values travel as strings: None is '', a bool is
    '1'/'0', a number its decimal form. Trailing keys may be left out: they are nil in Lua."""

    def __init__(self, keys: tuple[str, ...], args: type[A], body: str, *, read_only: bool = False) -> None:
        self.key_names = keys
        self._fields = [f.name for f in dataclasses.fields(args)]  # type: ignore[arg-type]
        header = [f"local {', '.join(keys)} = {', '.join(f'KEYS[{i + 1}]' for i in range(len(keys)))}"]
        for i, name in enumerate(self._fields):
            if i == len(self._fields) - 1 and _is_sequence(args, name):
                header.append(f"local {name}_from = {i + 1}")
            else:
                header.append(f"local {name} = ARGV[{i + 1}]")
        self.source = (
            ("#!lua flags=no-writes\n" if read_only else "")
            + _constants()
            + "\n".join(header)
            + "\n"
            + PRELUDE
            + body
        )
        self.script = Script(self.source)  # type: ignore[no-untyped-call]

    def keys(self, *names: str) -> list[str]:
        if len(names) > len(self.key_names):
            raise ValueError(f"the script takes at most {len(self.key_names)} keys")
        return list(names)

    def argv(self, args: A) -> list[str]:
        out: list[str] = []
        for name in self._fields:
            value = getattr(args, name)
            if isinstance(value, list | tuple):
                out.extend(value)
            else:
                out.append(_arg(value))
        return out


def _is_sequence(args: type[Any], name: str) -> bool:
    annotation = str(args.__annotations__[name])
    return annotation.startswith(("Sequence[", "list[", "tuple["))


def _arg(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"cannot pass {type(value).__name__} to a script")


class ScriptRunner:
    """Runs scripts on one connection. The store and its owner index share one runner: the one
    place every script goes through (where a test makes a step fail)."""

    def __init__(self, conn: ValkeyConnection) -> None:
        self._conn = conn

    async def run(self, script: LuaScript[A], keys: Sequence[str], args: A) -> Any:
        """The script's reply as Valkey gives it."""
        return await self._conn.script(script.script, script.keys(*keys), script.argv(args))

    async def call(self, script: LuaScript[A], keys: Sequence[str], args: A) -> tuple[Status, Any]:
        """For a script whose reply starts with its Status: that status, and the whole reply."""
        reply = await self._conn.script(script.script, script.keys(*keys), script.argv(args))
        return Status.of(reply), reply
