import atexit
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings

import rank_pool

# The suite runs the configuration users run: the autotuner on (its default), from a fresh disk
# cache: a private directory per test session, never the user's, shared by the session's
# processes (set here, before any rank pool or subprocess starts, so that they inherit it).
# No test depends on what the tuner picks: every pick computes the same result to float
# reassociation. A test that needs tuning off says why, where it turns it off.
os.environ["TINYMEG_CACHE_DIR"] = _cache_dir = tempfile.mkdtemp(prefix="tinymeg-test-cache-")
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

# Multi-rank examples cost ~0.1-1 s each; a few per property keep the suite in minutes.
settings.register_profile("tinymeg", max_examples=int(os.environ.get("TINYMEG_EXAMPLES", 8)),
                          deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("tinymeg")


@pytest.fixture
def fresh_tuner(monkeypatch, tmp_path):
    """Tuning on (the default), nothing forced, a private cache, whatever the caller's environment
    says, and a fresh default tuner (one that has made no choice yet, so it reads this environment)."""
    import tinymeg as tm
    from tinymeg.ops.autotune import RuntimeAutoTuner
    monkeypatch.delenv("TINYMEG_AUTOTUNE", raising=False)
    monkeypatch.delenv("TINYMEG_OP_IMPL", raising=False)
    monkeypatch.setenv("TINYMEG_CACHE_DIR", str(tmp_path / "cache"))
    previous = tm.ops.set_default_tuner(RuntimeAutoTuner())
    yield
    tm.ops.set_default_tuner(previous)


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    rank_pool.close_all()
