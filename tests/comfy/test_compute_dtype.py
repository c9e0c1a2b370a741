"""The tiny model files store bf16/fp16 weights, as the real files do (so ComfyUI takes the same loading paths), but
no test computes in bf16 or fp16 on the CPU, where both are emulated and bf16 is ~100-170x slower than fp32.

Through the loaders the example workflows use, ComfyUI (started with ``--cpu``) loads the diffusion models, VAEs and
ControlNets as float32. Text and vision encoders it keeps in fp16 on a CPU whatever the file holds
(``model_management.text_encoder_dtype``), and computes them in float32 (``comfy.ops.manual_cast`` up-casts each
weight to the float32 activations): for those the tests record what every module outputs while they encode."""
import gc

import pytest
import torch

def floating_dtypes(module):
    """The floating dtypes of ``module``'s parameters and buffers (fp8 storage would show here too)."""
    return {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()
            or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}


def computes_in_float32(patcher_model):
    """A ComfyUI BaseModel computes in float32: its weights are float32 and nothing casts them per layer."""
    return (floating_dtypes(patcher_model) == {torch.float32}
            and getattr(patcher_model, "manual_cast_dtype", None) in (None, torch.float32))


def output_dtypes(module, run):
    """The floating dtypes of every tensor that any submodule of ``module`` outputs while ``run()`` runs."""
    seen = set()

    def record(_module, _inputs, output):
        stack = [output]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                if item.is_floating_point():
                    seen.add(item.dtype)
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())

    hooks = [m.register_forward_hook(record) for m in module.modules()]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def encodes_in_float32(clip):
    return output_dtypes(clip.cond_stage_model, lambda: clip.encode_from_tokens(clip.tokenize("a photo"))) == {
        torch.float32}


@pytest.fixture
def loaders(comfy):
    """ComfyUI's loader nodes; what a test loaded is unloaded after it (ComfyUI keeps an encoder it ran loaded)."""
    import nodes
    from comfy import model_management

    yield nodes
    model_management.unload_all_models()
    gc.collect()


def test_flux_files_load_as_float32(comfy, loaders):
    from tiny.flux import ALIMAMA_CONTROLNET, CLIP_L, FLUX_DEV, FLUX_FILL, T5XXL, VAE

    for name in (FLUX_DEV, FLUX_FILL):
        comfy.ensure_model("diffusion_models", name)
        (model,) = loaders.UNETLoader().load_unet(name, "default")
        assert computes_in_float32(model.model), (name, floating_dtypes(model.model), model.model.manual_cast_dtype)
        del model
        gc.collect()  # two 2 GB models, one at a time
    comfy.ensure_model("vae", VAE)
    (vae,) = loaders.VAELoader().load_vae(VAE)
    assert vae.vae_dtype == torch.float32 and floating_dtypes(vae.first_stage_model) == {torch.float32}
    for name in (CLIP_L, T5XXL):
        comfy.ensure_model("text_encoders", name)
    (clip,) = loaders.DualCLIPLoader().load_clip(CLIP_L, T5XXL, "flux")
    assert encodes_in_float32(clip)
    comfy.ensure_model("controlnet", ALIMAMA_CONTROLNET)
    (controlnet,) = loaders.ControlNetLoader().load_controlnet(ALIMAMA_CONTROLNET)
    assert computes_in_float32(controlnet.control_model), floating_dtypes(controlnet.control_model)


@pytest.mark.parametrize("module_name", ["sd_inpaint_checkpoint", "smarteraser"])
def test_sd_checkpoints_load_as_float32(comfy, loaders, module_name):
    import importlib

    tiny = importlib.import_module(f"tiny.{module_name}")
    comfy.ensure_model("checkpoints", tiny.CHECKPOINT)
    model, clip, vae = loaders.CheckpointLoaderSimple().load_checkpoint(tiny.CHECKPOINT)[:3]
    assert computes_in_float32(model.model), floating_dtypes(model.model)
    assert encodes_in_float32(clip)
    assert vae.vae_dtype == torch.float32


def test_clip_vision_loads_as_float32(comfy, loaders):
    from tiny.smarteraser import CLIP_VISION

    comfy.ensure_model("clip_vision", CLIP_VISION)
    (vision,) = loaders.CLIPVisionLoader().load_clip(CLIP_VISION)
    image = torch.rand(1, 64, 64, 3)
    assert output_dtypes(vision.model, lambda: vision.encode_image(image)) == {torch.float32}
