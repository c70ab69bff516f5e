"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import torch

# tests/gpu runs the op on an accelerator (`make test-gpu`); it is collected only when a device is named,
# so that the default run on a CPU machine neither skips nor fails it
collect_ignore = [] if os.environ.get("METAFORMER_TEST_DEVICE") else ["gpu"]


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
