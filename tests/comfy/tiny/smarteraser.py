"""Tiny SmartEraser model files for tests and the example workflow (random weights, no downloads).

ComfyUI fixes some widths by detection, so only the UNet is really tiny: SD1.5 detection needs
model_channels 320 and context 768 (depth is free: two levels, one resnet each); the text encoder is read
with ComfyUI's fixed CLIP-L config (12 layers), the VAE with the fixed SD VAE config, and CLIPVisionLoader
only recognises ViT-L/14 at full size, so those three are full-size random models (stored in fp16).
"""
import os
import shutil
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "smarteraser.safetensors"
PROJECTOR = "smarteraser_projector.safetensors"
CLIP_VISION = "clip-vit-large-patch14.safetensors"


def tiny_unet(in_channels=9, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(320, 320),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32).eval()


def sd_vae(full_size=True, seed=1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    channels = (128, 256, 512, 512) if full_size else (32, 32, 32, 32)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels, layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=32, sample_size=512).eval()


def clip_text(full_size=True, seed=2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    size = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12) if full_size \
        else dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **size)
    return CLIPTextModel(config).eval()


def clip_vision(full_size=True, seed=3):
    """CLIPVisionModelWithProjection: ViT-L/14 (what ComfyUI detects) or a 2-layer one with the same 768 output."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    size = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16) if full_size \
        else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPVisionConfig(image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, **size)
    return CLIPVisionModelWithProjection(config).eval()


def projector_state_dict(seed=4):
    torch.manual_seed(seed)
    return {"fc_out.weight": torch.randn(768, 768) * 0.02, "fc_out.bias": torch.randn(768) * 0.02,
            "norm.weight": 1 + 0.1 * torch.randn(768), "norm.bias": 0.1 * torch.randn(768)}


def build_diffusers_folder(path, full_size_clip=True, in_channels=9, projector_format="pth"):
    """A SmartEraser release folder as the authors publish it: diffusers save_pretrained + clip_mlp_weight.pth."""
    path = Path(path)
    tiny_unet(in_channels).save_pretrained(path / "unet")
    sd_vae(full_size_clip).save_pretrained(path / "vae")
    clip_text(full_size_clip).save_pretrained(path / "text_encoder")
    if projector_format == "pth":
        torch.save(projector_state_dict(), path / "clip_mlp_weight.pth")
    else:
        from safetensors.torch import save_file
        save_file(projector_state_dict(), path / "clip_mlp_weight.safetensors")
    return path


def build_checkpoint(path):
    """The converter's single-file checkpoint (what CheckpointLoaderSimple reads) of a tiny release folder."""
    from erasekit.erasers.smarteraser_convert import convert

    with tempfile.TemporaryDirectory() as work:
        folder = build_diffusers_folder(Path(work) / "release")
        checkpoint, _ = convert(str(folder), os.path.join(work, "out"), name="se", half=True)
        shutil.move(checkpoint, path)


def build_projector(path):
    from safetensors.torch import save_file

    save_file(projector_state_dict(), str(path))


def build_clip_vision(path):
    from safetensors.torch import save_file

    with torch.no_grad():
        state = {k: v.half().contiguous() for k, v in clip_vision(full_size=True).state_dict().items()}
    save_file(state, str(path))


MODELS = {
    ("checkpoints", CHECKPOINT): build_checkpoint,
    ("smarteraser", PROJECTOR): build_projector,
    ("clip_vision", CLIP_VISION): build_clip_vision,
}
