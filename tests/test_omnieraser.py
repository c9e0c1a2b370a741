"""OmniEraser core: the official condition layout, packing, and the LoRA mapping onto ComfyUI FLUX names.

The reference is diffusers (a tiny random ``FluxTransformer2DModel`` with the official widening and a PEFT LoRA on
the official targets); the ComfyUI side of the parity is in tests/comfy/test_omnieraser.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erasekit.erasers import omnieraser as oe

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return model.eval()


def official_lora_state_dict(model, rank=4, seed=1):
    """A random rank-``rank`` PEFT LoRA on the official targets, saved as the official file is (``transformer.``)."""
    torch.manual_seed(seed)
    model.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(oe.LORA_TARGETS), init_lora_weights=False))
    state = peft.get_peft_model_state_dict(model)
    return {f"transformer.{k}": v.detach().clone() for k, v in state.items()}


def to_comfy_layout(sd, depth, depth_single):
    """diffusers FLUX weights → ComfyUI FLUX names, written out by hand (independent of the module under test)."""
    out = {
        "img_in.weight": sd["x_embedder.weight"],
        "txt_in.weight": sd["context_embedder.weight"],
        "final_layer.linear.weight": sd["proj_out.weight"],
    }
    for i in range(depth):
        d, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
        out[f"{c}.img_attn.qkv.weight"] = torch.cat([sd[f"{d}.attn.to_{x}.weight"] for x in "qkv"])
        out[f"{c}.txt_attn.qkv.weight"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.weight"] for x in "qkv"])
        out[f"{c}.img_attn.proj.weight"] = sd[f"{d}.attn.to_out.0.weight"]
        out[f"{c}.txt_attn.proj.weight"] = sd[f"{d}.attn.to_add_out.weight"]
        out[f"{c}.img_mlp.0.weight"] = sd[f"{d}.ff.net.0.proj.weight"]
        out[f"{c}.img_mlp.2.weight"] = sd[f"{d}.ff.net.2.weight"]
        out[f"{c}.txt_mlp.0.weight"] = sd[f"{d}.ff_context.net.0.proj.weight"]
        out[f"{c}.txt_mlp.2.weight"] = sd[f"{d}.ff_context.net.2.weight"]
    for i in range(depth_single):
        d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        out[f"{c}.linear1.weight"] = torch.cat([sd[f"{d}.attn.to_{x}.weight"] for x in "qkv"] + [sd[f"{d}.proj_mlp.weight"]])
        out[f"{c}.linear2.weight"] = sd[f"{d}.proj_out.weight"]
    return out


def base_weights(model):
    """Model weights without PEFT wrappers (``base_layer``) under their plain diffusers names."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


# ---------------------------------------------------------------------------------------------- condition


def test_condition_images_match_official_masking():
    torch.manual_seed(0)
    image = torch.rand(2, 32, 48, 3)
    mask = torch.rand(1, 32, 48)
    background, foreground = oe.condition_images(image, mask)
    # Official: in [-1, 1], masked_image[mask > 0.5] = -1; foreground[mask < 0.5] = -1 (after binarising at 0.5).
    pixels = image * 2 - 1
    binary = (mask >= 0.5)[..., None].expand_as(pixels)
    official_bg = pixels.clone()
    official_bg[binary] = -1
    official_fg = pixels.clone()
    official_fg[~binary] = -1
    assert torch.allclose(background * 2 - 1, official_bg, atol=1e-6)
    assert torch.allclose(foreground * 2 - 1, official_fg, atol=1e-6)


def test_condition_latent_layout():
    torch.manual_seed(0)
    background, foreground = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 4, 6)
    mask = torch.zeros(1, 32, 48)
    mask[0, 8:9, 16:17] = 1  # one pixel at a block's top-left corner: nearest picks it
    mask[0, 17:24, 33:40] = 1  # a block minus its top-left pixel: nearest misses it
    cond = oe.condition_latent(background, foreground, mask)
    assert cond.shape == (2, 48, 4, 6)
    assert torch.equal(cond[:, :16], background) and torch.equal(cond[:, 16:32], foreground)
    expected = torch.ones(4, 6)
    expected[1, 2] = 0
    for channel in range(32, 48):
        assert torch.equal(cond[0, channel], expected) and torch.equal(cond[1, channel], expected)


def test_packing_matches_diffusers():
    from diffusers import FluxPipeline

    latent = torch.randn(2, 48, 6, 8)
    packed = oe.pack_latents(latent)
    assert torch.equal(packed, FluxPipeline._pack_latents(latent, 2, 48, 6, 8))
    assert torch.equal(oe.unpack_latents(packed, 6, 8), latent)
    noise = torch.randn(2, 16, 6, 8)
    assert oe.packed_model_input(noise, latent).shape == (2, 12, 256)


# ---------------------------------------------------------------------------------------------- LoRA mapping


@pytest.fixture(scope="module")
def lora_setup():
    model = oe.widen_x_embedder(tiny_flux())
    base = base_weights(model)
    lora = official_lora_state_dict(model)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    merged = base_weights(model)
    return base, lora, merged


def _shapes(weights):
    return {k: tuple(v.shape) for k, v in weights.items()}


def test_official_lora_maps_every_key_and_merges_like_peft(lora_setup):
    base, lora, merged = lora_setup
    assert lora["transformer.x_embedder.lora_A.weight"].shape == (4, 256)
    comfy_base = to_comfy_layout(base, 2, 2)
    comfy_base["img_in.weight"] = comfy_base["img_in.weight"][:, :64].clone()  # ComfyUI holds the unwidened FLUX
    mapping = oe.map_lora(lora, _shapes(comfy_base))
    assert mapping.unmatched == []
    assert mapping.widened_in_features == 256
    assert len(mapping.patches) * 2 == len(lora)
    patched = oe.merge_lora(comfy_base, mapping)
    expected = to_comfy_layout(merged, 2, 2)
    touched = {p.target.key for p in mapping.patches}
    assert len(touched) == 2 * 8 + 2 + 1  # per double block 2 qkv + 2 proj + 4 mlp, per single block linear1, img_in
    for key in touched:
        assert patched[key].shape == expected[key].shape
        assert torch.allclose(patched[key], expected[key], atol=1e-5), key


def _to_kohya(lora, comfy_names):
    """Rename an official LoRA: kohya flattened diffusers names, or ComfyUI names with lora_down/lora_up + alpha."""
    out = {}
    for key, value in lora.items():
        module = key[len("transformer."):].rsplit(".lora_", 1)[0]
        part = "lora_down" if ".lora_A." in key else "lora_up"
        name = ("lora_transformer_" + module.replace(".", "_")) if not comfy_names else module
        out[f"{name}.{part}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if part == "lora_down" else value.shape[1]))
    return out


def test_kohya_and_comfy_namings_give_the_same_merge(lora_setup):
    base, lora, _ = lora_setup
    comfy_base = to_comfy_layout(base, 2, 2)
    comfy_base["img_in.weight"] = comfy_base["img_in.weight"][:, :64].clone()
    reference = oe.merge_lora(comfy_base, oe.map_lora(lora, _shapes(comfy_base)))
    kohya = oe.map_lora(_to_kohya(lora, False), _shapes(comfy_base))
    assert kohya.unmatched == [] and kohya.naming == "kohya"
    merged = oe.merge_lora(comfy_base, kohya)
    for key in reference:
        assert torch.allclose(merged[key], reference[key], atol=1e-6), key

    # ComfyUI/BFL naming with fused qkv: build it from the reference merge of the q/k/v slices.
    fused = {}
    hidden = 32
    for i in range(2):
        a = torch.cat([lora[f"transformer.transformer_blocks.{i}.attn.to_{x}.lora_A.weight"] for x in "qkv"])
        b = torch.block_diag(*[lora[f"transformer.transformer_blocks.{i}.attn.to_{x}.lora_B.weight"] for x in "qkv"])
        fused[f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_A.weight"] = a
        fused[f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_B.weight"] = b
    fused["diffusion_model.img_in.lora_A.weight"] = lora["transformer.x_embedder.lora_A.weight"]
    fused["diffusion_model.img_in.lora_B.weight"] = lora["transformer.x_embedder.lora_B.weight"]
    comfy = oe.map_lora(fused, _shapes(comfy_base))
    assert comfy.unmatched == [] and comfy.naming == "comfyui"
    merged = oe.merge_lora(comfy_base, comfy)
    for i in range(2):
        key = f"double_blocks.{i}.img_attn.qkv.weight"
        assert merged[key].shape == (3 * hidden, hidden)
        assert torch.allclose(merged[key], reference[key], atol=1e-5)
    assert torch.allclose(merged["img_in.weight"], reference["img_in.weight"], atol=1e-6)


def test_controlnet_variant_lora_does_not_widen(lora_setup):
    base, _, _ = lora_setup
    model = tiny_flux()
    lora = official_lora_state_dict(model)
    assert lora["transformer.x_embedder.lora_A.weight"].shape == (4, 64)
    mapping = oe.map_lora(lora, _shapes(to_comfy_layout(base_weights(model), 2, 2)))
    assert mapping.unmatched == [] and mapping.widened_in_features is None


def test_unmatched_keys_are_listed_not_dropped(lora_setup):
    base, lora, _ = lora_setup
    shapes = _shapes(to_comfy_layout(base, 1, 1))  # a model with fewer blocks than the LoRA
    shapes["img_in.weight"] = (32, 64)
    extra = dict(lora)
    extra["transformer.mystery.lora_A.weight"] = torch.zeros(4, 4)
    extra["text_encoder.foo.lora_A.weight"] = torch.zeros(4, 4)
    unmatched = oe.unmatched_keys(extra, shapes)
    assert "transformer.mystery.lora_A.weight" in unmatched and "text_encoder.foo.lora_A.weight" in unmatched
    assert "transformer.transformer_blocks.1.attn.to_q.lora_A.weight" in unmatched
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" not in unmatched
    # Without a model, the depth comes from the keys themselves: the official file maps completely.
    assert oe.unmatched_keys(lora) == []


def test_sd_loras_and_misfits_are_rejected_with_a_sentence(lora_setup):
    base, lora, _ = lora_setup
    sd15 = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
    }
    with pytest.raises(ValueError, match="SD1.5/SDXL"):
        oe.map_lora(sd15)
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)}
    with pytest.raises(ValueError, match="SDXL"):
        oe.map_lora(sdxl)
    shapes = _shapes(to_comfy_layout(base, 2, 2))
    shapes["double_blocks.0.img_mlp.0.weight"] = (64, 16)
    with pytest.raises(ValueError, match="img_mlp.0"):
        oe.map_lora(lora, shapes)


def test_official_packed_input_through_widened_diffusers_uses_all_256_features():
    """The widened x_embedder sees noise (first 64) and condition (last 192) features, in that order."""
    model = oe.widen_x_embedder(tiny_flux())
    with torch.no_grad():
        model.x_embedder.weight[:, 64:].normal_()
    noise, cond = torch.randn(1, 16, 4, 4), torch.randn(1, 48, 4, 4)
    packed = oe.packed_model_input(noise, cond)
    direct = F.linear(packed, model.x_embedder.weight, model.x_embedder.bias)
    split = (F.linear(oe.pack_latents(noise), model.x_embedder.weight[:, :64], model.x_embedder.bias)
             + F.linear(oe.pack_latents(cond), model.x_embedder.weight[:, 64:]))
    assert torch.allclose(direct, split, atol=1e-5)


def test_trained_norm_scales_replace_the_comfy_weights(lora_setup):
    """--train_norm_layers saves full RMSNorm scales; they map onto ComfyUI's query/key_norm scales."""
    base, lora, _ = lora_setup
    comfy_base = to_comfy_layout(base, 2, 2)
    comfy_base["double_blocks.1.img_attn.norm.query_norm.scale"] = torch.ones(16)
    comfy_base["single_blocks.0.norm.key_norm.scale"] = torch.ones(16)
    comfy_base["img_in.weight"] = comfy_base["img_in.weight"][:, :64].clone()
    with_norms = dict(lora)
    with_norms["transformer.transformer_blocks.1.attn.norm_q.weight"] = torch.full((16,), 2.0)
    with_norms["transformer.single_transformer_blocks.0.attn.norm_k.weight"] = torch.full((16,), 3.0)
    mapping = oe.map_lora(with_norms, _shapes(comfy_base))
    assert mapping.unmatched == []
    merged = oe.merge_lora(comfy_base, mapping)
    assert torch.equal(merged["double_blocks.1.img_attn.norm.query_norm.scale"], torch.full((16,), 2.0))
    assert torch.equal(merged["single_blocks.0.norm.key_norm.scale"], torch.full((16,), 3.0))
    # A full linear weight is not a LoRA: refused, not silently written over FLUX.
    full = dict(lora)
    full["transformer.transformer_blocks.0.attn.to_q.weight"] = torch.zeros(32, 32)
    assert oe.unmatched_keys(full, _shapes(comfy_base)) == ["transformer.transformer_blocks.0.attn.to_q.weight"]


@pytest.mark.parametrize("steps,height,width", [(28, 1024, 1024), (28, 768, 1344), (3, 64, 48), (50, 512, 512)])
def test_pipeline_timesteps_shifted_are_diffusers_flux_sigmas(steps, height, width):
    """linspace(1, 1/steps, steps) through FLUX's exponential shift with mu for the image's tokens is exactly the
    schedule FlowMatchEulerDiscreteScheduler gives the official pipeline (what ModelSamplingFlux's sigma() does)."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from erasekit.erasers.omnieraser import pipeline_timesteps

    mu = calculate_shift((height // 16) * (width // 16), 256, 4096, 0.5, 1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    t = pipeline_timesteps(steps)
    ours = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert t.dtype == torch.float32 and t.shape == (steps,)
    assert (ours - scheduler.sigmas[:-1]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="at least 1"):
        pipeline_timesteps(0)
