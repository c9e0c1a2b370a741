"""Fixtures shared by every test: the real data made by others, and deterministic seeds."""
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("ERASEKIT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (real images, masks, triplets, videos); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set ERASEKIT_SHARED_DATA)")
    return SHARED_DATA
