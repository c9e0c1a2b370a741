"""A tiny random FLUX in the diffusers folder layout, for the trainer's tests and ``benchmarks/train.py``.

Not a registered tiny model (the name starts with ``_``): tests import it by path. Same code paths as
FLUX.1-dev (transformer, VAE, CLIP + T5 text encoders with a word-level tokenizer, scheduler), without a download.
"""
import os

import torch


def save_random_flux_folder(folder, hidden_heads=2, head_dim=16, text_dim=32, layers=1, single_layers=1, seed=0):
    """A tiny random FLUX in the diffusers layout (transformer, vae, CLIP, T5, tokenizers, scheduler).

    For tests, benchmarks and smoke-testing the command without downloading 30 GB; same code paths as FLUX.1-dev.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from erasekit.erasers.omnieraser import FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT  # the FLUX VAE's shift / scale
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    rope = head_dim - 2 * (head_dim * 3 // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=hidden_heads, joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim, guidance_embeds=True,
        axes_dims_rope=(rope, head_dim * 3 // 8, head_dim * 3 // 8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, shift_factor=FLUX_LATENT_SHIFT,
                        scaling_factor=FLUX_LATENT_SCALE, use_quant_conv=False, use_post_quant_conv=False)
    words = ["<pad>", "<unk>", "</s>"] + "there is nothing here . a the of".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()

    def tokenizer(max_length):
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       eos_token="</s>", model_max_length=max_length)

    clip = CLIPTextModel(CLIPTextConfig(hidden_size=text_dim, intermediate_size=2 * text_dim, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=len(words), max_position_embeddings=77,
                                        projection_dim=text_dim, pad_token_id=0, bos_token_id=0, eos_token_id=2))
    t5 = T5EncoderModel(T5Config(d_model=text_dim, d_ff=2 * text_dim, num_layers=1, num_heads=2, d_kv=text_dim // 2,
                                 vocab_size=len(words), pad_token_id=0, eos_token_id=2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer(77),
                        text_encoder_2=t5, tokenizer_2=tokenizer(512), transformer=transformer)
    pipe.save_pretrained(folder)
    return os.fspath(folder)

