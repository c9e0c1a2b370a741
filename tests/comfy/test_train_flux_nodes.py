"""OmniEraser LoRA training nodes on ComfyUI's own FLUX and VAE, with a triplet dataset from ../shared/data.

The direct tests use a tiny FLUX built from a config with ComfyUI's own classes (hidden 32) so a few training
steps take seconds; the parity test trains the same tiny FLUX through both adapters of the one trainer (diffusers'
FLUX for the CLI, ComfyUI's for the node); the graph test runs loaders → trainer → save node through ComfyUI's
executor on the smallest FLUX ComfyUI detects (545 M parameters, two steps).
"""
import copy
import importlib
import shutil
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
    vae = vae_pair()[1]
    generator = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 8, 24, generator=generator), {"pooled_output": torch.randn(1, 20, generator=generator)}]]
    return {"vae": vae, "positive": positive}


def _train(nodes, model, parts, dataset, **overrides):
    kwargs = dict(model=model, vae=parts["vae"], positive=parts["positive"], dataset=str(dataset), steps=6,
                  learning_rate=1e-3, rank=4, grad_accumulation=2, resolution=64, resize_short_side=0,
                  mask_augmentation=True, crop_variants=2, guidance=3.5, memory_plan="16gb",
                  training_dtype="fp32", scale_lr=False, seed=0, interrupt_prefix="partial")
    kwargs.update(overrides)
    return nodes.TrainOmniEraserLora.execute(**kwargs)


def heldout_through(comfy, patcher, parts, triplets, seed=0):
    """The trainer's held-out loss of ``patcher`` as it is (e.g. a loader's MODEL), through the core."""
    nodes = pack_module(comfy, "nodes.train_flux")
    core = pack_module(comfy, "train.eraser_lora")
    job = core.EraserJob(resolution=64, seed=seed)
    data = core.open_training_data([str(triplets)], job)
    held = core.heldout_batch(data.heldout)
    adapter = nodes.ComfyFlux(patcher, parts["vae"], parts["positive"])
    moments = core.encode_moments(adapter, held["source"], held["mask"], held["target"])
    from comfy import model_management

    model_management.load_models_gpu([patcher], force_full_load=True)
    adapter.module = patcher.model.diffusion_model
    with torch.inference_mode(False):
        return core.heldout_loss(core.EraserModel(adapter, None), moments, held["mask"], seed, guidance=3.5)


def test_trained_lora_saves_and_loads_through_the_omnieraser_loader(comfy, triplets, parts):
    import folder_paths
    from comfy import utils

    nodes = pack_module(comfy, "nodes.train_flux")
    loader = pack_module(comfy, "nodes.omnieraser")
    core = pack_module(comfy, "erasers.omnieraser")
    base = tiny_flux()
    out = _train(nodes, base, parts, triplets, memory_plan="full")
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
    assert heldout_through(comfy, loaded, parts, triplets) == pytest.approx(held, rel=1e-4)
    assert trained.get_model_object("concat_cond") is not None  # the MODEL output reads the 48-channel condition


def test_fp8_plan_trains_a_copy_in_fp8_and_leaves_the_users_model_alone(comfy, triplets, parts, monkeypatch):
    nodes = pack_module(comfy, "nodes.train_flux")
    base = tiny_flux()
    before = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    stored = []
    original = nodes.ComfyFlux.apply_plan

    def spy(self, plan, *args, **kwargs):
        original(self, plan, *args, **kwargs)
        stored.append((plan.name, self.module.double_blocks[0].img_attn.qkv.weight.dtype,
                       self.module is base.model.diffusion_model))

    monkeypatch.setattr(nodes.ComfyFlux, "apply_plan", spy)
    trained, lora, _, held = _train(nodes, base, parts, triplets, steps=2, memory_plan="16gb").result
    assert stored == [("16gb", torch.float8_e4m3fn, False)]
    assert np.isfinite(held) and any(float(v.abs().max()) > 0 for k, v in lora.items() if ".lora_B." in k)
    after = base.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def vae_pair(seed=6):
    """A small KL VAE (z 16, 8× down) twice: diffusers' AutoencoderKL and ComfyUI's VAE with the same weights."""
    from comfy import diffusers_convert, sd
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    reference = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32,) * 4,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              layers_per_block=1, norm_num_groups=32)
    weights = diffusers_convert.convert_vae_state_dict({k: v.clone() for k, v in reference.state_dict().items()})
    config = {"params": {"embed_dim": 16, "ddconfig": {
        "double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    return reference.requires_grad_(False), sd.VAE(sd=weights, config=config)


def test_parity_the_same_loss_curve_through_either_adapter(comfy, triplets):
    """The one trainer on the tiny parity FLUX: diffusers' FLUX (the CLI's adapter) and ComfyUI's FLUX converted
    from it (the node's), the same VAE weights on both sides, the same data and seed: the same 20-step loss curve."""
    from test_omnieraser import comfy_flux, diffusers_flux

    core = pack_module(comfy, "train.eraser_lora")
    cli_side = pack_module(comfy, "train.flux")
    nodes = pack_module(comfy, "nodes.train_flux")
    reference = diffusers_flux(seed=4)
    patcher = comfy_flux(reference)
    reference.requires_grad_(False)
    diffusers_vae, comfy_vae = vae_pair()
    generator = torch.Generator().manual_seed(7)
    context, pooled = torch.randn(1, 7, 24, generator=generator), torch.randn(1, 20, generator=generator)
    text = {"prompt_embeds": context, "pooled_prompt_embeds": pooled, "text_ids": torch.zeros(7, 3)}
    job = dict(steps=20, rank=4, learning_rate=2e-3, grad_accum=1, resolution=64, crop_variants=1,
               mixed_precision="no", memory_plan="full", lr_scheduler="constant", seed=5)

    cli = core.train_eraser(core.EraserJob(**job), cli_side.DiffusersFlux(reference, diffusers_vae, text, "cpu"),
                            folders=[str(triplets)])
    with torch.inference_mode(False), torch.enable_grad():
        node = core.train_eraser(core.EraserJob(**job), nodes.ComfyFlux(patcher, comfy_vae, [[context, {"pooled_output": pooled}]]),
                                 folders=[str(triplets)])
    a, b = np.array([loss for _, loss in cli.history]), np.array([loss for _, loss in node.history])
    assert len(a) == len(b) == 20 and a.std() > 1e-3  # a curve, not a constant
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()
    assert cli.heldout_loss == pytest.approx(node.heldout_loss, abs=1e-4)
    for key in cli.lora_state:
        assert torch.allclose(cli.lora_state[key], node.lora_state[key], atol=1e-4), key


def test_the_activation_table_holds_for_comfyuis_flux(comfy):
    """train.memory.ACTIVATION_UNITS re-measured through the node's adapter (ComfyUI's FLUX, hidden 128, LoRA slots
    on every official target, the training attention, the LayerNorm input copies); diffusers' side: tests/."""
    from comfy import model_patcher, supported_models

    nodes = pack_module(comfy, "nodes.train_flux")
    memory = pack_module(comfy, "train.memory")
    lora = pack_module(comfy, "train.lora")
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 32, 32, generator=generator), {"pooled_output": torch.randn(1, 32, generator=generator)}]]
    noisy, condition = torch.randn(1, 16, 32, 32, generator=generator), torch.randn(1, 48, 32, 32, generator=generator)

    def saved(depth, depth_single):
        torch.manual_seed(0)
        config = supported_models.Flux(dict(TINY, vec_in_dim=32, context_in_dim=32, hidden_size=128, num_heads=4,
                                            axes_dim=[8, 12, 12], depth=depth, depth_single_blocks=depth_single))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        with torch.no_grad():
            for p in model.diffusion_model.parameters():
                p.normal_(0, 0.02)
        patcher = model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        adapter = nodes.ComfyFlux(patcher, None, positive, "cpu")
        with torch.inference_mode(False), torch.enable_grad():
            adapter.apply_plan(memory.PLANS["full"], torch.float32)
            slots = lora.LoraSlots(adapter.lora_targets(), 4, 4).attach()
            try:
                return memory.saved_activation_units(
                    lambda: adapter.velocity(noisy, condition, torch.tensor([0.5]), 3.5), 16 * 16 + 32, 128, adapter.module)
            finally:
                slots.detach()
                adapter.close()

    one = saved(1, 1)
    double, single = saved(2, 1) - one, saved(1, 2) - one
    assert double == pytest.approx(memory.ACTIVATION_UNITS["double"], rel=0.15)
    assert single == pytest.approx(memory.ACTIVATION_UNITS["single"], rel=0.15)


def test_training_steps_run_with_the_attention_guard(comfy, triplets, parts, monkeypatch):
    """Inside every training step cuDNN attention is off and ComfyUI's attention goes through the training override;
    afterwards the setting is what it was."""
    nodes = pack_module(comfy, "nodes.train_flux")
    seen = []
    sdpa = nodes.sdpa_attention

    def spy(func, *args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(func, *args, **kwargs)

    monkeypatch.setattr(nodes, "sdpa_attention", spy)
    torch.backends.cuda.enable_cudnn_sdp(True)
    _train(nodes, tiny_flux(), parts, triplets, steps=1, grad_accumulation=1, crop_variants=1, memory_plan="full")
    assert seen and not any(seen)  # 2 attentions per step, each with cuDNN SDPA off
    assert torch.backends.cuda.cudnn_sdp_enabled()


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
        if calls["n"] > 4 + 3:  # 4 crops encoded (2 samples × 2 variants), then 1.5 optimizer steps
            raise model_management.InterruptProcessingException()

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt_after_a_while)
    with pytest.raises(model_management.InterruptProcessingException):
        _train(nodes, tiny_flux(), parts, triplets, interrupt_prefix="interrupted_test", memory_plan="full")
    partial = Path(folder_paths.get_folder_paths("loras")[0]) / "interrupted_test_interrupted_step1.safetensors"
    assert partial.is_file()


def _graph(comfy, dataset, steps=2):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy_model(comfy, "diffusion_models", "flux1-dev.safetensors"),
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": comfy_model(comfy, "vae", "ae.safetensors")}},
        "3": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": comfy_model(comfy, "text_encoders", "clip_l.safetensors"),
                                                         "clip_name2": comfy_model(comfy, "text_encoders", "t5xxl_fp16.safetensors"),
                                                         "type": "flux"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "There is nothing here."}},
        "5": {"class_type": "EraseKitTrainOmniEraserLora", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "positive": ["4", 0], "dataset": str(dataset), "steps": steps,
            "learning_rate": 3e-5, "rank": 4, "grad_accumulation": 1, "resolution": 64, "resize_short_side": 0,
            "mask_augmentation": False, "crop_variants": 1, "guidance": 3.5, "memory_plan": "auto",
            "training_dtype": "auto", "scale_lr": True, "seed": 0, "interrupt_prefix": "graph"}},
        "6": {"class_type": "EraseKitSaveEraserLora", "inputs": {"lora": ["5", 1], "filename_prefix": "erasekit/graph"}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
    }


def test_training_graph_through_comfyui(comfy, triplets):
    """UNETLoader + VAELoader + DualCLIPLoader → CLIPTextEncode → trainer → save, on the 545 M FLUX, 2 steps."""
    import folder_paths

    result = comfy.run_prompt(_graph(comfy, triplets))
    name = result.outputs("6")[0]
    assert (Path(folder_paths.get_folder_paths("loras")[0]) / name).is_file()
    lora = result.outputs("5")[1]
    assert lora["transformer.x_embedder.lora_A.weight"].shape == (4, 256)
    assert np.isfinite(result.outputs("5")[3])


def test_the_trainer_runs_again_when_its_dataset_folder_changes(comfy, triplets, tmp_path, monkeypatch):
    """One ComfyUI executor, the same prompt three times: ComfyUI's cache answers the second run, and the third, after
    a training pair was rewritten, executes the trainer again (its fingerprint is the folder's files)."""
    from comfy_api.latest import io

    dataset = tmp_path / "data"
    shutil.copytree(triplets, dataset)
    runs = []

    def counting_execute(cls, model, **inputs):
        runs.append(inputs["dataset"])
        return io.NodeOutput(model, {}, torch.zeros(1, 8, 8, 3), 0.0)

    # the class ComfyUI registered (a test that reloads the module makes a new one)
    trainer = comfy.node_class("EraseKitTrainOmniEraserLora")
    monkeypatch.setattr(trainer, "execute", classmethod(counting_execute))
    prompt = _graph(comfy, dataset, steps=1)
    del prompt["6"]  # nothing to save from the counting stand-in
    executor = comfy.runtime.new_executor()

    def run():  # as the server does: a fresh copy of the prompt each time (ComfyUI writes into it)
        comfy.runtime.run(copy.deepcopy(prompt), executor=executor)

    run()
    run()
    assert len(runs) == 1  # inputs and folder unchanged: the cached result
    target = dataset / "target" / f"{SYN[0]}.png"
    cv2.imwrite(str(target), 255 - cv2.imread(str(target)))
    run()
    assert len(runs) == 2


def comfy_model(comfy, folder, filename):
    comfy.ensure_model(folder, filename)
    return filename
