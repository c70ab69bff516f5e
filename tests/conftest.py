"""Fixtures shared by the test modules."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored afterwards.

    These tiny convolutions and matmuls are up to ~30x slower in CPU time with 2 threads on a loaded
    2-core machine (OpenMP threads spin), so one thread is both faster and kinder to concurrent jobs.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
