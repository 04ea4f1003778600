"""Where the tests find the measured data, and what happens when it is not there.

The measured data (nccl-tests logs, vTrain tables, a Kineto trace) lives outside the project, in
``../shared/data`` beside the project root (see its README.md). ``PLANSIM_DATA`` points the tests
at another folder (only the tests read it; the benchmarks and the package do not), which is also
how the missing-data behaviour is checked: ``PLANSIM_DATA=/nonexistent python -m pytest ...``.

A test that reads it asks for the ``data_dir`` fixture (the folder, checked) or carries
``@pytest.mark.needs_data`` (optionally naming sub-folders: ``needs_data("nccl-tests-h100")``).
When the folder is absent such a test is **skipped** on a developer's machine but **fails** when
the environment variable ``CI`` is ``true``: CI runs next to the data, so a missing folder there is
a broken set-up, not a reason to report a green run that checked nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ENV = "PLANSIM_DATA"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_root() -> Path:
    """The measured-data folder: ``$PLANSIM_DATA`` if set, else ``../shared/data``."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_DATA


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require_data(*parts: str) -> Path:
    """``data_root() / parts`` if that folder exists; otherwise skip the test, or fail it under CI=true."""
    path = data_root().joinpath(*parts)
    if path.is_dir():
        return path
    msg = (f"measured data not found: {path} is not a folder (default ../shared/data beside the project; "
           f"set {DATA_ENV} to point elsewhere)")
    if in_ci():
        pytest.fail(f"{msg}. CI=true, so this is a failure, not a skip: the data-dependent tests must run in CI.",
                    pytrace=False)
    pytest.skip(msg)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_data(*subfolders): reads ../shared/data (or $PLANSIM_DATA) and the named sub-folders; "
                   "skipped when absent, failed when CI=true")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_data"):
        require_data(*mark.args)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The measured-data folder (``require_data()``: skips, or fails under CI=true, when it is absent)."""
    return require_data()
