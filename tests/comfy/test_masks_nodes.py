"""The mask nodes through ComfyUI's own executor, on the real dog_bench / room images and masks."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.erasers import masks as core
from erasekit.erasers.layout import binarize
from harness import PromptError


def mask_prompt(irregularize_inputs=None, clean_inputs=None, mask_file="dog_bench_mask.png"):
    """LoadImage + LoadImageMask -> Irregularize -> Clean -> MaskToImage -> PreviewImage."""
    irregularize = {"mask": ["2", 0], "choice": "3 dilate", "ratios": "fixed (paper test mode)",
                    "area_ratio": 1.1, "seed": 0, "metric": "chessboard", "image": ["1", 0]}
    clean = {"mask": ["3", 0], "fill_holes": True, "max_hole_pixels": 0, "min_island_pixels": 0,
             "soft_edge_px": 0, "image": ["1", 0]}
    irregularize.update(irregularize_inputs or {})
    clean.update(clean_inputs or {})
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dog_bench.png"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": mask_file, "channel": "red"}},
        "3": {"class_type": "EraseKitIrregularizeMask", "inputs": irregularize},
        "4": {"class_type": "EraseKitCleanMask", "inputs": clean},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def input_mask(comfy, name):
    return binarize(np.asarray(Image.open(comfy.input_dir / name).convert("L")))


@pytest.fixture
def dog_mask(comfy):
    if not (comfy.input_dir / "dog_bench_mask.png").is_file():
        pytest.skip("../shared/data/images/masked is absent")
    return input_mask(comfy, "dog_bench_mask.png")


def test_eval_dilation_through_comfyui(comfy, dog_mask):
    result = comfy.run_prompt(mask_prompt())
    mask, choices = result.outputs("3")
    assert choices == "3"
    assert int((mask[0] > 0.5).sum()) == round(dog_mask.sum() * 1.10)
    assert result.ui["6"]["images"], "the preview saved an image"


def test_random_batch_is_seeded_and_cleanup_runs(comfy, dog_mask):
    prompt = mask_prompt({"choice": "random (shape rule)", "ratios": "random (paper training ranges)", "seed": 5},
                         {"min_island_pixels": 50, "soft_edge_px": 4})
    mask, choices = comfy.run_prompt(prompt).outputs("3")
    expected, choice = core.irregularize(dog_mask, "random", core.item_rng(5, 0))
    assert choices == str(choice) and np.array_equal(mask[0].numpy() > 0.5, expected)
    cleaned = comfy.run_prompt(prompt).outputs("4")[0][0].numpy()
    hard = core.clean_mask(expected, True, None, 50, 0)
    assert (cleaned[hard > 0] == 1).all() and ((cleaned > 0) & (cleaned < 1)).any()


def test_area_ratio_choice(comfy, dog_mask):
    prompt = mask_prompt({"choice": "area ratio", "area_ratio": 0.5, "metric": "euclidean"})
    mask, _ = comfy.run_prompt(prompt).outputs("3")
    assert int((mask[0] > 0.5).sum()) == round(dog_mask.sum() * 0.5)


def test_mask_of_another_size_than_the_image_is_a_clear_error(comfy, dog_mask):
    with pytest.raises(PromptError) as failure:
        comfy.run_prompt(mask_prompt(mask_file="room_mask.png"))
    assert "256x256" in failure.value.exception_message and "512x512" in failure.value.exception_message


def test_empty_mask_passes_through(comfy, dog_mask):
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(comfy.input_dir / "erasekit_empty_mask.png")
    mask, choices = comfy.run_prompt(mask_prompt({"choice": "5 dilate + ellipse"},
                                                 mask_file="erasekit_empty_mask.png")).outputs("3")
    assert choices == "1" and not mask.any()


def test_example_workflow_grows_the_hull_and_keeps_the_object(comfy, dog_mask):
    path = Path(__file__).resolve().parents[2] / "workflows" / "mask_irregularisation.json"
    workflow = json.loads(path.read_text())
    result = comfy.run_workflow(workflow)
    irregular, choices = result.outputs("4")
    cleaned = result.outputs("5")[0][0].numpy()
    hull = core.convex_hull(dog_mask)
    assert choices == "4"
    assert abs((irregular[0] > 0.5).sum().item() / hull.sum() - 1.35) <= 0.02
    assert (cleaned[dog_mask] == 1).all(), "the clean-up keeps the whole object masked"
    assert result.ui["7"]["images"] and result.ui["9"]["images"]
