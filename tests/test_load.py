"""The short form of `make loadtest`: concurrent Predict clients and a training client against a real server process."""
from __future__ import annotations

import pytest
from bench.loadtest import run_load
from tests.helpers import start_server

pytestmark = pytest.mark.e2e  # make loadtest's short form


def test_load_has_no_errors_and_no_memory_growth(exported):
    server = start_server("--artifacts", str(exported[0]), "--port", "0")
    try:
        report = run_load(server.address, server.proc.pid, seconds=5, clients=8)
    finally:
        server.stop()
    assert report.errors == []
    assert report.predict_calls > 100 and report.train_steps > 5
    assert report.rss_growth < 0.10, (report.rss_first_mb, report.rss_last_mb)
