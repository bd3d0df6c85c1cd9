"""Shared by the test modules: the tests run in parallel (pytest-xdist, see pyproject.toml).

Each worker runs torch on one thread (two workers on two cores would otherwise oversubscribe
them), and `installed_package` keeps the README's `pip install -e .` from reinstalling cocompile
while a test of another worker starts a Python process that imports it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _lock(path, exclusive: bool):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def installed_package(tmp_path_factory):
    """A context manager factory: `with installed_package(reinstall=False):` around starting
    processes that import cocompile (shared), or around reinstalling it (exclusive). The lock file
    lies in the directory every worker's temporary directory is made in."""
    path = tmp_path_factory.getbasetemp().parent / "cocompile-install.lock"
    return lambda reinstall=False: _lock(path, reinstall)
