import os

import pytest
from hypothesis import HealthCheck, settings

import rank_pool

# Multi-rank examples cost ~0.1-1 s each; a few per property keep the suite in minutes.
settings.register_profile("tinymeg", max_examples=int(os.environ.get("TINYMEG_EXAMPLES", 8)),
                          deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("tinymeg")


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    rank_pool.close_all()
