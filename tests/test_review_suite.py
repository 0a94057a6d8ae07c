"""Review of 18dec5e: the suite's own markers."""

from __future__ import annotations

import pytest

from tests import test_telemetry


@pytest.mark.xfail(
    strict=True,
    reason="18dec5e put @pytest.mark.standalone_only on the new helper _two_free_ports instead of "
    "the test below it, so the 2-worker metrics test now also runs (again) in the cluster pass",
)
def test_review_the_worker_metrics_test_keeps_its_standalone_marker() -> None:
    marks = getattr(test_telemetry.test_each_worker_serves_its_own_metrics, "pytestmark", [])
    assert "standalone_only" in [mark.name for mark in marks]
