"""Every example workflow executes through ComfyUI's own executor on tiny models."""
import json
from pathlib import Path

import pytest

MAX_STEPS = 3  # see ComfyHarness.workflow_prompt: the graph is what is under test, not the step count
WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_executes(comfy, path):
    if comfy.shared_data is None:
        pytest.skip("the example workflows load real images and videos from ../shared/data, which is absent")
    workflow = json.loads(path.read_text())
    result = comfy.run_workflow(workflow, max_steps=MAX_STEPS)
    assert result.output_nodes, f"{path.name} has no output node"
    assert result.ui, f"{path.name} produced no output"
