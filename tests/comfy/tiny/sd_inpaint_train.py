"""Tiny random SD-inpainting weights for the SD-inpaint trainer (unit tests and ComfyUI tests).

- a diffusers folder (unet/ with 9 input channels, vae/ with SD's 8× downsampling, text_encoder/,
  tokenizer/, scheduler/, model_index.json) whose context is 768 wide like SD1.5, so the SmartEraser core's
  768-wide projector and token splice apply unchanged;
- a CLIP vision model with a 768-wide projection, as a transformers-layout safetensors file (what ComfyUI's
  models/clip_vision holds) or a folder.

The tokenizer is a word-level CLIP BPE over the words of SmartEraser's prompts, so
"Remove the instance of object" is exactly [BOS, remove, the, instance, of, object, EOS].
"""
import json
import os

WORDS = ("remove", "the", "instance", "of", "object", "there", "is", "nothing", "here")
WIDTH = 768  # SD1.5's text width == CLIP ViT-L/14's projection width


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            merges.append((current, part))
            current += part
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_sd_inpaint_folder(path, seed=0):
    """A diffusers SD-inpainting folder with tiny random weights (~1 s to build, ~6 MB)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    path = os.fspath(path)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=WIDTH,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon")
    unet.save_pretrained(os.path.join(path, "unet"))
    vae.save_pretrained(os.path.join(path, "vae"))
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    scheduler.save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as handle:
        json.dump({"_class_name": "StableDiffusionInpaintPipeline",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "scheduler": ["diffusers", "DDPMScheduler"]}, handle)
    return path


def tiny_clip_vision(seed=0):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=224,
        patch_size=32, projection_dim=WIDTH,
    ))


def build_clip_vision_file(path, seed=0):
    """The tiny CLIP vision model as one transformers-layout safetensors file (ComfyUI's clip_vision)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_clip_vision(seed).state_dict().items()}
    save_file(state, os.fspath(path))
    return path


MODELS = {
    ("diffusers", "tiny-sd-inpaint"): build_sd_inpaint_folder,
    ("clip_vision", "tiny-clip-vision-768.safetensors"): build_clip_vision_file,
}
