"""Settings from flags and environment; Valkey URL parsing (a URL without its host never shows its
password)."""

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


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--log-level", "nonsense"], {}, "log_level must be one of DEBUG, INFO, WARNING, ERROR"),
        (["--listen", "127.0.0.1:65536"], {}, "listen port must be 0..65535, got 65536"),
        (["--listen", "127.0.0.1:-1"], {}, "listen port must be 0..65535, got -1"),
        (["--listen", "127.0.0.1"], {}, "listen must be HOST:PORT"),
        (["--listen", "[::1:50051"], {}, "listen must be HOST:PORT"),
        (["--listen", ":50051"], {}, "listen must be HOST:PORT"),
        (["--workers", "-1"], {}, "workers must be 0"),
        (["--workers", "two"], {}, "argument --workers: invalid int value: 'two'"),
        ([], {"CHATSESSION_WORKERS": "two"}, "CHATSESSION_WORKERS: invalid literal"),
        (["--valkey-startup-timeout", "0"], {}, "valkey_startup_timeout must be positive"),
        (["--grace-seconds", "-1"], {}, "grace_seconds must not be negative"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_configuration_errors_are_one_line_and_exit_2(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        Settings.from_sources(argv, env)
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("chatsession-server: error: ")
    assert message in line


def test_workers_and_startup_wait_come_from_flags_or_environment() -> None:
    s = Settings.from_sources(["--valkey-startup-timeout", "2.5"], {"CHATSESSION_WORKERS": "0"})
    assert (s.workers, s.valkey_startup_timeout) == (0, 2.5)
    assert (s.listen_host, s.listen_port) == ("127.0.0.1", 50051)
    assert Settings(listen="[::]:0").listen_host == "[::]"


@pytest.mark.parametrize("url", ["valkey://default:Zm9vYmFycXV4", "valkeys://:Zm9vYmFycXV4/0"])
def test_a_valkey_url_without_a_host_never_shows_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="Valkey URL") as info:
        ValkeyAddress.parse(url)
    assert "Zm9v" not in str(info.value)
