"""A tiny single-file SD1.5-inpainting checkpoint that CheckpointLoaderSimple detects (seeded random weights).

What ComfyUI 0.3.64 reads from the file, and so how small each part can be:
- UNet: SD1.5 detection matches model_channels 320, context 768, non-linear transformer projections and no
  ADM; 9 input channels make it an inpainting model. Depth is free: two levels (channel_mult 1-1), one resnet
  each, self/cross attention only at the second level and a middle block without attention. ~40 M parameters.
- Text encoder and VAE: ComfyUI builds them from fixed configs (CLIP-L 12 layers, SD VAE ch 128), so they are
  full size (fp16 file, ~330 MB in all).
The file is a ``.ckpt`` (``{"state_dict": ...}`` loaded with ``weights_only=True``) like the released one.
"""
import torch

CHECKPOINT = "sd-v1-5-inpainting.ckpt"
UNET_CONFIG = dict(image_size=32, in_channels=9, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
                   channel_mult=[1, 1], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                   transformer_depth_middle=-1, context_dim=768, num_heads=8, num_head_channels=-1,
                   use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                   use_temporal_attention=False, use_temporal_resblock=False)


def seeded_weights(shapes, seed, dtype=torch.float16):
    """N(0, 1/fan_in) matrices, small biases, unit norm scales; keys in sorted order so the bytes are stable. fp16 is
    the file's storage, as in the released checkpoint; ComfyUI computes in float32 on a CPU (test_compute_dtype.py)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if len(shape) == 1 and "norm" in key and key.endswith(".weight"):
            out[key] = torch.ones(shape, dtype=dtype)
        elif len(shape) == 1:
            out[key] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = (torch.randn(shape, generator=generator) / fan_in ** 0.5).to(dtype)
    return out


def _meta_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def unet_state_dict(seed=20):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    net = UNetModel(**UNET_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)
    return seeded_weights(_meta_shapes(net), seed)


def vae_state_dict(seed=21):
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
    weights = seeded_weights(_meta_shapes(vae), seed, dtype=torch.float32)
    return {k: v.half() for k, v in comfy.diffusers_convert.convert_vae_state_dict(weights).items()}


def clip_state_dict(seed=22):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", hidden_size=768,
                            intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    # transformers 5 drops the "text_model." level from CLIPTextModel's keys; checkpoints have it
    shapes = {k if k.startswith("text_model.") else f"text_model.{k}": v
              for k, v in _meta_shapes(model).items() if "position_ids" not in k}
    weights = seeded_weights(shapes, seed)
    weights["text_model.embeddings.token_embedding.weight"] *= 768 ** 0.5 / 50  # O(0.5) embeddings, like CLIP's
    return weights


def build_checkpoint(path):
    state = {f"model.diffusion_model.{k}": v for k, v in unet_state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_state_dict().items()})
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_state_dict().items()})
    torch.save({"state_dict": state}, str(path))


MODELS = {("checkpoints", CHECKPOINT): build_checkpoint}
