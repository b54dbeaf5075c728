"""Shared fixtures: seeds, float64 helpers, the real-data root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyro
import pytest
import torch


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores (pytest -n): one torch thread each, else they
    # oversubscribe the machine and every small op waits.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_clear() -> None:
    """Every test starts from the same seed and an empty Pyro param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny networks: on a shared 2-core machine two threads
    make them ~10x slower (each op is too small to split)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def float64():
    """Run a test in float64 (numerics against closed forms)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The shared real-data root from ``PYROVAE_DATA``; skips the test when it is unset."""
    root = os.environ.get("PYROVAE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("real data not available: set PYROVAE_DATA to the shared data folder")
    return Path(root)


#: Whether torch.compile can build CPU kernels here (inductor needs a C++ compiler).
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile on a CPU needs a C++ compiler")


def assert_close(actual, expected, rtol: float = 1e-7, atol: float = 1e-7, msg: str = "") -> None:
    """One comparison for the whole suite (tensors or numbers)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, msg=(lambda m: f"{msg}: {m}") if msg else None
    )
