"""The pack loads into a real ComfyUI cleanly and every node registers what it declares."""
import json
from pathlib import Path

import pytest

from erasekit.headless.workflow import model_files, workflow_to_prompt

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


def test_pack_loads_without_errors_or_warnings(comfy):
    assert comfy.load_warnings == []


def test_pack_registers_nodes_with_declared_schema(comfy):
    declared = comfy.pack_module().nodes.all_nodes()
    assert sorted(c.GET_SCHEMA().node_id for c in declared) == comfy.pack_node_names()
    for cls in declared:
        schema = cls.GET_SCHEMA()
        info = comfy.object_info[schema.node_id]
        listed = [name for section in ("required", "optional") for name in info["input"].get(section, {})]
        assert listed == [i.id for i in schema.inputs], schema.node_id
        assert list(info["output"]) == [o.io_type for o in schema.outputs], schema.node_id
        assert info["display_name"] and info["description"], f"{schema.node_id} needs a display name and description"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_with_known_nodes_and_model_urls(comfy, path):
    workflow = json.loads(path.read_text())
    assert path.with_suffix(".jpg").is_file(), f"{path.name} needs a .jpg thumbnail"
    prompt = workflow_to_prompt(workflow, comfy.object_info)  # raises on a missing node type
    assert prompt
    for node in workflow["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            assert model["url"].startswith("https://") and model["name"] and model["directory"], model
    named = {m[1] for m in model_files(workflow)}
    for entry in prompt.values():
        for value in entry["inputs"].values():
            if isinstance(value, str) and value.endswith((".safetensors", ".pth", ".ckpt", ".pt", ".bin")):
                assert value in named, f"{entry['class_type']} loads {value} but no node lists it in properties.models"


def test_every_node_input_has_a_tooltip_and_category(comfy):
    names = comfy.pack_node_names()
    assert names, "EraseKit registered no nodes"
    for name in names:
        cls = comfy.node_class(name)
        schema = cls.GET_SCHEMA()
        assert schema.category.startswith("erasekit/"), name
        for item in schema.inputs:
            assert item.tooltip, f"{name}.{item.id} has no tooltip"
