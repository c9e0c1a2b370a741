"""Fixtures shared by every test: the real data made by others, and the checkout under test.

``import erasekit`` (here and in any subprocess a test starts) resolves to *this* checkout, whatever editable
install the venv holds: a link named ``erasekit`` to the repository root is put first on ``sys.path`` and
``PYTHONPATH``. So a second clone or worktree tests its own code with the same venv.
"""
import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))  # harness: the shared paths and where ComfyUI comes from
sys.path.insert(0, str(ROOT / "benchmarks"))  # _pack: this checkout as ``erasekit``

from _pack import link_checkout  # noqa: E402
from harness import CACHE_DIR, SHARED_DATA, comfyui_source as find_comfyui_source  # noqa: E402

link_checkout(CACHE_DIR / "checkouts" / hashlib.sha1(str(ROOT).encode()).hexdigest()[:12], ROOT)


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (real images, masks, triplets, videos); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set ERASEKIT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def comfyui_source():
    """A ComfyUI source tree to read files from (tokenizer data), in tests/comfy's order: COMFYUI_PATH,
    ~/ComfyUI, the shared 0.3.64 snapshot. Never written to."""
    path, reason = find_comfyui_source()
    if path is not None:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_video(shared_data):
    """``shared_video(name)``: the path of ../shared/data/video/``name``; skips the test when it is missing."""
    def path_of(name):
        path = shared_data / "video" / name
        if not path.is_file():
            pytest.skip(f"{path} is missing")
        return path

    return path_of


@pytest.fixture(scope="session")
def road_video(shared_video):
    """../shared/data/video/road_cars.avi, the static-camera road video most video tests mine."""
    return shared_video("road_cars.avi")


@pytest.fixture(scope="session")
def write_video():
    """``write(path, frames, fps=30)``: BGR frames as an MJPG AVI at ``path``; returns the path."""
    import cv2

    def write(path, frames, fps=30):
        height, width = frames[0].shape[:2]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
        assert writer.isOpened()
        for frame in frames:
            writer.write(frame)
        writer.release()
        return path

    return write


@pytest.fixture
def unusable_output(tmp_path):
    """``unusable_output(kind)``: an output path that cannot be used — a "file", a folder whose parent is missing
    ("missing parent"), or a folder nobody may write ("unwritable")."""
    def make(kind):
        if kind == "file":
            (tmp_path / "taken").write_text("x")
            return tmp_path / "taken"
        if kind == "missing parent":
            return tmp_path / "absent" / "deeper" / "out"
        if os.geteuid() != 0:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o555)
            return locked / "out"
        return "/sys/erasekit-out"  # sysfs: not even root may create files there

    return make
