"""The video nodes through ComfyUI's own executor on the real road_cars / highway_busy clips."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from erasekit.dataset_tools.triplets import TripletDataset
from harness import PromptError

SETTINGS = {"foreground_ratio": 0.04, "window_seconds": 6.0, "lighting_mse": 20.0, "mask_augment": "none",
            "outside_changes": "mask"}


@pytest.fixture
def videos(comfy, shared_video):
    """road_cars.avi and highway_busy.avi in ComfyUI's input folder (example workflows name them)."""
    folder = comfy.input_dir / "videos"
    folder.mkdir(exist_ok=True)
    for name in ("road_cars.avi", "highway_busy.avi"):
        source = shared_video(name)
        for target in (comfy.input_dir / name, folder / name):
            if not target.exists():
                shutil.copyfile(source, target)
    return folder


def test_load_video_frames(comfy, videos):
    prompt = {
        "1": {"class_type": "EraseKitLoadVideoFrames",
              "inputs": {"video": "road_cars.avi", "start_frame": 60, "frame_count": 5, "every_nth": 3}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    frames, fps, total = comfy.run_prompt(prompt).outputs("1")
    assert tuple(frames.shape) == (5, 360, 640, 3) and 0 <= float(frames.min()) and float(frames.max()) <= 1
    assert fps == 30.0 and total == 374


def test_mine_pairs_node_outputs_car_pairs(comfy, videos):
    prompt = {
        "1": {"class_type": "EraseKitMineVideoPairs",
              "inputs": {"video": "road_cars.avi", "start_frame": 0, "end_frame": 0, "max_pairs": 4, **SETTINGS}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    source, mask, target, summary = comfy.run_prompt(prompt).outputs("1")
    assert source.shape[0] == mask.shape[0] == target.shape[0] == 4
    summary = json.loads(summary)
    assert summary["status"] == "ok" and len(summary["chosen"]) == 4
    inside = mask > 0.5
    for i in range(4):
        diff = (source[i] - target[i]).abs().mean(dim=-1)
        assert float(diff[inside[i]].mean()) > 10 * float(diff[~inside[i]].mean())


def test_mine_pairs_node_explains_a_busy_scene(comfy, videos):
    prompt = {
        "1": {"class_type": "EraseKitMineVideoPairs",
              "inputs": {"video": "highway_busy.avi", "start_frame": 0, "end_frame": 0, "max_pairs": 4, **SETTINGS}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(PromptError, match="gave no pairs: no pairs: "):
        comfy.run_prompt(prompt)


def test_dataset_node_writes_and_resumes(comfy, videos):
    prompt = {
        "1": {"class_type": "EraseKitVideo4RemovalDataset",
              "inputs": {"videos": "videos", "output": "video_dataset_test", "max_frames": 200,
                         "preview_count": 2, "workers": 2, **SETTINGS}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    source, mask, target, summary, folder = comfy.run_prompt(prompt).outputs("1")
    assert folder == str(comfy.output_dir / "video_dataset_test")
    summary = json.loads(summary)
    by_name = {Path(v["video"]).name: v for v in summary["videos"]}
    assert by_name["road_cars.avi"]["written"] >= 3
    assert by_name["highway_busy.avi"]["written"] == 0 and by_name["highway_busy.avi"]["reason"]
    dataset = TripletDataset(comfy.output_dir / "video_dataset_test")
    assert len(dataset) == summary["written"] and dataset.validate() == len(dataset)
    assert source.shape[0] == 2 and np.isin(mask.numpy(), [0.0, 1.0]).all()
    again = json.loads(comfy.run_prompt(prompt).outputs("1")[3])
    assert again["written"] == 0  # resumed: every sample already there
    assert len(TripletDataset(comfy.output_dir / "video_dataset_test")) == len(dataset)
    prompt["1"]["inputs"]["outside_changes"] = "reject"  # another recipe: refused, as the command refuses it
    with pytest.raises(PromptError, match=r"outside_changes: \"mask\" -> \"reject\".*append"):
        comfy.run_prompt(prompt)
    assert len(TripletDataset(comfy.output_dir / "video_dataset_test")) == len(dataset)


def test_bad_video_input_is_a_clear_error(comfy, videos):
    prompt = {
        "1": {"class_type": "EraseKitLoadVideoFrames",
              "inputs": {"video": "absent.avi", "start_frame": 0, "frame_count": 2, "every_nth": 1}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(PromptError, match="does not exist"):
        comfy.run_prompt(prompt)


@pytest.mark.parametrize("sam_model", ["tiny-sam2", "tiny_sam_vit.pth"])
def test_mine_pairs_node_runs_grounding_dino_and_sam(comfy, videos, sam_model):
    """Random tiny weights cut arbitrary regions: the node must load both models and either pair with their
    masks or refuse with the segmenter's reason, never fall back silently to MOG masks."""
    comfy.ensure_model("grounding-dino", "tiny-grounding-dino")
    comfy.ensure_model("sam2" if sam_model == "tiny-sam2" else "sams", sam_model)
    prompt = {
        "1": {"class_type": "EraseKitMineVideoPairs",
              "inputs": {"video": "road_cars.avi", "start_frame": 0, "end_frame": 150, "max_pairs": 2, **SETTINGS,
                         "grounding_dino": "tiny-grounding-dino", "sam_model": sam_model, "prompt": "car"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    try:
        summary = json.loads(comfy.run_prompt(prompt).outputs("1")[3])
    except PromptError as error:
        assert "no pairs" in str(error)
        assert "segmenter" in str(error) or "prompt's objects" in str(error)
    else:
        assert {c["mask_source"] for c in summary["chosen"]} == {"grounding_dino+" + ("sam2" if "2" in sam_model else "sam")}
    with pytest.raises(PromptError, match="need all three"):
        prompt["1"]["inputs"]["prompt"] = ""
        comfy.run_prompt(prompt)
