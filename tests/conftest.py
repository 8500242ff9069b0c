"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tests use tiny models, which gain nothing from intra-op threads; on a shared, oversubscribed CPU
    # OpenMP's spin-waits make each tiny op up to ~100x slower. Subprocesses (bench workers, DDP) set their own.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
