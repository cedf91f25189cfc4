import importlib
import os

import pytest
import torch


def require(module: str):
    """Import an optional dependency, or skip -- except in CI, where a missing one fails.

    `.ci/run` installs every optional dependency and sets CAPTUM_GIG_REQUIRE_OPTIONAL=1,
    so a test that would be skipped for a missing package fails there instead of
    being silently counted as passing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("CAPTUM_GIG_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"optional dependency {module!r} is required in CI: {err}")
        pytest.skip(f"needs {module!r}")


def require_path(path: str) -> str:
    if not os.path.exists(path):
        if os.environ.get("CAPTUM_GIG_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"{path} is required in CI (installed by .ci/run)")
        pytest.skip(f"needs {path}")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
