"""Several objects per photo through ComfyUI's own executor: the crop nodes' split outputs lists, every node between
crop and stitch runs once per crop, and the stitch pastes the crops into one photo, leaving every pixel outside
them bit for bit. Also the omnieraser_multi_object workflow on a tiny FLUX: one sampler run per crop."""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from harness import PromptError, small_prompt

HEIGHT, WIDTH = 157, 203  # odd on purpose


def _core(comfy):
    return importlib.import_module(f"{comfy.pack_module().__name__}.erasers.crop_stitch")


@pytest.fixture(scope="module")
def three_objects(comfy):
    """An odd-sized photo and a mask with three separate objects, written to ComfyUI's input folder."""
    rng = np.random.default_rng(0)
    photo = (rng.random((HEIGHT, WIDTH, 3)) * 200).astype(np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[18:43, 23:48] = 255
    mask[60:80, 160:180] = 255
    mask[110:121, 20:61] = 255
    folder = comfy.input_dir / "multi_object_test"
    folder.mkdir(exist_ok=True)
    Image.fromarray(photo).save(folder / "photo.png")
    Image.fromarray(mask).save(folder / "three_objects_mask.png")
    return "multi_object_test/photo.png", "multi_object_test/three_objects_mask.png"


def _prompt(three_objects, crop):
    """Photo + mask → ``crop`` (class_type, inputs) → ImageInvert as the "eraser" → one stitch per paste-back."""
    photo, mask = three_objects
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        "3": {"class_type": crop[0], "inputs": {"image": ["1", 0], "mask": ["2", 0], **crop[1]}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    }
    for index, paste_back in enumerate(("mask", "whole crop", "change-aware")):
        prompt[f"s{index}"] = {"class_type": "EraseKitStitchCrop", "inputs": {
            "original_image": ["1", 0], "erased_crop": ["4", 0], "crop_info": ["3", 2], "mask": ["2", 0],
            "paste_back": paste_back, "grow": 2, "blur_radius": 2.0, "change_threshold": 0.05}}
        prompt[f"p{index}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"s{index}", 0]}}
    return prompt


def _check_three_crops(comfy, prompt, result):
    """Three crops, three eraser runs, one stitched photo per paste-back, bit-identical outside the crops and
    equal to the core's stitch_parts (the node only converts)."""
    crops, crop_masks, infos = result.outputs("3")[:3]
    assert len(crops) == len(crop_masks) == len(infos) == 3
    assert [(info.part, info.parts) for info in infos] == [(0, 3), (1, 3), (2, 3)]
    erased = result.outputs("4")[0]
    assert isinstance(erased, list) and len(erased) == 3  # ImageInvert ran once per crop
    photo = result.outputs("1")[0]
    mask = result.outputs("2")[0]
    inside = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    for info in infos:
        inside[info.y0 : info.y1, info.x0 : info.x1] = True
    assert 0 < inside.sum() < 0.6 * inside.numel()
    for index in range(3):
        out = result.outputs(f"s{index}")[0]
        assert out.shape == photo.shape
        assert torch.equal(out[0][~inside], photo[0][~inside])
        assert not torch.equal(out[0][inside], photo[0][inside])
        inputs = prompt[f"s{index}"]["inputs"]
        expected = _core(comfy).stitch_parts(photo, erased, infos, mask[None] if mask.ndim == 2 else mask,
                                             inputs["paste_back"], inputs["grow"], inputs["blur_radius"])
        assert torch.equal(out, expected)
    return infos


def test_three_separate_objects_run_three_crops_through_the_executor(comfy, three_objects):
    inputs = {"context": 0.25, "target_side": 64, "multiple": 16, "upscale": True, "square": False, "split": True,
              "group_distance": 0}
    prompt = _prompt(three_objects, ("EraseKitCropAroundMask", inputs))
    result = comfy.run_prompt(prompt)
    infos = _check_three_crops(comfy, prompt, result)
    widths, heights = result.outputs("3")[3:5]
    assert widths == [info.padded_width for info in infos] and heights == [info.padded_height for info in infos]

    # split off (the default): one crop over every object, as before
    prompt["3"]["inputs"]["split"] = False
    single = comfy.run_prompt(prompt)
    info = single.outputs("3")[2]
    assert (info.part, info.parts) == (0, 1)
    assert (info.x0, info.y0, info.x1, info.y1) == (0, 0, WIDTH, HEIGHT)  # the union box with context: the photo
    # and a distance that reaches every crop merges the three objects into that same crop
    prompt["3"]["inputs"].update(split=True, group_distance=200)
    merged = comfy.run_prompt(prompt)
    assert merged.outputs("3")[2] == info


def test_a_list_of_photos_gets_one_stitched_photo_each(comfy, three_objects):
    """Two photos as a ComfyUI list (RebatchImages): the crop node runs per photo (3 + 3 crops in a row), the eraser
    six times, and the stitch pastes each photo's three crops into that photo."""
    photo, mask = three_objects
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        "i": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "b": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["i", 0]}},
        "l": {"class_type": "RebatchImages", "inputs": {"images": ["b", 0], "batch_size": 1}},
        "3": {"class_type": "EraseKitCropAroundMask", "inputs": {
            "image": ["l", 0], "mask": ["2", 0], "context": 0.25, "target_side": 64, "multiple": 16, "upscale": True,
            "square": False, "split": True, "group_distance": 0}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "s": {"class_type": "EraseKitStitchCrop", "inputs": {
            "original_image": ["l", 0], "erased_crop": ["4", 0], "crop_info": ["3", 2], "mask": ["2", 0],
            "paste_back": "whole crop", "grow": 0, "blur_radius": 5.0, "change_threshold": 0.05}},
        "p": {"class_type": "PreviewImage", "inputs": {"images": ["s", 0]}},
    }
    result = comfy.run_prompt(prompt)
    photos, infos, erased = result.outputs("l")[0], result.outputs("3")[2], result.outputs("4")[0]
    assert len(photos) == 2 and len(erased) == 6
    assert [(info.part, info.parts) for info in infos] == [(k, 3) for k in range(3)] * 2
    stitched = result.outputs("s")[0]
    assert len(stitched) == 2
    mask = result.outputs("2")[0]
    mask_batch = mask[None] if mask.ndim == 2 else mask
    for index in range(2):
        parts = slice(3 * index, 3 * index + 3)
        expected = _core(comfy).stitch_parts(photos[index], erased[parts], infos[parts], mask_batch, "whole crop",
                                             0, 5.0)
        assert torch.equal(stitched[index], expected)
    assert not torch.equal(stitched[0], stitched[1])


def test_smarteraser_crop_splits_into_512_squares(comfy, three_objects):
    inputs = {"mode": "demo", "split": True, "context": 0.25, "group_distance": 0}
    prompt = _prompt(three_objects, ("EraseKitSmartEraserCrop", inputs))
    result = comfy.run_prompt(prompt)
    infos = _check_three_crops(comfy, prompt, result)
    assert all(crop.shape == (1, 512, 512, 3) for crop in result.outputs("3")[0])
    assert all(info.box_width == info.box_height for info in infos)

    prompt["3"]["inputs"]["mode"] = "evaluation"
    with pytest.raises(PromptError, match="split works with mode 'demo' only"):
        comfy.run_prompt(prompt)


def test_multi_object_workflow_samples_once_per_crop(comfy, sampler_spy):
    """omnieraser_multi_object.json at a 64 px working size, one step: IOPaint's four lanterns make two crops (three
    close lanterns share one), the sampler runs twice, each on its crop's latent, and the saved photo equals the
    input outside the two crops."""
    prompt, crop_id = small_prompt(comfy, "omnieraser_multi_object", 1)  # crop target_side 64
    assert prompt[crop_id]["inputs"]["split"] is True
    result = comfy.run_prompt(prompt)
    crops, _, infos = result.outputs(crop_id)[:3]
    assert len(crops) == len(infos) == 2
    assert [call["latent"] for call in sampler_spy.calls] == [(1, 16, crop.shape[1] // 8, crop.shape[2] // 8)
                                                                 for crop in crops]
    saver = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    saved = result.ui[saver]["images"]
    assert len(saved) == 1  # one photo, both crops pasted into it
    output = np.asarray(Image.open(comfy.output_dir / saved[0]["subfolder"] / saved[0]["filename"]).convert("RGB"))
    loader = next(v for v in prompt.values() if v["class_type"] == "LoadImage" and "clean" not in v["inputs"]["image"])
    photo = np.asarray(Image.open(comfy.input_dir / loader["inputs"]["image"]).convert("RGB"))
    outside = np.ones(photo.shape[:2], bool)
    for info in infos:
        outside[info.y0 : info.y1, info.x0 : info.x1] = False
    assert output.shape == photo.shape and outside.mean() > 0.4
    assert np.array_equal(output[outside], photo[outside])
    for info in infos:
        box = (slice(info.y0, info.y1), slice(info.x0, info.x1))
        assert not np.array_equal(output[box], photo[box])
