"""Shared test set-up: GPU tests skip themselves where there is no CUDA GPU; every test starts from one seed.

Markers (declared in pyproject.toml): `gpu` needs a CUDA GPU; `slow` takes more than a few seconds on
the CPU machine and still runs in CI (`bash .ci/run` runs everything; `-m "not slow"` for a quick pass).
"""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Random inputs drawn without an explicit generator are the same in every run and in any test order."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_compiler_state():
    """Every test starts with no Dynamo cache and an empty flagtree report (and leaves none)."""
    import flagtree_py

    torch._dynamo.reset()
    flagtree_py.clear_report()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test compiles into a cache of its own: no hit from another test, nothing left in the
    user's cache directory (tests of the cache itself compile twice on purpose)."""
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path_factory.mktemp("flagtree-cache")))
