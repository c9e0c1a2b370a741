"""Every example workflow executes through ComfyUI's own executor on tiny models, its cost inputs capped."""
import json
from pathlib import Path

import pytest
from harness import COST_CAPS

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_executes(comfy, path):
    if comfy.shared_data is None:
        pytest.skip("the example workflows load real images and videos from ../shared/data, which is absent")
    workflow = json.loads(path.read_text())
    result = comfy.run_workflow(workflow, caps=COST_CAPS)
    assert result.output_nodes, f"{path.name} has no output node"
    assert result.ui, f"{path.name} produced no output"
