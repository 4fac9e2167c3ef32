"""Shared fixtures: tiny problems so the default test run stays fast."""

from __future__ import annotations

import pytest

TINY_PROBLEM = {"grid": 16, "n_samples": 60}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from dmdopt.problem import ProblemConfig, load_dataset

    cache = tmp_path_factory.mktemp("data")
    return load_dataset(ProblemConfig(**TINY_PROBLEM), cache_dir=cache, workers=1, progress=False)
