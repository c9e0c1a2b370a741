"""The dataset nodes through ComfyUI's executor: Syn4Removal into a triplet folder, then the loader."""
import json

import numpy as np
import pytest

from harness import PromptError


def synth_prompt(images, **overrides):
    inputs = {"backgrounds": str(images / "removal_pairs"), "instances": str(images / "masked"),
              "output": "syn_node", "num_samples": 3, "size": 256, "blend": "feather", "seed": 0,
              "area_filter": True, "class_filter": False, "preview_count": 2}
    inputs.update(overrides)
    return {
        "1": {"class_type": "EraseKitSyn4RemovalDataset", "inputs": inputs},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "EraseKitPreviewTripletDataset", "inputs": {"dataset_folder": "syn_node", "start": 1, "count": 2}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def test_synthesis_node_writes_and_previews(comfy, shared_data):
    result = comfy.run_prompt(synth_prompt(shared_data / "images"))
    source, mask, target, summary, folder = result.outputs("1")
    assert folder == str(comfy.output_dir / "syn_node")
    summary = json.loads(summary)
    assert summary["written"] == 3 and summary["filters"]["class_count"] is False
    assert source.shape == (2, 256, 256, 3) and mask.shape == (2, 256, 256) and target.shape == source.shape
    outside = mask[..., None].expand_as(source) == 0
    assert np.array_equal(source[outside].numpy(), target[outside].numpy()) and mask.sum() > 0
    loaded_source, loaded_mask, _, records = result.outputs("3")
    assert loaded_source.shape == (2, 256, 256, 3) and [r["id"] for r in json.loads(records)] == ["00000001", "00000002"]


def test_dataset_nodes_report_bad_folders(comfy, shared_data):
    with pytest.raises(PromptError, match="does not exist"):
        comfy.run_prompt(synth_prompt(shared_data / "images", backgrounds="/nonexistent/photos"))
    with pytest.raises(PromptError, match="no instance passed the filters"):
        comfy.run_prompt(synth_prompt(shared_data / "images", class_filter=True, output="syn_node_2"))


def test_synthesis_node_resumes_only_the_same_recipe_and_appends_on_request(comfy, shared_data):
    """The node's resume and append inputs mean what the command's --resume and --append mean."""
    images = shared_data / "images"
    folder = comfy.output_dir / "syn_recipes"
    comfy.run_prompt(synth_prompt(images, output="syn_recipes", num_samples=2, seed=0))
    with pytest.raises(PromptError, match=r"seed: 0 -> 5.*append"):
        comfy.run_prompt(synth_prompt(images, output="syn_recipes", num_samples=3, seed=5))
    with pytest.raises(PromptError, match="already holds 2 samples"):
        comfy.run_prompt(synth_prompt(images, output="syn_recipes", num_samples=3, seed=0, resume=False))
    summary = json.loads(comfy.run_prompt(
        synth_prompt(images, output="syn_recipes", num_samples=3, seed=5, append=True)).outputs("1")[3])
    assert summary["written"] == 1
    runs = json.loads((folder / "dataset.json").read_text())["runs"]
    assert [run["settings"]["seed"] for run in runs] == [0, 5]
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [r.get("settings", {}).get("seed") for r in records] == [None, None, 5]
