"""Found in review: a Valkey URL whose password has an unescaped '/' (common in base64 secrets) or
a scheme typo put (part of) the password into the one-line start-up error."""

from __future__ import annotations

import pytest

from chatsession_server.settings import ValkeyAddress


def test_a_password_may_hold_a_slash() -> None:
    address = ValkeyAddress.parse("valkey://app:Zm9vYmFy/cXV4@valkey.internal:6379/2")
    assert (address.host, address.port, address.database) == ("valkey.internal", 6379, 2)
    assert address.password == "Zm9vYmFy/cXV4"
    assert "Zm9v" not in address.redacted()


@pytest.mark.parametrize(
    "url",
    [
        "valkey:/app:Zm9vYmFycXV4@valkey.internal:6379",
        "valkey://app:Zm9vYmFycXV4@valkey.internal:port",
        "valkey://app:Zm9vYmFycXV4@:6379",
        "valkey://app:Zm9vYmFycXV4@valkey.internal:6379/zero",
    ],
)
def test_a_bad_valkey_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="Valkey URL") as info:
        ValkeyAddress.parse(url)
    assert "Zm9v" not in str(info.value)
