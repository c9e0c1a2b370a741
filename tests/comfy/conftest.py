"""``comfy``: a real ComfyUI (COMFYUI_PATH, else ~/ComfyUI) on CPU with EraseKit loaded; see harness.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, workflow_to_prompt, tiny builders

from harness import ComfyHarness, find_comfyui  # noqa: E402

COMFY_PATH, SKIP_REASON = find_comfyui()


def pytest_collection_modifyitems(config, items):
    if COMFY_PATH is not None:
        return
    here = Path(__file__).resolve().parent
    marker = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if COMFY_PATH is None:
        pytest.skip(SKIP_REASON)
    return ComfyHarness(COMFY_PATH, tmp_path_factory.mktemp("comfyui")).start()
