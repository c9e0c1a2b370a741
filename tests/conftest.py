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
SHARED_DATA = Path(os.environ.get("ERASEKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHARED_COMFYUI = Path(os.environ.get("ERASEKIT_SHARED_COMFYUI", ROOT.parent / "shared" / "comfyui" / "ComfyUI"))


def _import_this_checkout():
    cache = Path(os.environ.get("ERASEKIT_CACHE", Path.home() / ".cache" / "erasekit"))
    shim = cache / "checkouts" / hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]
    link = shim / "erasekit"
    if not (link.is_symlink() and Path(os.readlink(link)) == ROOT):
        shim.mkdir(parents=True, exist_ok=True)
        tmp = shim / f".erasekit-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(ROOT, target_is_directory=True)
        os.replace(tmp, link)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    for name in [m for m in sys.modules if m == "erasekit" or m.startswith("erasekit.")]:
        del sys.modules[name]


_import_this_checkout()


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
    for candidate in (os.environ.get("COMFYUI_PATH"), Path.home() / "ComfyUI", SHARED_COMFYUI):
        if candidate and (Path(candidate) / "comfy").is_dir():
            return Path(candidate)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true and no ComfyUI source: set COMFYUI_PATH or provide ../shared/comfyui/ComfyUI", pytrace=False)
    pytest.skip("no ComfyUI source tree: set COMFYUI_PATH (or keep one at ~/ComfyUI)")
