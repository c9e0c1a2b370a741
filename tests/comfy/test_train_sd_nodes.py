"""The SD-inpainting trainer node in a real ComfyUI: schema, a short LoRA run whose result the SmartEraser
Loader opens, resume, and clear errors."""
import importlib
import json

import numpy as np
import pytest
import torch

from tiny import smarteraser as tiny_release

RELEASE = "tiny_release"  # the same folder (and builder) the SmartEraser node tests use


@pytest.fixture(scope="module")
def nodes(comfy):
    return importlib.import_module(comfy.pack_module().__name__ + ".nodes.train_sd")


@pytest.fixture(scope="module")
def release(comfy):
    """A SmartEraser release folder ComfyUI can load (320-channel UNet, full-size CLIP-L text encoder and VAE)."""
    folder = comfy.models_dir / "smarteraser" / RELEASE
    if not (folder / "unet").is_dir():
        tiny_release.build_diffusers_folder(folder, full_size_clip=True)
    return folder


@pytest.fixture(scope="module")
def dataset(comfy):
    """Two 64 px triplets in ComfyUI's output folder, as the dataset nodes write them."""
    from erasekit.dataset_tools.triplets import TripletWriter

    folder = comfy.output_dir / "train_sd_triplets"
    rng = np.random.default_rng(0)
    with TripletWriter(folder) as writer:
        for index in range(2):
            if writer.has(f"s{index}"):
                continue
            target = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), bool)
            mask[16:40, 20:44] = True
            source = target.copy()
            source[mask] = (200, 30, 30)
            writer.write(f"s{index}", source, mask, target, {"origin": {"kind": "image", "image": "x", "instance": index}})
    return folder.name


def prompt(vision, dataset, output_name, steps, **extra):
    inputs = {"base_model": RELEASE, "clip_vision": vision, "dataset_folder": dataset, "output_name": output_name,
              "objective": "cro", "mode": "lora", "steps": steps, "learning_rate": 1e-3, "batch_size": 1,
              "grad_accum": 1, "resolution": 64, "condition_dropout": 0.1, "image_condition": "region",
              "visual_guidance": True, "lora_rank": 4, "train_text_encoder": True, "checkpoint_every": 1, "resume": True,
              "mixed_precision": "no", "gradient_checkpointing": False, "seed": 0}
    inputs.update(extra)
    return {"1": {"class_type": "EraseKitTrainSDInpaintEraser", "inputs": inputs}}


def sample_with(comfy, folder):
    """One KSampler step of the SmartEraser graph (loader → RG + VG conditioning) on a fixed image and mask."""
    vision = comfy.ensure_model("clip_vision", tiny_release.CLIP_VISION).name
    graph = {
        "1": {"class_type": "EraseKitSmartEraserLoader", "inputs": {"folder": folder}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": vision}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x7F4020}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 24, "height": 24}},
        "6": {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["5", 0], "x": 16, "y": 16,
                                                        "operation": "add"}},
        "7": {"class_type": "EraseKitSmartEraserConditioning",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "clip_vision": ["2", 0],
                         "projector": ["1", 3], "image": ["3", 0], "mask": ["6", 0],
                         "preset": "custom", "prompt": "Remove the instance of", "mask_area_ratio": 1.0}},
        "8": {"class_type": "KSampler",
              "inputs": {"model": ["7", 0], "positive": ["7", 1], "negative": ["7", 2], "latent_image": ["7", 3],
                         "seed": 0, "steps": 1, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }
    return comfy.run_prompt(graph).outputs("8")[0]["samples"]


def test_schema_category_and_tooltips(comfy):
    info = comfy.object_info["EraseKitTrainSDInpaintEraser"]
    assert info["category"] == "erasekit/train"
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"input {name} has no tooltip"


def test_train_then_load_in_the_smarteraser_loader_and_resume(comfy, nodes, release, dataset):
    vision = comfy.ensure_model("clip_vision", "tiny-clip-vision-768.safetensors").name
    assert RELEASE in nodes.base_model_folders()
    result = comfy.run_prompt(prompt(vision, dataset, "trained_sd", steps=2))
    curve, name, summary = result.outputs("1")
    summary = json.loads(summary)
    assert name == "trained_sd" and summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and float(curve.std()) > 0
    folder = comfy.models_dir / "smarteraser" / "trained_sd"
    assert (folder / "clip_mlp_weight.pth").is_file() and (folder / "tokenizer").is_dir()

    loaded = comfy.run_prompt({"1": {"class_type": "EraseKitSmartEraserLoader", "inputs": {"folder": "trained_sd"}},
                               "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}})
    model, clip, vae, projector = loaded.outputs("1")
    assert model.model.model_config.unet_config["in_channels"] == 9
    base = torch.load(release / "clip_mlp_weight.pth", weights_only=True)
    assert not torch.allclose(projector.fc_out.weight.float(), base["fc_out.weight"].float())  # trained, not copied

    # the trained folder drives SmartEraser's conditioning + KSampler, and its prediction differs from the base's
    assert not torch.equal(sample_with(comfy, "trained_sd"), sample_with(comfy, RELEASE))

    # resume: the same output name continues at step 2 and stops at 3
    again = json.loads(comfy.run_prompt(prompt(vision, dataset, "trained_sd", steps=3)).outputs("1")[2])
    assert again["steps"] == 3
    history = [s for s, _ in json.loads((comfy.output_dir / "erasekit_train" / "trained_sd" / "checkpoints" /
                                         "checkpoint-0000003" / "state.json").read_text())["history"]]
    assert history == [1, 2, 3]


def test_bad_inputs_are_explained(comfy, nodes, release, dataset):
    vision = comfy.ensure_model("clip_vision", "tiny-clip-vision-768.safetensors").name
    from harness import PromptError

    with pytest.raises(PromptError, match="does not exist"):
        comfy.run_prompt(prompt(vision, "no_such_dataset", "x", steps=1))
    with pytest.raises(PromptError, match="plain folder name"):
        comfy.run_prompt(prompt(vision, dataset, "../escape", steps=1))
    with pytest.raises(PromptError, match="base model's own folder"):
        comfy.run_prompt(prompt(vision, dataset, RELEASE, steps=1))



def test_training_nodes_import_without_the_train_extras_and_name_them_when_run(comfy, nodes, release, dataset,
                                                                            monkeypatch):
    """With diffusers, transformers, peft and accelerate missing, both trainer modules still import (ComfyUI lists
    the nodes) and running one raises a sentence with the pip line, not a bare ModuleNotFoundError."""
    import sys

    from harness import PromptError

    flux_nodes = importlib.import_module(comfy.pack_module().__name__ + ".nodes.train_flux")
    for package in ("diffusers", "transformers", "peft", "accelerate"):
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    importlib.reload(nodes)
    importlib.reload(flux_nodes)
    vision = comfy.ensure_model("clip_vision", "tiny-clip-vision-768.safetensors").name
    try:
        with pytest.raises(PromptError, match="pip install 'diffusers>=0.35'"):
            comfy.run_prompt(prompt(vision, dataset, "no_extras", steps=1))
    finally:
        monkeypatch.undo()
        importlib.reload(nodes)
        importlib.reload(flux_nodes)
