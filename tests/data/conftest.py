"""Helpers for the data tests: data files on disk and an isolated Arrow cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_cache(tmp_path_factory):
    """Arrow files written by the tests go to a temporary folder, not the user's lorafit cache."""
    import os

    old = os.environ.get("LORAFIT_DATA_CACHE")
    os.environ["LORAFIT_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield
    if old is None:
        os.environ.pop("LORAFIT_DATA_CACHE", None)
    else:
        os.environ["LORAFIT_DATA_CACHE"] = old
