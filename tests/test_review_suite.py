"""Review of 18dec5e: the suite's own markers."""

from __future__ import annotations

from tests import test_telemetry


def test_review_the_worker_metrics_test_keeps_its_standalone_marker() -> None:
    marks = getattr(test_telemetry.test_each_worker_serves_its_own_metrics, "pytestmark", [])
    assert "standalone_only" in [mark.name for mark in marks]
