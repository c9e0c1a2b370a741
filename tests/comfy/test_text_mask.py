"""Text to Mask (GroundingDINO + SAM 2) through ComfyUI's executor, on tiny random models built from configs."""
import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.headless.runtime import PromptInvalid

DINO, SAM2 = "tiny-grounding-dino", "tiny-sam2"


@pytest.fixture(scope="module")
def photo(comfy, shared_data):
    comfy.ensure_model("grounding-dino", DINO)
    comfy.ensure_model("sam2", SAM2)
    picture = Image.open(shared_data / "images" / "masked" / "dog_bench.png").convert("RGB").resize((120, 90))
    picture.save(comfy.input_dir / "text_mask_photo.png")
    return np.asarray(picture)


def prompt_for(output, box_threshold=0.0, grounding_dino=DINO, sam2=SAM2):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "text_mask_photo.png"}},
        "2": {"class_type": "EraseKitTextToMask",
              "inputs": {"image": ["1", 0], "prompt": "Dog, bench", "grounding_dino": grounding_dino, "sam2": sam2,
                         "box_threshold": box_threshold, "text_threshold": 0.0, "output": output}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
    }


def reference(comfy, photo):
    """The same detection and segmentation straight from the adapters in dataset_tools/segmenters.py."""
    from erasekit.dataset_tools import segmenters as S

    detector = S.load_grounding_dino(comfy.models_dir / "grounding-dino" / DINO)
    sam = S.load_sam(comfy.models_dir / "sam2" / SAM2)
    found = sorted(detector.detect(photo, "dog. bench.", 0.0, 0.0), key=lambda d: -d.score)
    masks = sam.segment_boxes(photo, [d.box for d in found])
    return masks[[m.any() for m in masks]]


def test_per_object_and_union_masks(comfy, photo):
    per_object, count = comfy.run_prompt(prompt_for("one mask per object")).outputs("2")
    union, union_count = comfy.run_prompt(prompt_for("union")).outputs("2")
    expected = reference(comfy, photo)
    assert count == union_count == len(expected) >= 2  # several objects: per-object and union differ
    assert per_object.dtype == torch.float32 and tuple(per_object.shape) == (count, 90, 120)
    assert tuple(union.shape) == (1, 90, 120)
    np.testing.assert_array_equal(per_object.numpy() > 0.5, expected)
    np.testing.assert_array_equal(union[0].numpy() > 0.5, expected.any(axis=0))
    assert set(np.unique(union.numpy())) <= {0.0, 1.0}


def test_nothing_found_gives_an_empty_mask(comfy, photo):
    union, count = comfy.run_prompt(prompt_for("union", box_threshold=1.0)).outputs("2")
    assert count == 0 and tuple(union.shape) == (1, 90, 120) and float(union.max()) == 0.0
    per_object, _ = comfy.run_prompt(prompt_for("one mask per object", box_threshold=1.0)).outputs("2")
    assert tuple(per_object.shape) == (1, 90, 120) and float(per_object.max()) == 0.0


def test_missing_model_names_the_file_the_folder_and_the_weights(comfy, photo):
    with pytest.raises(PromptInvalid) as failure:
        comfy.run_prompt(prompt_for("union", grounding_dino="grounding-dino-base"))
    message = str(failure.value)
    assert "'grounding-dino-base'" in message
    assert str(comfy.models_dir / "grounding-dino") in message
    assert "huggingface.co/IDEA-Research/grounding-dino-tiny" in message
    with pytest.raises(PromptInvalid, match=r"sam2\.1_hiera_large\.pt.*facebook/sam2\.1-hiera-large"):
        comfy.run_prompt(prompt_for("union", sam2="sam2.1_hiera_large.pt"))
