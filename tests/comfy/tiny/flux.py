"""Tiny FLUX.1 model files for the ComfyUI tests and example workflows (seeded random weights, no downloads).

What ComfyUI reads from each file, and so how small each can be (ComfyUI 0.3.64):
- FLUX transformer (UNETLoader): detection fixes hidden 3072, 24 heads, context 4096, mlp ×4; depth is counted,
  so one double + one single block = 545 M parameters (bf16, ~1.1 GB). The Fill variant has img_in 384 wide.
- FLUX VAE ``ae.safetensors`` (VAELoader): the SD-style config is fixed (ch 128, ch_mult 1-2-4-4, 2 res blocks);
  only z_channels (16) is read from the file. Full structure, 84 M parameters (bf16).
- CLIP-L ``clip_l.safetensors``: ComfyUI's fixed CLIP-L config (12 layers, 768); full size, 123 M (fp16).
- T5-XXL ``t5xxl_fp16.safetensors``: **cannot be small through DualCLIPLoader(type=flux).** ``FluxClipModel``
  always builds ``T5XXLModel`` from ``comfy/text_encoders/t5_config_xxl.json`` (24 layers, d_model 4096,
  d_ff 10240, 64 heads: 4.7 B parameters, ~9.5 GB, minutes per prompt on CPU); ``load_sd`` copies whatever the
  file has into that fixed shape and leaves the rest uninitialised. The only size override ComfyUI has is
  ``model_options["t5xxl_model_config"]`` (read in ``sd1_clip.SDClipModel``), and no loader node fills it from
  the file. Least-bad honest option: the file is a genuine T5 encoder in T5-XXL naming (d_model 4096 as FLUX's
  context needs, full 32128 vocab, 1 layer, small heads/ff), and ``install_t5_sizing()`` makes
  ``comfy.sd.load_text_encoder_state_dicts`` pass that override *sized from the file itself*. For the real
  t5xxl file the derived config equals the json, so the shim changes nothing there; it is test-only code and is
  installed when this file is built (the harness builds files before running a workflow).
- LoRAs: the official OmniEraser format (diffusers/PEFT keys, ``transformer.`` prefix, no alpha), rank 4,
  every official target module including ``x_embedder`` (lora_A 256 wide: the widening); the ControlNet
  variant's LoRA is the same with x_embedder 64 wide.
- alimama FLUX.1-dev-Controlnet-Inpainting-Beta (ControlNetLoader): diffusers FluxControlNetModel keys; ComfyUI
  fixes the width like FLUX and counts blocks: one double block, extra condition channels 4 (mask concat).
"""
import functools

import torch

FLUX_DEV = "flux1-dev.safetensors"
FLUX_FILL = "flux1-fill-dev.safetensors"
VAE = "ae.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
OMNIERASER_LORA = "omnieraser_lora.safetensors"
OMNIERASER_CONTROLNET_LORA = "omnieraser_controlnet_lora.safetensors"
ALIMAMA_CONTROLNET = "FLUX.1-dev-Controlnet-Inpainting-Beta.safetensors"

HIDDEN = 3072
HEADS = 24
# ComfyUI's FLUX.1-dev (comfy.ldm.flux.model.Flux keyword arguments): 19 double + 38 single blocks; the tiny files
# and the benchmarks (benchmarks/omnieraser.py, train.py) change depth and widths from here.
FLUX_DEV_PARAMS = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                       hidden_size=HIDDEN, mlp_ratio=4.0, num_heads=HEADS, depth=19, depth_single_blocks=38,
                       axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2)
# Official OmniEraser LoRA targets (train_control_lora_flux.py), as PEFT suffixes.
LORA_TARGETS = ("x_embedder", "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2")


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def random_like_shapes(shapes, seed, dtype=torch.bfloat16, std_scale=1.0):
    """Seeded weights for a shape table: linear/conv weights uniform with std std_scale/sqrt(fan_in), biases
    small, norm scales 1. One generator, keys in sorted order: the same call always writes the same bytes. ``dtype``
    is the file's storage, as in the real files; on a CPU ComfyUI computes every model in float32
    (tests/comfy/test_compute_dtype.py)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith((".scale", "norm.weight")) or (len(shape) == 1 and ("norm" in key and key.endswith(".weight"))):
            out[key] = torch.ones(shape, dtype=dtype)
        else:
            # Uniform with the wanted standard deviation: cheaper than randn for half a billion weights.
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 0
            std = 0.02 if len(shape) == 1 else std_scale / fan_in ** 0.5
            half_width = std * 3 ** 0.5
            out[key] = torch.empty(shape, dtype=dtype).uniform_(-half_width, half_width, generator=generator)
    return out


def comfy_flux_shapes(depth=1, depth_single=1, in_channels=16, vec_in_dim=768, context_in_dim=4096):
    """Weight shapes of ComfyUI's own FLUX (built on the meta device, so nothing is allocated)."""
    import comfy.ldm.flux.model
    import comfy.ops

    params = dict(FLUX_DEV_PARAMS, in_channels=in_channels, vec_in_dim=vec_in_dim, context_in_dim=context_in_dim,
                  depth=depth, depth_single_blocks=depth_single)
    model = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, device="meta", **params)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_flux(path, in_channels=16, seed=10):
    """FLUX.1-dev (or Fill, in_channels 96) with one double and one single block at ComfyUI's fixed width."""
    _save(random_like_shapes(comfy_flux_shapes(in_channels=in_channels), seed), path)


def flux_vae_shapes():
    """FLUX autoencoder (``ae.safetensors`` naming: encoder./decoder., no quant convs) on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                            use_quant_conv=False, use_post_quant_conv=False)
    return {k: tuple(v.shape) for k, v in vae.state_dict().items()}


def build_vae(path, seed=11):
    """The FLUX VAE in BFL's ae.safetensors naming (ComfyUI's loader takes the SD-VAE layout, z 16)."""
    import comfy.diffusers_convert

    shapes = flux_vae_shapes()
    weights = random_like_shapes(shapes, seed, dtype=torch.float32)
    converted = comfy.diffusers_convert.convert_vae_state_dict(weights)
    _save({k: v.to(torch.bfloat16) for k, v in converted.items()}, path)


def build_clip_l(path, seed=12):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    from transformers import CLIPTextModelWithProjection

    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "position_ids" not in k}
    _save(random_like_shapes(shapes, seed, dtype=torch.float16), path)


T5_TINY = dict(num_layers=1, d_model=4096, d_kv=8, num_heads=2, d_ff=32, vocab_size=32128)


def t5_shapes(num_layers, d_model, d_kv, num_heads, d_ff, vocab_size):
    inner = d_kv * num_heads
    shapes = {"shared.weight": (vocab_size, d_model), "encoder.final_layer_norm.weight": (d_model,)}
    for i in range(num_layers):
        p = f"encoder.block.{i}.layer"
        for name in "qkv":
            shapes[f"{p}.0.SelfAttention.{name}.weight"] = (inner, d_model)
        shapes[f"{p}.0.SelfAttention.o.weight"] = (d_model, inner)
        shapes[f"{p}.0.layer_norm.weight"] = (d_model,)
        shapes[f"{p}.1.DenseReluDense.wi_0.weight"] = (d_ff, d_model)
        shapes[f"{p}.1.DenseReluDense.wi_1.weight"] = (d_ff, d_model)
        shapes[f"{p}.1.DenseReluDense.wo.weight"] = (d_model, d_ff)
        shapes[f"{p}.1.layer_norm.weight"] = (d_model,)
    shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (32, num_heads)
    return shapes


def build_t5xxl(path, seed=13):
    """A one-layer T5 encoder in T5-XXL naming (see the module docstring); installs the sizing shim."""
    weights = random_like_shapes(t5_shapes(**T5_TINY), seed, dtype=torch.float16)
    weights["shared.weight"] = weights["shared.weight"] * 64  # T5 embeddings are O(1), not 1/sqrt(fan_in)
    _save(weights, path)
    install_t5_sizing()


def t5_config_from_state_dict(sd):
    """The T5 config a state dict actually holds (None when it is not a T5 encoder)."""
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if q not in sd or bias not in sd or "shared.weight" not in sd or "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in sd:
        return None
    heads = sd[bias].shape[1]
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.")}
    return {"num_layers": max(blocks) + 1, "d_model": sd["shared.weight"].shape[1], "vocab_size": sd["shared.weight"].shape[0],
            "num_heads": heads, "d_kv": sd[q].shape[0] // heads,
            "d_ff": sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]}


def install_t5_sizing():
    """Test-only: let ComfyUI's text-encoder loading size T5 from the file (its own ``t5xxl_model_config`` hook)."""
    import comfy.sd

    original = comfy.sd.load_text_encoder_state_dicts
    if getattr(original, "erasekit_t5_sizing", False):
        return

    @functools.wraps(original)
    def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}):
        for sd in state_dicts:
            config = t5_config_from_state_dict(sd)
            if config is not None:
                model_options = {**model_options, "t5xxl_model_config": config}
        return original(state_dicts, embedding_directory=embedding_directory, clip_type=clip_type, model_options=model_options)

    load_text_encoder_state_dicts.erasekit_t5_sizing = True
    comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts


def diffusers_flux_shapes(depth=1, depth_single=1, in_channels=64):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=depth,
                                       num_single_layers=depth_single, attention_head_dim=128,
                                       num_attention_heads=HEADS, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def official_lora(depth=1, depth_single=1, rank=4, widened=True, seed=14, hidden=HIDDEN, modules_shapes=None):
    """A random LoRA in the official file format: ``transformer.<module>.lora_A/B.weight`` on every target.

    ``modules_shapes``: diffusers weight shapes to target (defaults to the full-width FLUX with the given depth).
    lora_B is random too (a trained LoRA's is non-zero), scaled so the LoRA changes outputs visibly but sanely.
    """
    shapes = modules_shapes or diffusers_flux_shapes(depth, depth_single)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        if not key.endswith(".weight") or len(shapes[key]) != 2:
            continue
        module = key[: -len(".weight")]
        if not any(module == t or module.endswith("." + t) for t in LORA_TARGETS):
            continue
        rows, cols = shapes[key]
        if module == "x_embedder" and widened:
            cols *= 4
        out[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) / cols ** 0.5
        out[f"transformer.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * 0.02
    return out


def build_omnieraser_lora(path):
    _save({k: v.to(torch.bfloat16) for k, v in official_lora(widened=True).items()}, path)


def build_omnieraser_controlnet_lora(path):
    _save({k: v.to(torch.bfloat16) for k, v in official_lora(widened=False, seed=15).items()}, path)


def build_alimama_controlnet(path, seed=16):
    """alimama's inpainting ControlNet layout (diffusers FluxControlNetModel, 4 extra condition channels)."""
    from diffusers import FluxControlNetModel

    with torch.device("meta"):
        model = FluxControlNetModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=0,
                                    attention_head_dim=128, num_attention_heads=HEADS, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # alimama's class widens the controlnet input by the 4 extra channels (one 2x2-packed mask channel).
    shapes["controlnet_x_embedder.weight"] = (HIDDEN, 64 + 4)
    _save(random_like_shapes(shapes, seed), path)


MODELS = {
    ("diffusion_models", FLUX_DEV): build_flux,
    ("diffusion_models", FLUX_FILL): functools.partial(build_flux, in_channels=96, seed=17),
    ("vae", VAE): build_vae,
    ("text_encoders", CLIP_L): build_clip_l,
    ("text_encoders", T5XXL): build_t5xxl,
    ("loras", OMNIERASER_LORA): build_omnieraser_lora,
    ("loras", OMNIERASER_CONTROLNET_LORA): build_omnieraser_controlnet_lora,
    ("controlnet", ALIMAMA_CONTROLNET): build_alimama_controlnet,
}
