"""Settings from flags and environment; Valkey URL parsing."""

from __future__ import annotations

import pytest

from chatsession_server.settings import Settings, ValkeyAddress


def test_flags_win_over_environment_over_defaults() -> None:
    env = {"CHATSESSION_LISTEN": "0.0.0.0:6000", "CHATSESSION_DEFAULT_TTL_SECONDS": "120"}
    s = Settings.from_sources(["--default-ttl-seconds", "60"], env)
    assert s.listen == "0.0.0.0:6000"
    assert s.default_ttl_seconds == 60
    assert s.max_content_bytes == 256 * 1024


def test_valkey_url_forms() -> None:
    a = ValkeyAddress.parse("valkeys://bob:s%40cret@db.example:6380/3")
    assert (a.host, a.port, a.use_tls, a.username, a.password, a.database) == (
        "db.example", 6380, True, "bob", "s@cret", 3,
    )  # fmt: skip
    assert "s@cret" not in repr(a)
    assert "s@cret" not in a.redacted()
    assert ValkeyAddress.parse("valkey://localhost").port == 6379
    with pytest.raises(ValueError, match="valkey://"):
        ValkeyAddress.parse("http://localhost")


def test_secrets_stay_out_of_repr() -> None:
    s = Settings(valkey_url="valkey://:hunter2@h:1", page_token_key="k3y")
    assert "hunter2" not in repr(s)
    assert "k3y" not in repr(s)


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(SystemExit):
        Settings.from_sources(["--listen", "nonsense"], {})
    with pytest.raises(SystemExit):
        Settings.from_sources([], {"CHATSESSION_DEFAULT_TTL_SECONDS": "abc"})
