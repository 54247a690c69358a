"""Fixtures shared by the search tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread during the test, restored after it.

    The digits runs do tiny matmuls: one thread avoids oversubscription when the suite
    runs with ``-n 2``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
