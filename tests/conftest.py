"""Shared by the test modules: the tests run in parallel (pytest-xdist, see pyproject.toml), and
each worker runs torch on one thread (two workers on two cores would otherwise oversubscribe them).
"""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
