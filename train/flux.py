"""OmniEraser LoRA training on a diffusers FLUX folder (METHODS.md §3), and the ``erasekit-train flux`` command.

The recipe: widen ``x_embedder`` 64 → 256, peft LoRA (rank 32, alpha 32) on the official targets, paired
random crops, the 48-channel condition ``cat([VAE(background only), VAE(foreground only), (1 − mask)×16])``
from ``erasers.omnieraser``, flow matching with target ``noise − latents``, the fixed caption "There is
nothing here.", FLUX guidance 3.5, lr 3e-5 scaled by batch × accumulation, batch 1 × accumulation 8, bf16,
cosine-with-restarts schedule, optional 8-bit Adam. The caption is encoded once (text-embedding cache) and
the text encoders are freed before the first step; VAE moments can be cached per sample variant.

The LoRA file is the official one: diffusers/PEFT keys under ``transformer.``, x_embedder ``lora_A`` of
shape [rank, 256], plus diffusers' ``lora_adapter_metadata`` so ``load_lora_weights`` rebuilds the config.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import torch

from ..erasers import omnieraser as oe
from . import caching, flow_matching, lora, loop
from .datasets import PairedCropDataset, collate, smarteraser_mask_augmenter

log = logging.getLogger(__name__)

CAPTION = oe.PROMPT
GUIDANCE = oe.GUIDANCE
TARGET_MODULES = oe.LORA_TARGETS
WIDEN_FACTOR = 4  # 64 packed noise features + 192 packed condition features
LORA_FILE = "pytorch_lora_weights.safetensors"
LATENT_PARTS = ("target", "background", "foreground")


# ------------------------------------------------------------------------------------------------ models

def check_flux_folder(folder):
    """A diffusers FLUX folder (model_index.json, transformer/, vae/) or a clear error."""
    folder = os.fspath(folder)
    for part in ("transformer", "vae"):
        if not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"{folder} is not a diffusers FLUX folder: it has no {part}/ subfolder "
                                    "(expected the layout of black-forest-labs/FLUX.1-dev)")
    with open(os.path.join(folder, "transformer", "config.json")) as handle:
        name = json.load(handle).get("_class_name")
    if name != "FluxTransformer2DModel":
        raise ValueError(f"{folder}/transformer holds a {name}, not a FluxTransformer2DModel: OmniEraser trains FLUX.1-dev")
    return folder


def load_flux(folder, device="cpu", dtype=torch.bfloat16):
    """(transformer, vae, scheduler) from a diffusers FLUX folder; the VAE stays float32 like the official trainer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    folder = check_flux_folder(folder)
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    return transformer, vae, scheduler


def prepare_transformer(transformer, rank=oe.LORA_RANK, alpha=oe.LORA_RANK, targets=TARGET_MODULES):
    """Widen x_embedder (64 → 256, zero new columns) and add the LoRA; returns the trainable parameters."""
    if transformer.x_embedder.in_features == transformer.config.in_channels and transformer.config.in_channels == 64:
        oe.widen_x_embedder(transformer, WIDEN_FACTOR)
    elif transformer.x_embedder.in_features != 64 * WIDEN_FACTOR:
        raise ValueError(f"x_embedder has {transformer.x_embedder.in_features} input features; a FLUX.1-dev "
                         "transformer has 64 (256 once widened for OmniEraser)")
    return lora.inject_lora(transformer, targets, rank=rank, alpha=alpha)


def encode_caption(folder, caption=CAPTION, max_sequence_length=512, device="cpu", cache_dir=None):
    """CLIP pooled + T5 embeddings of ``caption`` (cached: the encoders run once, then are freed)."""
    cache = caching.TextEmbeddingCache(cache_dir, tag=f"{os.path.abspath(folder)}|{max_sequence_length}")

    def encode(text):
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(folder, transformer=None, vae=None, torch_dtype=torch.float32)
        with torch.no_grad():
            embeds, pooled, text_ids = pipe.encode_prompt(text, prompt_2=None, device="cpu",
                                                          max_sequence_length=max_sequence_length)
        del pipe
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}

    return {k: v.to(device) for k, v in cache.get(caption, encode).items()}


def to_vae_pixels(images):
    """IMAGE ``[B,H,W,3]`` in [0, 1] → VAE input ``[B,3,H,W]`` in [−1, 1]."""
    return images.permute(0, 3, 1, 2) * 2 - 1


def vae_moments(vae, batch, device):
    """Per part (target, background, foreground): the VAE's (mean, std) of the batch, ``[B,16,h,w]`` each."""
    background, foreground = oe.condition_images(batch["source"], batch["mask"])
    pixels = {"target": batch["target"], "background": background, "foreground": foreground}
    out = {}
    with torch.no_grad():
        for part in LATENT_PARTS:
            dist = vae.encode(to_vae_pixels(pixels[part]).to(device, torch.float32)).latent_dist
            out[f"{part}_mean"], out[f"{part}_std"] = dist.mean, dist.std
    return out


class CachedKeys(torch.utils.data.Dataset):
    """Only the keys of a ``PairedCropDataset`` with fixed variants: with a latent cache a step needs no pixels
    (they are read and encoded once, on the key's first cache miss), so a warm step does no image IO."""

    def __init__(self, samples):
        if not samples.variants:
            raise ValueError("caching latents needs a dataset with fixed variants (PairedCropDataset(variants=K))")
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, draw = self.samples.key(*key)
        return {"key": f"{index}:{draw}", "item": (index, draw)}


def collate_keys(rows):
    return {"key": [r["key"] for r in rows], "item": [r["item"] for r in rows]}


def batch_latents(vae, batch, device, generator, cache=None, samples=None):
    """(normalised latents, pixel mask) of one batch, latents drawn from the VAE distribution like the
    official trainer. A key-only batch (``CachedKeys``) reads moments and mask from ``cache``, loading the
    sample from ``samples`` on a miss."""
    if "source" in batch:
        moments, mask = vae_moments(vae, batch, device), batch["mask"]
    else:
        def encode(item):
            one = collate([samples[item]])
            return {**vae_moments(vae, one, device), "mask": one["mask"].to(device)}

        rows = [cache.get(key, lambda item=item: encode(item)) for key, item in zip(batch["key"], batch["item"])]
        moments = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if len(rows) > 1 else rows[0]
        mask = moments["mask"]
    latents = {part: oe.normalize_flux_latent(caching.sample_latent(moments[f"{part}_mean"], moments[f"{part}_std"],
                                                                    generator)) for part in LATENT_PARTS}
    return latents, mask


def latent_image_ids(height, width, device, dtype):
    """RoPE ids of the packed image tokens (row, column) for a ``height × width`` latent."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def predict_velocity(transformer, noisy, condition, sigmas, text, guidance=GUIDANCE):
    """The widened transformer's velocity for ``noisy`` ``[B,16,h,w]`` given the 48-channel condition."""
    batch, _, height, width = noisy.shape
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    config = getattr(transformer, "config", None) or transformer.module.config
    guidance_vec = torch.full((batch,), guidance, device=noisy.device, dtype=dtype) if config.guidance_embeds else None
    packed = oe.packed_model_input(noisy, condition.to(noisy.dtype)).to(dtype)
    out = transformer(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance_vec,
                      pooled_projections=text["pooled_prompt_embeds"].expand(batch, -1).to(dtype),
                      encoder_hidden_states=text["prompt_embeds"].expand(batch, -1, -1).to(dtype),
                      txt_ids=text["text_ids"].to(dtype), img_ids=latent_image_ids(height, width, noisy.device, dtype),
                      return_dict=False)[0]
    return oe.unpack_latents(out, height, width)


def eraser_loss(transformer, vae, text, batch, generator, cache=None, samples=None, guidance=GUIDANCE,
                weighting_scheme="none", num_train_timesteps=1000, shift=1.0):
    """One micro-batch of the OmniEraser objective (the step function of the loop)."""
    device = generator.device
    latents, mask = batch_latents(vae, batch, device, generator, cache, samples)
    condition = oe.condition_latent(latents["background"], latents["foreground"], mask.to(device))
    target = latents["target"]
    noise = torch.randn(target.shape, generator=generator, device=device)
    sigmas = flow_matching.sample_sigmas(target.shape[0], generator, device, num_train_timesteps, shift,
                                         weighting_scheme)
    noisy = flow_matching.noisy_latents(target, noise, sigmas)
    prediction = predict_velocity(transformer, noisy, condition, sigmas, text, guidance)
    return flow_matching.flow_matching_loss(prediction, target, noise, sigmas, weighting_scheme)


def heldout_loss(transformer, vae, text, batch, seed=0, repeats=4, mixed_precision="bf16", **kwargs):
    """Mean eraser loss over ``repeats`` fixed draws (noise, σ, VAE samples) on a held-out batch, no grad."""
    device = next(transformer.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    losses = []
    with torch.no_grad(), autocast:
        for r in range(repeats):
            generator = torch.Generator(device).manual_seed(loop.derive_seed(seed, r, 99))
            losses.append(float(eraser_loss(transformer, vae, text, batch, generator, **kwargs)))
    return float(np.mean(losses))


@torch.no_grad()
def erase(transformer, vae, text, source, mask, steps=8, seed=0, guidance=GUIDANCE, scheduler=None):
    """Few-step Euler sampling of the eraser (validation pictures). IMAGE/MASK in, IMAGE out."""
    device = next(transformer.parameters()).device
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    generator = torch.Generator(device).manual_seed(seed)
    batch = {"source": source, "mask": mask, "target": source}
    moments = vae_moments(vae, batch, device)
    background = oe.normalize_flux_latent(moments["background_mean"])
    foreground = oe.normalize_flux_latent(moments["foreground_mean"])
    condition = oe.condition_latent(background, foreground, mask.to(device))
    x = torch.randn(background.shape, generator=generator, device=device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
    if scheduler is not None and scheduler.config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(x.shape[-1] * x.shape[-2] // 4, scheduler.config.base_image_seq_len,
                             scheduler.config.max_image_seq_len, scheduler.config.base_shift,
                             scheduler.config.max_shift)
        sigmas = torch.cat([scheduler.time_shift(mu, 1.0, sigmas[:-1]), sigmas[-1:]])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = predict_velocity(transformer, x.to(dtype), condition, s.expand(x.shape[0]), text, guidance).float()
        x = x + (s_next - s) * v
    raw = x / oe.FLUX_LATENT_SCALE + oe.FLUX_LATENT_SHIFT
    image = vae.decode(raw.float()).sample
    return ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()


# ------------------------------------------------------------------------------------------------ LoRA file

def lora_metadata(rank, targets=TARGET_MODULES, extra=None):
    """diffusers' safetensors metadata so ``load_lora_weights`` rebuilds the config (alpha = rank, see below)."""
    config = {"transformer.r": int(rank), "transformer.lora_alpha": int(rank),
              "transformer.target_modules": list(targets)}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True), **(extra or {})}


def official_lora_state(state, rank, alpha, dtype=torch.bfloat16):
    """File tensors with the alpha/rank scale folded into ``lora_B``: the official files carry no alpha
    (loaders assume alpha = rank), so any alpha trains and loads the same everywhere."""
    scale = float(alpha) / float(rank)
    out = {k: (v.float() * scale if ".lora_B." in k and scale != 1.0 else v.float()).to(dtype).contiguous()
           for k, v in state.items()}
    widened = out["transformer.x_embedder.lora_A.weight"].shape
    if widened[1] != 64 * WIDEN_FACTOR:
        raise ValueError(f"x_embedder lora_A is {tuple(widened)}; the OmniEraser layout needs [rank, 256]")
    return out


def save_omnieraser_lora(transformer, path, rank, alpha, dtype=torch.bfloat16, targets=TARGET_MODULES, extra=None):
    """Write the trained adapter in the official OmniEraser layout; returns the path."""
    state = official_lora_state(lora.lora_state_dict(transformer, prefix="transformer."), rank, alpha, dtype)
    return lora.save_lora_file(path, state, lora_metadata(rank, targets, extra))


# ------------------------------------------------------------------------------------------------ data

def open_triplets(folders):
    """One indexable over several triplet dataset folders (``dataset_tools.triplets.TripletDataset``)."""
    from ..dataset_tools.triplets import TripletDataset

    parts = [TripletDataset(f) for f in folders]
    if len(parts) == 1:
        return parts[0]
    return torch.utils.data.ConcatDataset(parts)


def split_heldout(triplets, count):
    """(training part, held-out part): the last ``count`` samples are held out when at least one sample is
    left to train on; a dataset that small is evaluated on its own training samples (logged)."""
    count = max(1, int(count))
    if len(triplets) > count:
        n = len(triplets) - count
        return torch.utils.data.Subset(triplets, range(n)), torch.utils.data.Subset(triplets, range(n, len(triplets)))
    if len(triplets) == 0:
        raise ValueError("the training dataset is empty: it holds no (source, mask, target) samples")
    log.warning("only %d samples: the held-out loss is measured on training samples", len(triplets))
    return triplets, triplets


def heldout_batch(dataset, draw=0):
    """Every sample of a (small) held-out ``PairedCropDataset`` as one fixed batch."""
    return collate([dataset[(i, draw)] for i in range(len(dataset))])


# ------------------------------------------------------------------------------------------------ command

def add_arguments(parser: argparse.ArgumentParser):
    """Options of ``erasekit-train flux`` (defaults = the OmniEraser recipe)."""
    parser.add_argument("--model", required=True, help="diffusers FLUX.1-dev folder (transformer/, vae/, text encoders)")
    parser.add_argument("--data", required=True, nargs="+", help="triplet dataset folder(s) (source/, mask/, target/, manifest.jsonl)")
    parser.add_argument("--output", required=True, help="output folder: LoRA, checkpoints/, loss_curve.png, logs/")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--resolution", type=int, default=1024, help="paired random crop size in px (official 1024)")
    parser.add_argument("--resize-short-side", type=int, default=None, help="scale the short side to this before cropping")
    parser.add_argument("--rank", type=int, default=oe.LORA_RANK)
    parser.add_argument("--alpha", type=float, default=float(oe.LORA_RANK))
    parser.add_argument("--lr", type=float, default=3e-5, help="base learning rate (official 3e-5)")
    loop.add_loop_arguments(parser, batch_size=1, grad_accum=8, lr_scheduler="cosine_with_restarts", scale_lr=True)
    parser.add_argument("--caption", default=CAPTION)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (official 512)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--weighting-scheme", choices=flow_matching.WEIGHTING_SCHEMES, default="none")
    parser.add_argument("--no-mask-augmentation", action="store_true", help="train on the dataset's masks as they are")
    parser.add_argument("--cache-latents", type=int, default=0, metavar="K",
                        help="fix K crop/augmentation variants per sample and cache their VAE latents (0: no cache)")
    parser.add_argument("--cache-dir", default=None, help="disk folder for text/latent caches (default: memory only)")
    parser.add_argument("--validate-every", type=int, default=0, help="held-out loss + a picture every N steps")
    parser.add_argument("--validation-steps", type=int, default=8, help="sampling steps of validation pictures")
    parser.add_argument("--heldout", type=int, default=1, help="held-out samples (the last ones of the dataset)")
    parser.add_argument("--save-dtype", choices=("bf16", "fp32"), default="bf16")


def run(args):
    """``erasekit-train flux``: train, save ``OUTPUT/pytorch_lora_weights.safetensors``; returns a summary dict."""
    from accelerate import Accelerator

    accelerator = Accelerator(device_placement=False)
    device = accelerator.device
    args.mixed_precision = loop.resolve_mixed_precision(args.mixed_precision, device)
    weight_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    triplets = open_triplets(args.data)
    train_part, heldout_part = split_heldout(triplets, args.heldout)
    augment = None if args.no_mask_augmentation else smarteraser_mask_augmenter
    dataset = PairedCropDataset(train_part, args.resolution, seed=args.seed, augment_mask=augment,
                                resize_short_side=args.resize_short_side, variants=args.cache_latents or None)
    heldout_set = PairedCropDataset(heldout_part, args.resolution, seed=args.seed + 1,
                                    resize_short_side=args.resize_short_side)
    dataset.validate()  # bad pairs fail here, before any model is loaded
    heldout_set.validate()
    transformer, vae, scheduler = load_flux(args.model, device, weight_dtype)
    text = encode_caption(args.model, args.caption, args.max_sequence_length, device,
                          os.path.join(args.cache_dir, "text") if args.cache_dir else None)
    torch.manual_seed(args.seed)  # the LoRA init (peft draws from the global generator)
    params = prepare_transformer(transformer, args.rank, args.alpha)
    cache = None
    if args.cache_latents:
        cache = caching.LatentCache(os.path.join(args.cache_dir, "latents") if args.cache_dir else None,
                                    tag=f"{os.path.abspath(args.model)}|{args.resolution}|{args.seed}", device=device)
    shift = 1.0 if scheduler.config.get("use_dynamic_shifting") else float(scheduler.config.get("shift", 1.0))
    objective = dict(guidance=args.guidance, weighting_scheme=args.weighting_scheme, shift=shift,
                     num_train_timesteps=scheduler.config.num_train_timesteps)

    def step(model, batch, generator):
        return eraser_loss(model, vae, text, batch, generator, cache=cache, samples=dataset, **objective)

    heldout = heldout_batch(heldout_set)
    os.makedirs(args.output, exist_ok=True)

    def validate(step_number):
        value = heldout_loss(transformer, vae, text, heldout, args.seed, mixed_precision=args.mixed_precision, **objective)
        images = {}
        if args.validation_steps:
            result = erase(transformer, vae, text, heldout["source"][:1], heldout["mask"][:1], args.validation_steps,
                           args.seed, args.guidance, scheduler)
            row = torch.cat([heldout["source"][:1], result, heldout["target"][:1]], dim=2)[0].numpy()
            images["validation/source_result_target"] = row
            from PIL import Image

            folder = os.path.join(args.output, "validation")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray((row * 255).round().astype(np.uint8)).save(os.path.join(folder, f"step-{step_number:07d}.png"))
        log.info("step %d: held-out loss %.5f", step_number, value)
        return {"scalars": {"heldout_loss": value}, "images": images}

    config = loop.loop_config_from_args(args, validate_every=args.validate_every)

    def progress(step_number, total, loss):
        if accelerator.is_main_process and (step_number == total or step_number % 10 == 0):
            print(f"step {step_number}/{total} loss {loss:.5f}", flush=True)

    stream, collate_fn = (CachedKeys(dataset), collate_keys) if cache is not None else (dataset, collate)
    result = loop.train(step, params, stream, config, model=transformer, accelerator=accelerator,
                        collate_fn=collate_fn, resume=args.resume, progress=progress, validate=validate, device=device)
    summary = {"steps": result.step, "final_loss": result.history[-1][1] if result.history else None,
               "processes": accelerator.num_processes}
    if accelerator.is_main_process:
        save_dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
        summary["heldout_loss"] = heldout_loss(transformer, vae, text, heldout, args.seed,
                                               mixed_precision=args.mixed_precision, **objective)
        summary["lora"] = save_omnieraser_lora(
            accelerator.unwrap_model(transformer), os.path.join(args.output, LORA_FILE), args.rank, args.alpha,
            save_dtype, extra={"erasekit_summary": json.dumps(summary)})
        with open(os.path.join(args.output, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        print(json.dumps(summary), flush=True)
    accelerator.wait_for_everyone()
    return summary


# ------------------------------------------------------------------------------------------------ tiny model

def save_random_flux_folder(folder, hidden_heads=2, head_dim=16, text_dim=32, layers=1, single_layers=1, seed=0):
    """A tiny random FLUX in the diffusers layout (transformer, vae, CLIP, T5, tokenizers, scheduler).

    For tests, benchmarks and smoke-testing the command without downloading 30 GB; same code paths as FLUX.1-dev.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
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
                        layers_per_block=1, norm_num_groups=4, shift_factor=oe.FLUX_LATENT_SHIFT,
                        scaling_factor=oe.FLUX_LATENT_SCALE, use_quant_conv=False, use_post_quant_conv=False)
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
