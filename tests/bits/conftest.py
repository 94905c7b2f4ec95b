"""The bits tests keep the latency microbenchmarks' cache out of the user's (~/.cache/edgeprune): one folder
for the session, so tests that time real shapes share it; tests that check the cache set their own."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def _microbench_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("microbench")


@pytest.fixture(autouse=True)
def _session_microbench_cache(_microbench_cache, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(_microbench_cache))
