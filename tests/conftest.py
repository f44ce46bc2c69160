"""Shared test fixtures: the shared data folder, seeds, thread limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Offline tiktoken and the named data sets come from ../shared/data when it is there.
if SHARED_DATA.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken-cache"))
    os.environ.setdefault("GPTLAB_DATA_DIR", str(SHARED_DATA))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
