"""``erasekit-train flux``: the OmniEraser LoRA trainer (``train.eraser_lora``) on a diffusers FLUX.1-dev folder.

This module is the diffusers side of the one trainer: ``DiffusersFlux`` (the model adapter: velocity, LoRA target
modules, VAE posterior, memory plan), loading the folder, encoding the fixed caption once (text-embedding cache; the
text encoders are freed before the first step), validation pictures, and the command's options. The recipe, the
objective, the LoRA slots and file, checkpoints and the memory plans are ``train.eraser_lora``'s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import torch

from ..erasers import omnieraser as oe
from ..jobs import CliHost, require
from . import caching, flow_matching, lora, loop, memory
from .eraser_lora import (CAPTION, GUIDANCE, LEARNING_RATE, LORA_FILE, PACKED_INPUT, EraserJob, FluxAdapter,
                          MemoryFacts, linear_facts, official_lora_targets, open_training_data, save_lora,
                          train_eraser)

log = logging.getLogger(__name__)


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


def load_flux(folder, device="cpu", dtype=torch.bfloat16, transformer_device="cpu"):
    """(transformer, vae, scheduler) from a diffusers FLUX folder. The VAE (float32, like the official trainer) goes
    to ``device``; the transformer stays on ``transformer_device`` until a memory plan places it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    folder = check_flux_folder(folder)
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
    transformer = transformer.to(transformer_device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    return transformer, vae, scheduler


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


def latent_image_ids(height, width, device, dtype):
    """RoPE ids of the packed image tokens (row, column) for a ``height × width`` latent."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class DiffusersFlux(FluxAdapter):
    """diffusers' ``FluxTransformer2DModel`` + ``AutoencoderKL`` + the encoded caption, for the one trainer.

    The transformer may be plain FLUX.1-dev (x_embedder 64 wide: the LoRA slot reads all 256 packed features while
    the frozen layer reads the first 64, which is what the official zero-padded widening computes) or already
    widened (e.g. diffusers' ``load_lora_weights`` of an OmniEraser file)."""

    def __init__(self, transformer, vae, text, device, cache_tag=""):
        self.module, self.vae, self.text = transformer, vae, text
        self.device = torch.device(device)
        self.cache_tag = cache_tag
        self.compute_dtype = next((p.dtype for p in transformer.parameters() if p.is_floating_point()), torch.float32)
        self._step_inputs = {}  # the last latent shape's RoPE ids and caption embeddings (see ``step_inputs``)

    def lora_targets(self):
        linears = {n: m for n, m in self.module.named_modules()
                   if isinstance(m, (torch.nn.Linear, memory.FrozenLinear))}
        targets = {}
        for name in official_lora_targets(linears):
            module = linears[name]
            wide = name == "x_embedder"
            targets[name] = lora.LoraTarget(
                module, PACKED_INPUT if wide else module.in_features, module.out_features,
                base_in_features=module.in_features if wide and module.in_features < PACKED_INPUT else None)
        return targets

    def step_inputs(self, height, width, device, dtype):
        """(image ids, text ids, pooled, prompt embeddings) in ``dtype`` for a ``height × width`` latent: the same
        every micro-step, so they are made once per shape and dtype."""
        key = (height, width, torch.device(device), dtype)
        if key not in self._step_inputs:
            text = self.text
            self._step_inputs = {key: (latent_image_ids(height, width, device, dtype), text["text_ids"].to(dtype),
                                       text["pooled_prompt_embeds"].to(dtype), text["prompt_embeds"].to(dtype))}
        return self._step_inputs[key]

    def velocity(self, noisy, condition, sigmas, guidance):
        transformer, dtype = self.module, self.compute_dtype
        batch, _, height, width = noisy.shape
        img_ids, txt_ids, pooled, prompt = self.step_inputs(height, width, noisy.device, dtype)
        guidance_vec = (torch.full((batch,), guidance, device=noisy.device, dtype=dtype)
                        if transformer.config.guidance_embeds else None)
        packed = oe.packed_model_input(noisy, condition.to(noisy.dtype)).to(dtype)
        out = transformer(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance_vec,
                          pooled_projections=pooled.expand(batch, -1),
                          encoder_hidden_states=prompt.expand(batch, -1, -1), txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return oe.unpack_latents(out, height, width).float()

    def vae_moments(self, images):
        dist = self.vae.encode(to_vae_pixels(images).to(self.device, torch.float32)).latent_dist
        return dist.mean, dist.std

    def memory_facts(self):
        linears, other, order = linear_facts(self.module, ("single_transformer_blocks", "transformer_blocks"))
        config = self.module.config
        return MemoryFacts(linears, other, config.num_attention_heads * config.attention_head_dim,
                           len(self.module.transformer_blocks), len(self.module.single_transformer_blocks),
                           self.text["prompt_embeds"].shape[1], order)

    def apply_plan(self, plan, compute_dtype, offload=(), estimate=None):
        self.compute_dtype = compute_dtype if plan.base is not None else self.compute_dtype
        if plan.base is None:
            self.module.to(self.device)
        else:
            memory.freeze_linears(self.module, plan.base, self.device, offload=lambda name: name in offload)
            for param in self.module.parameters():  # norms, embeddings: small, kept in the compute dtype
                param.data = param.data.to(compute_dtype)


# ------------------------------------------------------------------------------------------------ validation

@torch.no_grad()
def erase(model, adapter, source, mask, steps=8, seed=0, guidance=GUIDANCE, scheduler=None):
    """Few-step Euler sampling of the eraser (validation pictures). IMAGE/MASK in, IMAGE out."""
    device = adapter.device
    generator = torch.Generator(device).manual_seed(seed)
    background, foreground = oe.condition_images(source, mask)
    background = oe.normalize_flux_latent(adapter.vae_moments(background.to(device))[0].float())
    foreground = oe.normalize_flux_latent(adapter.vae_moments(foreground.to(device))[0].float())
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
        x = x + (s_next - s) * model(x, condition, s.expand(x.shape[0]), guidance)
    raw = x / oe.FLUX_LATENT_SCALE + oe.FLUX_LATENT_SHIFT
    image = adapter.vae.decode(raw.float()).sample
    return ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()


# ------------------------------------------------------------------------------------------------ command

def add_arguments(parser: argparse.ArgumentParser):
    """Options of ``erasekit-train flux`` (defaults = the OmniEraser recipe)."""
    parser.add_argument("--model", required=True, help="diffusers FLUX.1-dev folder (transformer/, vae/, text encoders)")
    parser.add_argument("--data", required=True, nargs="+",
                        help="triplet dataset folder(s) (source/, mask/, target/, manifest.jsonl) or WebDataset shards "
                             "(a shard folder, or a pattern such as shards/shard-{000000..000099}.tar; local or a URL)")
    parser.add_argument("--output", required=True, help="output folder: LoRA, checkpoints/, loss_curve.png, logs/")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--resolution", type=int, default=1024, help="paired random crop size in px (official 1024)")
    parser.add_argument("--resize-short-side", type=int, default=None, help="scale the short side to this before cropping")
    parser.add_argument("--rank", type=int, default=oe.LORA_RANK)
    parser.add_argument("--alpha", type=float, default=float(oe.LORA_RANK))
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="base learning rate (official 3e-5)")
    parser.add_argument("--memory-plan", choices=memory.PLAN_NAMES, default="auto",
                        help="how the run fits in GPU memory. auto (default): the fastest plan whose estimate fits "
                             f"this GPU; {memory.plans_help()}")
    loop.add_loop_arguments(parser, batch_size=1, grad_accum=8, lr_scheduler="cosine_with_restarts", scale_lr=True,
                            gradient_checkpointing=False)
    parser.add_argument("--caption", default=CAPTION)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (official 512)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--weighting-scheme", choices=flow_matching.WEIGHTING_SCHEMES, default="none")
    parser.add_argument("--no-mask-augmentation", action="store_true", help="train on the dataset's masks as they are")
    parser.add_argument("--cache-latents", type=int, default=0, metavar="K",
                        help="fix K crop/augmentation variants per sample and cache their VAE moments (0: no cache)")
    parser.add_argument("--cache-dir", default=None, help="disk folder for text/latent caches (default: memory only)")
    parser.add_argument("--validate-every", type=int, default=0, help="held-out loss + a picture every N steps")
    parser.add_argument("--validation-steps", type=int, default=8, help="sampling steps of validation pictures")
    parser.add_argument("--heldout", type=int, default=1, help="held-out samples (the last ones of the dataset)")
    parser.add_argument("--save-dtype", choices=("bf16", "fp32"), default="bf16")


def job_from_args(args, shift, num_train_timesteps):
    """The ``EraserJob`` of the command's options."""
    return EraserJob(
        steps=args.steps, rank=args.rank, alpha=args.alpha, learning_rate=args.lr, scale_lr=args.scale_lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps, lr_num_cycles=args.lr_num_cycles, optimizer=args.optimizer,
        mixed_precision=args.mixed_precision, memory_plan=args.memory_plan, resolution=args.resolution,
        resize_short_side=args.resize_short_side, mask_augmentation=not args.no_mask_augmentation,
        crop_variants=args.cache_latents, guidance=args.guidance, weighting_scheme=args.weighting_scheme,
        shift=shift, num_train_timesteps=num_train_timesteps, heldout=args.heldout, seed=args.seed,
        output_dir=args.output, checkpoint_dir=os.path.join(args.output, "checkpoints"),
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        validate_every=args.validate_every, num_workers=args.num_workers, cache_dir=args.cache_dir)


def run(args):
    """``erasekit-train flux``: train, save ``OUTPUT/pytorch_lora_weights.safetensors``; returns a summary dict."""
    for module in ("diffusers", "transformers", "accelerate"):
        require(module, extra="train", feature="erasekit-train flux")
    accelerator = loop.default_accelerator()
    device = accelerator.device
    precision = loop.resolve_mixed_precision(args.mixed_precision, device)
    job = job_from_args(args, 1.0, 1000)
    data = open_training_data(args.data, job)  # bad pairs fail here, before any model is loaded
    transformer, vae, scheduler = load_flux(args.model, device, loop.COMPUTE_DTYPES[precision])
    job.shift = 1.0 if scheduler.config.get("use_dynamic_shifting") else float(scheduler.config.get("shift", 1.0))
    job.num_train_timesteps = scheduler.config.num_train_timesteps
    text = encode_caption(args.model, args.caption, args.max_sequence_length, device,
                          os.path.join(args.cache_dir, "text") if args.cache_dir else None)
    adapter = DiffusersFlux(transformer, vae, text, device, cache_tag=os.path.abspath(args.model))
    os.makedirs(args.output, exist_ok=True)
    held = data.heldout[(0, 0)]  # the validation picture's sample

    def validate(step_number, model):
        if not args.validation_steps:
            return {}
        result = erase(model, adapter, held["source"][None], held["mask"][None], args.validation_steps, args.seed,
                       args.guidance, scheduler)
        row = torch.cat([held["source"][None], result, held["target"][None]], dim=2)[0].numpy()
        from PIL import Image

        folder = os.path.join(args.output, "validation")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray((row * 255).round().astype(np.uint8)).save(os.path.join(folder, f"step-{step_number:07d}.png"))
        return {"images": {"validation/source_result_target": row}}

    save_dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
    with CliHost("erasekit-train flux", enabled=accelerator.is_main_process, unit="steps") as host:
        result = train_eraser(job, adapter, host, data=data, accelerator=accelerator, validate=validate,
                              save_dtype=save_dtype)
    summary = {"steps": result.step, "final_loss": result.history[-1][1] if result.history else None,
               "processes": accelerator.num_processes, "memory_plan": result.plan}
    if accelerator.is_main_process:
        summary["heldout_loss"] = result.heldout_loss
        summary["lora"] = save_lora(os.path.join(args.output, LORA_FILE), result.lora_state, args.rank,
                                    extra={"erasekit_summary": json.dumps(summary)})
        with open(os.path.join(args.output, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        print(json.dumps(summary), flush=True)
    accelerator.wait_for_everyone()
    return summary
