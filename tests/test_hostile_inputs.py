"""Hostile inputs found in the second review: a Valkey URL without its @host quoted the password,
and an oversized update_mask was copied whole before its size was checked."""

from __future__ import annotations

import tracemalloc

import pytest
from google.protobuf import field_mask_pb2

from chatsession.v1 import session_pb2
from chatsession.v1 import session_service_pb2 as pb
from chatsession_server.api import validation
from chatsession_server.api.limits import Limits
from chatsession_server.errors import InvalidArgument
from chatsession_server.settings import Settings, ValkeyAddress


@pytest.mark.parametrize("url", ["valkey://default:Zm9vYmFycXV4", "valkeys://:Zm9vYmFycXV4/0"])
def test_a_valkey_url_without_a_host_never_shows_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="Valkey URL") as info:
        ValkeyAddress.parse(url)
    assert "Zm9v" not in str(info.value)


def test_an_oversized_update_mask_is_refused_before_its_paths_are_copied() -> None:
    request = pb.UpdateSessionRequest(
        session=session_pb2.Session(session_id="s"),
        update_mask=field_mask_pb2.FieldMask(paths=["ab"] * 1_000_000),
    )
    parsed = pb.UpdateSessionRequest.FromString(request.SerializeToString())  # as gRPC hands it over
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument):
            validation.update_session(parsed, Limits.from_settings(Settings()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024, f"refusing the mask took {peak // (1024 * 1024)} MiB"
