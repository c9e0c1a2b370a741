"""OmniEraser LoRA training nodes on ComfyUI's own FLUX and VAE, with a triplet dataset from ../shared/data.

The direct tests use a tiny FLUX built from a config with ComfyUI's own classes (hidden 32) so a few training
steps take seconds; the graph test runs loaders → trainer → save node through ComfyUI's executor on the
smallest FLUX ComfyUI detects (545 M parameters, two steps).
"""
import importlib
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

TINY = dict(in_channels=16, out_channels=16, vec_in_dim=20, context_in_dim=24, hidden_size=32, mlp_ratio=4.0,
            num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True,
            guidance_embed=True, patch_size=2, image_model="flux")
SYN = ("000000006818", "55_000000138891", "I-210614_O04019_W01_F0109")


def pack_module(comfy, name):
    return importlib.import_module(f"{comfy.pack_module().__name__}.{name}")


@pytest.fixture(scope="module")
def triplets(shared_data, tmp_path_factory):
    """The three SmartEraser syn_triplets at 96 px (source = paste, mask, target = gt)."""
    from erasekit.dataset_tools.triplets import TripletWriter

    root = tmp_path_factory.mktemp("node_triplets") / "data"
    images = shared_data / "images" / "syn_triplets"
    with TripletWriter(root) as writer:
        for stem in SYN:
            def rgb(kind):
                image = cv2.cvtColor(cv2.imread(str(images / kind / f"{stem}.jpg")), cv2.COLOR_BGR2RGB)
                return cv2.resize(image, (96, 96), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(cv2.imread(str(images / "mask" / f"{stem}.jpg"), cv2.IMREAD_GRAYSCALE), (96, 96),
                              interpolation=cv2.INTER_NEAREST) > 127
            writer.write(stem, rgb("paste"), mask, rgb("gt"), {"origin": {"kind": "image", "image": stem, "instance": 0}})
    return root


def tiny_flux():
    from comfy import model_management, model_patcher, supported_models

    torch.manual_seed(0)
    config = supported_models.Flux(dict(TINY))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    with torch.no_grad():  # ComfyUI skips weight init: give every weight a seeded value
        for name, p in model.diffusion_model.named_parameters():
            p.copy_(torch.ones_like(p) if p.ndim == 1 and "norm" in name else
                    torch.randn_like(p) * (0.3 / max(1, p.shape[-1]) ** 0.5 if p.ndim == 2 else 0.02))
    device = model_management.get_torch_device()
    return model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


@pytest.fixture(scope="module")
def parts(comfy):
    from comfy import sd, utils

    vae = sd.VAE(sd=utils.load_torch_file(str(comfy.ensure_model("vae", "ae.safetensors"))))
    generator = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 8, 24, generator=generator), {"pooled_output": torch.randn(1, 20, generator=generator)}]]
    return {"vae": vae, "positive": positive}


def _train(nodes, model, parts, dataset, **overrides):
    kwargs = dict(model=model, vae=parts["vae"], positive=parts["positive"], dataset=str(dataset), steps=6,
                  learning_rate=1e-3, rank=4, grad_accumulation=2, resolution=64, resize_short_side=0,
                  mask_augmentation=True, crop_variants=2, guidance=3.5, gradient_checkpointing=True,
                  training_dtype="fp32", scale_lr=False, seed=0, interrupt_prefix="partial")
    kwargs.update(overrides)
    return nodes.TrainOmniEraserLora.execute(**kwargs)


def test_trained_lora_saves_and_loads_through_the_omnieraser_loader(comfy, triplets, parts):
    import folder_paths
    from comfy import model_management, utils

    nodes = pack_module(comfy, "nodes.train_flux")
    loader = pack_module(comfy, "nodes.omnieraser")
    core = pack_module(comfy, "erasers.omnieraser")
    base = tiny_flux()
    out = _train(nodes, base, parts, triplets)
    trained, lora, curve, held = out.result
    assert lora["transformer.x_embedder.lora_A.weight"].shape == (4, 256)
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    assert curve.shape == (1, 360, 640, 3) and 0 <= float(curve.min()) < 0.5
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if ".lora_B." in k)

    name = nodes.SaveEraserLora.execute(lora, "erasekit/test_omnieraser").result[0]
    path = Path(folder_paths.get_folder_paths("loras")[0]) / name
    assert path.is_file() and name.startswith("erasekit/test_omnieraser_")
    saved = utils.load_torch_file(str(path), safe_load=True)
    assert core.map_lora(saved, loader._original_shapes(base)).unmatched == []

    loaded = loader.OmniEraserLoraLoader.execute(base, name, 1.0).result[0]
    model_management.load_models_gpu([loaded], force_full_load=True)
    held_set = nodes.PairedCropDataset(nodes.split_heldout(nodes.open_triplets([str(triplets)]), 1)[1], 64, seed=1)
    sample = held_set[(0, 0)]
    latents = nodes.encode_latents(parts["vae"], base.model, sample)
    text = nodes.text_inputs(parts["positive"])
    with torch.inference_mode(False):
        reproduced = nodes.heldout_loss(loaded.model.diffusion_model, latents, sample["mask"][None], text, 3.5,
                                        torch.float32)
    assert reproduced == pytest.approx(held, rel=1e-4)
    assert trained.get_model_object("concat_cond") is not None  # the MODEL output reads the 48-channel condition


def test_bad_inputs_are_refused_before_training(comfy, triplets, parts, tmp_path, monkeypatch):
    from comfy import model_management

    nodes = pack_module(comfy, "nodes.train_flux")
    with pytest.raises(ValueError, match="FLUX.1-dev MODEL"):
        _train(nodes, types.SimpleNamespace(model=torch.nn.Linear(2, 2)), parts, triplets)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        _train(nodes, tiny_flux(), parts, empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        _train(nodes, tiny_flux(), parts, tmp_path / "missing")
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(triplets, bad)
    cv2.imwrite(str(bad / "target" / f"{SYN[0]}.png"), np.zeros((96, 80, 3), np.uint8))
    with pytest.raises(ValueError, match="80×96"):
        _train(nodes, tiny_flux(), parts, bad)
    monkeypatch.setattr(model_management, "get_free_memory", lambda *a, **k: 1024)
    with pytest.raises(ValueError, match="GiB is free"):
        _train(nodes, tiny_flux(), parts, triplets)


def test_interrupt_saves_the_partial_lora(comfy, triplets, parts, monkeypatch):
    import folder_paths
    from comfy import model_management

    nodes = pack_module(comfy, "nodes.train_flux")
    calls = {"n": 0}

    def interrupt_after_a_while():
        calls["n"] += 1
        if calls["n"] > 4 + 3:  # 4 latents encoded (2 samples × 2 variants), then 1.5 optimizer steps
            raise model_management.InterruptProcessingException()

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt_after_a_while)
    with pytest.raises(model_management.InterruptProcessingException):
        _train(nodes, tiny_flux(), parts, triplets, interrupt_prefix="interrupted_test")
    partial = Path(folder_paths.get_folder_paths("loras")[0]) / "interrupted_test_interrupted_step1.safetensors"
    assert partial.is_file()


def test_training_graph_through_comfyui(comfy, triplets):
    """UNETLoader + VAELoader + DualCLIPLoader → CLIPTextEncode → trainer → save, on the 545 M FLUX, 2 steps."""
    import folder_paths

    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy_model(comfy, "diffusion_models", "flux1-dev.safetensors"),
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": comfy_model(comfy, "vae", "ae.safetensors")}},
        "3": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": comfy_model(comfy, "text_encoders", "clip_l.safetensors"),
                                                         "clip_name2": comfy_model(comfy, "text_encoders", "t5xxl_fp16.safetensors"),
                                                         "type": "flux"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "There is nothing here."}},
        "5": {"class_type": "EraseKitTrainOmniEraserLora", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "positive": ["4", 0], "dataset": str(triplets), "steps": 2,
            "learning_rate": 3e-5, "rank": 4, "grad_accumulation": 1, "resolution": 64, "resize_short_side": 0,
            "mask_augmentation": False, "crop_variants": 1, "guidance": 3.5, "gradient_checkpointing": True,
            "training_dtype": "auto", "scale_lr": True, "seed": 0, "interrupt_prefix": "graph"}},
        "6": {"class_type": "EraseKitSaveEraserLora", "inputs": {"lora": ["5", 1], "filename_prefix": "erasekit/graph"}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
    }
    result = comfy.run_prompt(prompt)
    name = result.outputs("6")[0]
    assert (Path(folder_paths.get_folder_paths("loras")[0]) / name).is_file()
    lora = result.outputs("5")[1]
    assert lora["transformer.x_embedder.lora_A.weight"].shape == (4, 256)
    assert np.isfinite(result.outputs("5")[3])


def comfy_model(comfy, folder, filename):
    comfy.ensure_model(folder, filename)
    return filename
