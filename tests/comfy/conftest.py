"""``comfy``: a real ComfyUI on CPU with EraseKit loaded; see harness.py for where it comes from.

Without a ComfyUI these tests skip and say why, except under ``CI=true``, where a missing ComfyUI fails them:
CI must never land green without the tests that matter most.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, tiny builders

from harness import ComfyHarness, SamplerSpy, find_comfyui  # noqa: E402

COMFY_PATH, MISSING_REASON = find_comfyui()
IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(config, items):
    if COMFY_PATH is not None or IN_CI:
        return
    here = Path(__file__).resolve().parent
    marker = pytest.mark.skip(reason=MISSING_REASON)
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if COMFY_PATH is None:
        if IN_CI:
            pytest.fail(f"CI=true and {MISSING_REASON}", pytrace=False)
        pytest.skip(MISSING_REASON)
    return ComfyHarness(COMFY_PATH, tmp_path_factory.mktemp("comfyui")).start()


@pytest.fixture
def sampler_spy(monkeypatch):
    """A ``SamplerSpy`` on every ComfyUI sampler run; the models the test loaded are unloaded after it (full-width
    tiny FLUX models: a few workflows' worth would fill the memory)."""
    import gc

    import comfy.model_management
    import comfy.samplers

    spy = SamplerSpy()
    monkeypatch.setattr(comfy.samplers.KSAMPLER, "sample", spy.sample(comfy.samplers.KSAMPLER.sample))
    yield spy
    comfy.model_management.unload_all_models()
    gc.collect()
