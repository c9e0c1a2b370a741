"""OmniEraser through ComfyUI's own FLUX: parity with diffusers, the loader node's errors, and the workflows.

Parity: on a tiny random FLUX (built from a config on both sides), the velocity ComfyUI predicts through EraseKit's
LoRA mapping, img_in widening (ComfyUI patches) and condition (the concat_cond object patch, fed through ComfyUI's
own process_conds / calc_cond_batch with CFG batching) equals diffusers' FluxTransformer2DModel with the official
widening, the same LoRA loaded by diffusers and the official packed condition; and through the conditioning node,
VAE encode included, against the condition the official pipeline builds.

Workflows: every FLUX example workflow hands its sampler diffusers' token-count-shifted sigmas for the crop's size
and (OmniEraser) a 512-token T5 prompt; the omnieraser graph returns the photo outside the crop bit for bit.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from harness import PromptError, SamplerSpy, small_prompt

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY = dict(in_channels=16, out_channels=16, vec_in_dim=20, context_in_dim=24, hidden_size=32, mlp_ratio=4.0,
            num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True,
            guidance_embed=True, patch_size=2, image_model="flux")
SHIFT, SCALE = 0.1159, 0.3611  # FLUX VAE shift_factor / scaling_factor (diffusers config)


def pack_module(comfy, name):
    return importlib.import_module(f"{comfy.pack_module().__name__}.{name}")


def diffusers_flux(seed=0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():  # diffusers zero-inits some layers; random everywhere makes the check meaningful
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.ndim == 2 else 0.02)
    return model.eval()


def comfy_flux(diffusers_model):
    """ComfyUI's FLUX (model_base.Flux) of the same config, weights converted by ComfyUI's own diffusers map."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(dict(TINY))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    # convert_diffusers_mmdit writes some converted weights (final adaLN swap) into its input: give it copies.
    source = {k: v.detach().clone() for k, v in diffusers_model.state_dict().items()}
    weights = comfy.model_detection.convert_diffusers_mmdit(source, "diffusion_model.")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not [k for k in missing if k.startswith("diffusion_model.")] and not unexpected
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def official_lora(model, rank=4, seed=1, widened=True):
    """Random rank-4 LoRA on every official target (x_embedder included), in the official file's key format."""
    from erasekit.erasers.omnieraser import LORA_TARGETS

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            cols = module.in_features * (4 if name == "x_embedder" and widened else 1)
            out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) / cols ** 0.5
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.2
    return out


def official_condition(background_raw, foreground_raw, mask):
    """The official pipeline's condition, written out as it does it (prepare_image_with_mask)."""
    masks = (mask >= 0.5).float()[:, None]
    masks = F.interpolate(masks, size=(masks.shape[2] // 8, masks.shape[3] // 8))
    masks = (1 - masks).repeat(1, 16, 1, 1)
    return torch.cat([(background_raw - SHIFT) * SCALE, (foreground_raw - SHIFT) * SCALE, masks], dim=1)


def pack(latent):
    from diffusers import FluxPipeline

    b, c, h, w = latent.shape
    return FluxPipeline._pack_latents(latent, b, c, h, w)


def diffusers_velocity(model, noise, condition, context, pooled, sigma, guidance):
    from diffusers import FluxPipeline

    b, _, h, w = noise.shape
    hidden = torch.cat([pack(noise), pack(condition)], dim=2)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noise.device, noise.dtype)
    txt_ids = torch.zeros(context.shape[1], 3)
    with torch.no_grad():
        out = model(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
                    timestep=torch.full((b,), sigma), img_ids=img_ids, txt_ids=txt_ids,
                    guidance=torch.full((b,), guidance), return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


@pytest.fixture(scope="module")
def parity_inputs():
    generator = torch.Generator().manual_seed(3)
    batch, height, width = 2, 64, 80
    mask = torch.zeros(batch, height, width)
    mask[0, 12:40, 20:53] = 1.0
    mask[1, 30:61, 5:30] = 0.8
    mask[1, 2:9, 60:77] = 0.3  # below the 0.5 threshold: kept
    return dict(
        noise=torch.randn(batch, 16, height // 8, width // 8, generator=generator),
        background=torch.randn(batch, 16, height // 8, width // 8, generator=generator),
        foreground=torch.randn(batch, 16, height // 8, width // 8, generator=generator),
        mask=mask,
        context=torch.randn(batch, 7, 24, generator=generator),
        negative_context=torch.randn(batch, 7, 24, generator=generator),
        pooled=torch.randn(batch, 20, generator=generator),
        sigma=0.7,
    )


def comfy_velocities(comfy_module, patcher, inputs, strength_guidance=3.5):
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    condition = {"background": inputs["background"], "foreground": inputs["foreground"], "mask": inputs["mask"]}
    key = comfy_module.CONDITION_KEY
    positive = [[inputs["context"], {"pooled_output": inputs["pooled"], "guidance": strength_guidance, key: condition}]]
    negative = [[inputs["negative_context"], {"pooled_output": inputs["pooled"], "guidance": strength_guidance, key: condition}]]
    comfy.model_management.load_models_gpu([patcher])
    patcher.pre_run()
    try:
        noise = inputs["noise"]
        conds = {"positive": comfy.sampler_helpers.convert_cond(positive),
                 "negative": comfy.sampler_helpers.convert_cond(negative)}
        conds = comfy.samplers.process_conds(patcher.model, noise, conds,
                                             noise.device, latent_image=torch.zeros_like(noise), seed=0)
        sigma = torch.full((noise.shape[0],), inputs["sigma"])
        # Both conds in one call: ComfyUI batches cond and uncond together, as for CFG > 1.
        denoised = comfy.samplers.calc_cond_batch(patcher.model, [conds["positive"], conds["negative"]], noise, sigma,
                                                  patcher.model_options)
        return [(noise - d) / inputs["sigma"] for d in denoised]
    finally:
        patcher.cleanup()
        patcher.detach()


def test_parity_with_diffusers_official_layout(comfy, parity_inputs):
    nodes_oe = pack_module(comfy, "nodes.omnieraser")
    from erasekit.erasers.omnieraser import widen_x_embedder

    reference = diffusers_flux()
    patcher = comfy_flux(reference)
    original_img_in = patcher.model.diffusion_model.img_in.weight.detach().clone()
    lora = official_lora(reference)

    patched, mapping = nodes_oe.apply_omnieraser_lora(patcher, lora, 1.0)
    assert mapping.unmatched == [] and mapping.widened_in_features == 256
    velocity, negative_velocity = comfy_velocities(nodes_oe, patched, parity_inputs)

    widen_x_embedder(reference)
    reference.load_lora_adapter(lora, prefix="transformer")
    cond = official_condition(parity_inputs["background"], parity_inputs["foreground"], parity_inputs["mask"])
    args = (parity_inputs["noise"], cond)
    expected = diffusers_velocity(reference, *args, parity_inputs["context"], parity_inputs["pooled"], parity_inputs["sigma"], 3.5)
    expected_negative = diffusers_velocity(reference, *args, parity_inputs["negative_context"], parity_inputs["pooled"],
                                           parity_inputs["sigma"], 3.5)
    assert velocity.abs().mean() > 0.1 and not torch.allclose(velocity, negative_velocity, atol=1e-2)
    assert (velocity - expected).abs().max() <= 1e-4
    assert (negative_velocity - expected_negative).abs().max() <= 1e-4

    # The LoRA is a patch: unpatching restores FLUX's own 64-wide img_in and its concat_cond.
    assert tuple(patcher.model.diffusion_model.img_in.weight.shape) == (32, 64)
    assert torch.equal(patcher.model.diffusion_model.img_in.weight, original_img_in)
    from comfy import model_base

    assert getattr(patcher.model.concat_cond, "__func__", None) is model_base.Flux.concat_cond


def test_strength_scales_the_lora_like_diffusers(comfy, parity_inputs):
    nodes_oe = pack_module(comfy, "nodes.omnieraser")
    from erasekit.erasers.omnieraser import widen_x_embedder

    reference = diffusers_flux(seed=5)
    patcher = comfy_flux(reference)
    lora = official_lora(reference, seed=6)
    patched, _ = nodes_oe.apply_omnieraser_lora(patcher, lora, 0.5)
    velocity, _ = comfy_velocities(nodes_oe, patched, parity_inputs)
    widen_x_embedder(reference)
    reference.load_lora_adapter(lora, prefix="transformer", adapter_name="oe")
    reference.set_adapters(["oe"], weights=[0.5])
    cond = official_condition(parity_inputs["background"], parity_inputs["foreground"], parity_inputs["mask"])
    expected = diffusers_velocity(reference, parity_inputs["noise"], cond, parity_inputs["context"],
                                  parity_inputs["pooled"], parity_inputs["sigma"], 3.5)
    assert (velocity - expected).abs().max() <= 1e-4


def test_missing_condition_and_foreign_loras_are_clear_errors(comfy, parity_inputs):
    nodes_oe = pack_module(comfy, "nodes.omnieraser")
    from comfy import model_management, sampler_helpers, samplers

    reference = diffusers_flux()
    patcher = comfy_flux(reference)
    patched, _ = nodes_oe.apply_omnieraser_lora(patcher, official_lora(reference), 1.0)
    plain = sampler_helpers.convert_cond([[parity_inputs["context"], {"pooled_output": parity_inputs["pooled"]}]])
    model_management.load_models_gpu([patched])
    try:
        with pytest.raises(ValueError, match="OmniEraser Conditioning"):
            samplers.process_conds(patched.model, parity_inputs["noise"], {"positive": plain}, "cpu", seed=0)
    finally:
        patched.detach()

    sd15 = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}
    with pytest.raises(ValueError, match="SD1.5/SDXL"):
        nodes_oe.apply_omnieraser_lora(patcher, sd15, 1.0)
    extra = official_lora(reference)
    extra["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="transformer_blocks.7.attn.to_q"):
        nodes_oe.apply_omnieraser_lora(patcher, extra, 1.0)


def test_full_width_flux_takes_the_official_lora_file_with_zero_unmatched_keys(comfy):
    """The tiny full-width FLUX (as ComfyUI detects it from the file) and the rank-4 official-format LoRA."""
    nodes_oe = pack_module(comfy, "nodes.omnieraser")
    from comfy import sd as comfy_sd, utils as comfy_utils

    model_path = comfy.ensure_model("diffusion_models", "flux1-dev.safetensors")
    lora_path = comfy.ensure_model("loras", "omnieraser_lora.safetensors")
    model = comfy_sd.load_diffusion_model(str(model_path))
    lora = comfy_utils.load_torch_file(str(lora_path), safe_load=True)
    patched, mapping = nodes_oe.apply_omnieraser_lora(model, lora, 1.0)
    assert mapping.unmatched == [] and mapping.widened_in_features == 256
    assert len(mapping.patches) * 2 == len(lora)


def comfy_velocities_for(patcher, positive, negative, noise, sigma_value):
    """Velocities ComfyUI's FLUX predicts for two conditionings (batched together, as for CFG)."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    comfy.model_management.load_models_gpu([patcher])
    patcher.pre_run()
    try:
        conds = {"positive": comfy.sampler_helpers.convert_cond(positive),
                 "negative": comfy.sampler_helpers.convert_cond(negative)}
        conds = comfy.samplers.process_conds(patcher.model, noise, conds, noise.device,
                                             latent_image=torch.zeros_like(noise), seed=0)
        sigma = torch.full((noise.shape[0],), sigma_value)
        denoised = comfy.samplers.calc_cond_batch(patcher.model, [conds["positive"], conds["negative"]], noise, sigma,
                                                  patcher.model_options)
        return [(noise - d) / sigma_value for d in denoised]
    finally:
        patcher.cleanup()
        patcher.detach()


def test_conditioning_node_gives_the_official_condition(comfy, parity_inputs):
    """Through the node (VAE encode included): the velocity equals diffusers' on the condition the official
    pipeline builds (prepare_image_with_mask). Fails if background and foreground are swapped."""
    from comfy import sd as comfy_sd, utils as comfy_utils

    nodes_oe = pack_module(comfy, "nodes.omnieraser")
    from erasekit.erasers.omnieraser import widen_x_embedder

    vae = comfy_sd.VAE(sd=comfy_utils.load_torch_file(str(comfy.ensure_model("vae", "ae.safetensors"))))
    generator = torch.Generator().manual_seed(8)
    mask = parity_inputs["mask"]
    image = torch.rand(mask.shape[0], mask.shape[1], mask.shape[2], 3, generator=generator)
    positive = [[parity_inputs["context"], {"pooled_output": parity_inputs["pooled"], "guidance": 3.5}]]
    negative = [[parity_inputs["negative_context"], {"pooled_output": parity_inputs["pooled"], "guidance": 3.5}]]
    positive, negative, latent = nodes_oe.OmniEraserConditioning.execute(positive, negative, vae, image, mask).args
    noise = torch.randn(latent["samples"].shape, generator=generator)

    reference = diffusers_flux(seed=2)
    lora = official_lora(reference, seed=4)
    patched, _ = nodes_oe.apply_omnieraser_lora(comfy_flux(reference), lora, 1.0)
    velocity, negative_velocity = comfy_velocities_for(patched, positive, negative, noise, 0.6)

    # The official images, in [-1, 1]: the masked pixels set to -1, resp. the unmasked ones.
    pixels = image.movedim(-1, 1) * 2 - 1
    remove = (mask >= 0.5)[:, None].expand(-1, 3, -1, -1)
    masked_image, foreground = pixels.clone(), pixels.clone()
    masked_image[remove] = -1
    foreground[~remove] = -1
    encode = lambda x: vae.encode(((x + 1) / 2).movedim(1, -1)).float()  # noqa: E731
    condition = official_condition(encode(masked_image), encode(foreground), mask)
    widen_x_embedder(reference)
    reference.load_lora_adapter(lora, prefix="transformer")
    expected = diffusers_velocity(reference, noise, condition, parity_inputs["context"], parity_inputs["pooled"], 0.6, 3.5)
    assert velocity.abs().mean() > 0.1
    assert (velocity - expected).abs().max() <= 1e-4


def _flux_schedule(steps, height, width):
    """diffusers' FLUX.1-dev schedule for a height x width image: calculate_shift(tokens) into the scheduler."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # FLUX.1-dev's (and FLUX.1-Fill-dev's) scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    mu = calculate_shift((height // 16) * (width // 16), 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


STEPS = 3  # 10000 / 3 is no integer: ComfyUI's 'simple' scheduler would land 7e-5 off


@pytest.mark.parametrize("name", ["omnieraser", "omnieraser_controlnet", "omnieraser_whole_image", "sra_flux_fill"])
def test_flux_workflows_sample_the_official_schedule_for_the_crop(comfy, sampler_spy, name):
    """Each FLUX workflow at a 64 px working size, up to its sampler: the sampler gets diffusers' calculate_shift
    schedule for the crop's own size (1e-6), and the OmniEraser prompt T5-encoded to 512 tokens. The run stops
    there (512 text tokens make each FLUX step cost seconds on a CPU; tests/comfy/test_workflows.py runs the
    graphs whole)."""

    prompt, _ = small_prompt(comfy, name, STEPS)
    sampler_spy.stop = True
    with pytest.raises(PromptError, match=SamplerSpy.STOPPED):
        comfy.run_prompt(prompt)
    assert len(sampler_spy.calls) == 1
    call = sampler_spy.calls[0]
    height, width = call["latent"][-2] * 8, call["latent"][-1] * 8
    assert max(height, width) == 64  # the crop's working size, as the crop node made it
    expected = _flux_schedule(STEPS, height, width)
    assert call["sigmas"].shape == expected.shape
    assert (call["sigmas"] - expected).abs().max() <= 1e-6
    if name.startswith("omnieraser"):
        assert call["tokens"]["positive"] == [512] and call["tokens"]["negative"] == [512]


def test_omnieraser_workflow_returns_the_photo_outside_the_crop_bit_for_bit(comfy, sampler_spy):
    """The whole omnieraser graph (one step): the crop node's size reaches the sampler, and the stitched photo equals
    the input outside the crop box."""
    import numpy as np
    from PIL import Image

    prompt, crop_id = small_prompt(comfy, "omnieraser", 1)
    prompt[crop_id]["inputs"]["context"] = 0.1  # room.png's mask with 0.75 context spans the whole photo
    result = comfy.run_prompt(prompt)
    crop = result.outputs(crop_id)
    height, width = crop[0].shape[1:3]
    assert (crop[3], crop[4]) == (width, height)
    assert sampler_spy.calls[0]["latent"][-2:] == (height // 8, width // 8)
    saver = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    saved = result.ui[saver]["images"][0]
    output = np.asarray(Image.open(comfy.output_dir / saved["subfolder"] / saved["filename"]).convert("RGB"))
    loader = next(v for v in prompt.values() if v["class_type"] == "LoadImage")
    photo = np.asarray(Image.open(comfy.input_dir / loader["inputs"]["image"]).convert("RGB"))
    info = crop[2]
    outside = np.ones(photo.shape[:2], bool)
    outside[info.y0:info.y1, info.x0:info.x1] = False
    assert output.shape == photo.shape and outside.sum() > 0
    assert np.array_equal(output[outside], photo[outside])
    assert not np.array_equal(output[~outside], photo[~outside])
