"""SmartEraser-style SD-inpainting training (longtaojiang/SmartEraser), with the epsilon or Erase Diffusion's CRO
objective (``train.cro``).

The model is a diffusers SD-inpainting folder (unet/ with 9 input channels, vae/, text_encoder/, tokenizer/,
scheduler/). What is trained, as the official recipe (longtaojiang/SmartEraser, train_region_inpaint.py):

- RG: the UNet input is ``[z_t(4), mask(1), VAE(source)(4)]`` with the **whole, unmasked** source image
  (``image_condition="region"``); ``"masked"`` gives the ordinary SD-inpainting layout ``VAE(source·(1−mask))``.
- VG: the mask's object is cut out on white, encoded by a frozen ``CLIPVisionModelWithProjection``, mapped by
  the IM2TEXT projector and spliced into the 7-token context of "Remove the instance of object". With
  probability 0.1 a batch is trained unconditionally instead: empty prompt, projector of CLIP(zeros).
- UNet + text encoder + projector are fine-tuned in full (the official recipe) or as peft LoRA on the UNet
  and the text encoder (the small projector is then still trained in full). ``train_text_encoder=False`` keeps
  the text encoder frozen (less memory and time; not the official recipe).
- Objectives: ``epsilon`` (noise prediction on the clean target) or ``cro`` (Erase Diffusion's
  chain-rectifying objective; the source is x₀^obj, the target x₀^ori).

The generic parts (data, loop, checkpoints, resume, loss curve) are ``train.datasets`` / ``train.loop``;
the VG pieces (projector, white crop, CLIP preprocessing, token splice) are ``erasers.smarteraser``, so a
trained projector, text encoder and UNet load wherever the released SmartEraser weights load.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from ..erasers import layout, smarteraser
from ..jobs import CliHost, require
from . import caching, cro, epsilon, loop
from .datasets import PairedCropDataset, collate, open_triplets, smarteraser_mask_augmenter

TRAIN_PROMPT = "Remove the instance of object"  # train_region_inpaint.sh --clip_vtext
CONDITION_DROPOUT = 0.1  # --random_condition_abandon 0.1
# --learning_rate 5e-7 --scale_lr with batch 4 on 8 GPUs: 5e-7 × 32 = 1.6e-5, constant, AdamW wd 1e-2, clip 1.0
LEARNING_RATE = 1.6e-5
RESOLUTION = 512
OBJECTIVES = ("epsilon", "cro")
IMAGE_CONDITIONS = ("region", "masked")
MODES = ("full", "lora")
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR_FILE = "clip_mlp_weight.pth"  # the official release's file name
LORA_FILE = "sd_inpaint_lora.safetensors"
CLIP_VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}  # ViT-B, ViT-L (SmartEraser's), ViT-H, ViT-bigG


@dataclass
class SDInpaintOptions:
    """What is trained and how; the loop's hyper-parameters live in ``train.loop.LoopConfig``."""

    objective: str = "epsilon"
    image_condition: str = "region"
    visual_guidance: bool = True
    prompt: str = TRAIN_PROMPT
    condition_dropout: float = CONDITION_DROPOUT
    max_jump: int = cro.MAX_JUMP
    mode: str = "full"
    lora_rank: int = 32
    lora_alpha: float = 32.0
    train_text_encoder: bool = True  # the official recipe fine-tunes it

    def check(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.image_condition not in IMAGE_CONDITIONS:
            raise ValueError(f"image_condition must be one of {IMAGE_CONDITIONS}, got {self.image_condition!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}")
        if self.max_jump < 1:
            raise ValueError(f"max_jump (CRO's largest γ) must be >= 1, got {self.max_jump}")
        return self


# ---------------------------------------------------------------------------------------------- loading

def _component_dir(model_dir, name):
    path = os.path.join(model_dir, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{model_dir} is not a diffusers SD-inpainting folder: it has no {name}/ "
            "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    return path


def load_clip_vision(path):
    """Frozen ``CLIPVisionModelWithProjection`` from a transformers folder or a single safetensors file.

    A single file (ComfyUI's models/clip_vision, transformers key layout) gets its config from the tensor
    shapes; the head count, which shapes do not show, is that of the released ViT of that width.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if os.path.isdir(path):
        model = CLIPVisionModelWithProjection.from_pretrained(path)
    elif os.path.isfile(path):
        from safetensors.torch import load_file

        state = load_file(path)
        if "visual_projection.weight" not in state or "vision_model.embeddings.patch_embedding.weight" not in state:
            raise ValueError(
                f"{path} is not a CLIP vision model with projection in transformers layout "
                "(needs vision_model.* and visual_projection.weight keys)"
            )
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        width, patch_size = patch.shape[0], patch.shape[-1]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
        config = CLIPVisionConfig(
            hidden_size=width, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=layers, num_attention_heads=CLIP_VISION_HEADS.get(width, max(1, width // 64)),
            patch_size=patch_size,
            image_size=patch_size * round((positions - 1) ** 0.5),
            projection_dim=state["visual_projection.weight"].shape[0],
        )
        model = CLIPVisionModelWithProjection(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit a CLIP vision model of its own shapes: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    else:
        raise FileNotFoundError(f"CLIP vision model not found: {path} (a transformers folder or a .safetensors file)")
    model.requires_grad_(False)
    return model.eval()


def draws_unconditional(generator, rate):
    """One draw per batch, as the official loop: train the unconditional branch with probability ``rate``."""
    return bool(torch.rand((), generator=generator, device=generator.device) < rate)


def _text_checkpointing(text_encoder, enabled):
    """transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*."""
    prefix = "activation" if hasattr(text_encoder, "activation_checkpointing_enable") else "gradient"
    getattr(text_encoder, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}")()


class SDInpaintModel(torch.nn.Module):
    """UNet, text encoder and projector (trained) with the frozen VAE and CLIP vision; ``forward`` is the loss."""

    def __init__(self, unet, vae, text_encoder, tokenizer, alphas_cumprod, options: SDInpaintOptions,
                 vision=None, projector=None):
        super().__init__()
        options.check()
        if unet.config.in_channels != 9:
            raise ValueError(
                f"the UNet has {unet.config.in_channels} input channels; SD-inpainting training needs the "
                "9-channel inpainting UNet ([noisy latent 4, mask 1, image latent 4])"
            )
        width = text_encoder.config.hidden_size
        if unet.config.cross_attention_dim != width:
            raise ValueError(f"the UNet attends to {unet.config.cross_attention_dim}-wide context but the text "
                             f"encoder gives {width}-wide hidden states")
        if options.visual_guidance:
            if vision is None or projector is None:
                raise ValueError("visual guidance needs a CLIP vision model and a projector")
            if vision.config.projection_dim != width:
                raise ValueError(f"CLIP vision gives {vision.config.projection_dim}-wide image embeds but the text "
                                 f"context is {width} wide: the image token must match (ViT-L/14 with SD1.5: 768)")
        self.unet, self.text_encoder, self.projector = unet, text_encoder, projector
        self.vae, self.vision = vae.requires_grad_(False).eval(), vision
        self.tokenizer = tokenizer
        self.options = options
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._token_cache = {}
        self.latent_cache = None  # a train.caching.LatentCache: VAE moments and CLIP embeds per sample key

    # -- gradient checkpointing (the loop's switch)
    def enable_gradient_checkpointing(self):
        self.unet.enable_gradient_checkpointing()
        if self.options.train_text_encoder:
            _text_checkpointing(self.text_encoder, True)

    def disable_gradient_checkpointing(self):
        self.unet.disable_gradient_checkpointing()
        if self.options.train_text_encoder:
            _text_checkpointing(self.text_encoder, False)

    # -- pieces of a step
    def token_ids(self, prompt, device):
        """Prompt ids: 7 tokens with visual guidance (the official tokenisation), else the full 77."""
        length = smarteraser.CONTEXT_TOKENS if self.options.visual_guidance else self.tokenizer.model_max_length
        if (prompt, length) not in self._token_cache:
            ids = self.tokenizer(prompt, max_length=length, padding="max_length", truncation=True,
                                 return_tensors="pt").input_ids
            self._token_cache[(prompt, length)] = ids
        return self._token_cache[(prompt, length)].to(device)

    def vae_moments(self, images):
        """VAE posterior (mean, std) of IMAGE [B,H,W,3] in [0,1]."""
        pixels = images.permute(0, 3, 1, 2).to(self.vae.dtype) * 2.0 - 1.0
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
        return {"mean": posterior.mean, "std": posterior.std}

    def encode_images(self, images, generator, part=None, keys=None):
        """IMAGE [B,H,W,3] in [0,1] → scaled VAE latents (one posterior sample, as the official training).

        With a latent cache and the batch's sample keys, each sample's (mean, std) is computed once and
        sampled with the same generator draw as without a cache.
        """
        if self.latent_cache is not None and keys is not None:
            moments = [self.latent_cache.get(f"{part}|{key}", lambda i=i: self.vae_moments(images[i:i + 1]))
                       for i, key in enumerate(keys)]
            latents = caching.sample_latent(torch.cat([m["mean"] for m in moments]),
                                            torch.cat([m["std"] for m in moments]), generator)
        else:
            moments = self.vae_moments(images)
            noise = torch.randn(moments["mean"].shape, generator=generator, device=generator.device)
            latents = moments["mean"] + moments["std"] * noise.to(moments["mean"])
        return ((latents - self.shift_factor) * self.scaling_factor).float()

    def condition_pixels(self, source, mask):
        """Pixels whose latent fills channels 5..8: the unmasked source (RG) or source·(1 − mask)."""
        if self.options.image_condition == "region":
            return source
        keep = ~layout.binarize(mask).unsqueeze(-1)
        return torch.where(keep, source, torch.full_like(source, 0.5))  # 0.5 → 0 in [-1, 1], as diffusers

    def visual_pixels(self, source, mask):
        """CLIP inputs of the VG crops [B,3,224,224]; a crop whose mask fell outside it gets CLIP(zeros)."""
        crops = []
        for image, item_mask in zip(source, mask):
            if layout.binarize(item_mask).any():
                crops.append(smarteraser.clip_pixel_values(smarteraser.white_instance_crop(image.cpu(), item_mask.cpu())))
            else:
                crops.append(smarteraser.zero_pixel_values())
        return torch.cat(crops).to(source.device)

    def clip_embeds(self, pixel_values):
        """Frozen CLIP vision ``image_embeds`` (no graph: CLIP vision is never trained)."""
        with torch.no_grad():
            return self.vision(pixel_values=pixel_values.to(self.vision.dtype)).image_embeds

    def project(self, embeds):
        """Trainable projector: [B,C] embeds → [B,1,C] tokens that carry gradients into the projector."""
        param = next(self.projector.parameters())
        return self.projector(embeds.to(param.dtype)).unsqueeze(1)

    def image_token(self, pixel_values):
        return self.project(self.clip_embeds(pixel_values))

    def object_embeds(self, source, mask, keys=None):
        """CLIP embeds of the batch's VG crops, cached per sample key when a cache is set."""
        if self.latent_cache is None or keys is None:
            return self.clip_embeds(self.visual_pixels(source, mask))
        return torch.cat([
            self.latent_cache.get(f"vision|{key}", lambda i=i: {
                "embeds": self.clip_embeds(self.visual_pixels(source[i:i + 1], mask[i:i + 1]))})["embeds"]
            for i, key in enumerate(keys)])

    def context(self, source, mask, generator, keys=None):
        """Encoder hidden states for the batch; the whole batch goes unconditional with p = condition_dropout."""
        batch, device = source.shape[0], source.device
        drop = draws_unconditional(generator, self.options.condition_dropout)
        prompt = "" if drop else self.options.prompt
        hidden = self.text_encoder(self.token_ids(prompt, device).expand(batch, -1)).last_hidden_state
        if not self.options.visual_guidance:
            return hidden
        if drop:
            return smarteraser.splice_unconditional(hidden, self.image_token(smarteraser.zero_pixel_values().to(device)))
        return smarteraser.splice_conditional(hidden, self.project(self.object_embeds(source, mask, keys)))

    def forward(self, batch, generator):
        device = self.alphas_cumprod.device
        source, target = batch["source"].to(device).float(), batch["target"].to(device).float()
        mask = batch["mask"].to(device).float()
        if source.shape != target.shape or source.shape[:3] != mask.shape:
            raise ValueError(f"batch sizes differ: source {list(source.shape)}, target {list(target.shape)}, "
                             f"mask {list(mask.shape)}")
        smarteraser.check_inpaint_size(source.shape[1], source.shape[2])
        keys = batch.get("key")
        target_latents = self.encode_images(target, generator, "target", keys)
        source_latents = self.encode_images(source, generator, "source", keys)
        if self.options.image_condition == "region":
            condition_latents = source_latents
        else:
            condition_latents = self.encode_images(self.condition_pixels(source, mask), generator, "masked", keys)
        mask_latents = layout.latent_mask(mask, *target_latents.shape[-2:]).to(target_latents)
        hidden = self.context(source, mask, generator, keys)
        dtype = self.unet.dtype

        def predict_noise(x_t, timesteps):
            model_input = torch.cat([x_t, mask_latents, condition_latents], dim=1).to(dtype)
            return self.unet(model_input, timesteps, encoder_hidden_states=hidden.to(dtype)).sample

        batch_size, steps = target_latents.shape[0], self.alphas_cumprod.shape[0]
        noise = torch.randn(target_latents.shape, generator=generator, device=generator.device).to(target_latents.device)
        if self.options.objective == "cro":
            timesteps, previous = cro.sample_cro_timesteps(batch_size, steps, self.options.max_jump, generator,
                                                           generator.device)
            return cro.cro_loss(predict_noise, target_latents, source_latents, noise, timesteps.to(noise.device),
                                previous.to(noise.device), self.alphas_cumprod)
        timesteps = epsilon.sample_timesteps(batch_size, steps, generator, generator.device).to(noise.device)
        return epsilon.epsilon_loss(predict_noise, target_latents, noise, timesteps, self.alphas_cumprod)


def load_model(model_dir, options: SDInpaintOptions, clip_vision=None, projector_path=None, seed=0, device="cpu",
               tokenizer_dir=None):
    """An ``SDInpaintModel`` from a diffusers SD-inpainting folder (the SmartEraser release is one).

    The projector starts from ``projector_path``, else from the folder's ``clip_mlp_weight.pth`` when present
    (continuing SmartEraser), else fresh (seeded by ``seed``). A folder without tokenizer/ takes
    ``tokenizer_dir`` (e.g. the SD1.5 CLIP tokenizer ComfyUI ships); one without scheduler/ gets SD's
    training schedule (scaled_linear β 0.00085-0.012, 1000 steps, epsilon), which SD1.5 and SD2 inpainting share.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    options.check()
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"SD-inpainting model folder not found: {model_dir}")
    for part in ("unet", "vae", "text_encoder") + (() if tokenizer_dir else ("tokenizer",)):
        _component_dir(model_dir, part)
    if os.path.isdir(os.path.join(model_dir, "scheduler")):
        scheduler = DDPMScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))
    else:
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, prediction_type="epsilon")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{model_dir} predicts {scheduler.config.prediction_type!r}; the epsilon and CRO "
                         "objectives need an epsilon-prediction inpainting model (SD1.5 / SD2 inpainting)")
    unet = UNet2DConditionModel.from_pretrained(_component_dir(model_dir, "unet"))
    vae = AutoencoderKL.from_pretrained(_component_dir(model_dir, "vae"))
    text_encoder = CLIPTextModel.from_pretrained(_component_dir(model_dir, "text_encoder"))
    own_tokenizer = os.path.join(model_dir, "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(own_tokenizer if os.path.isdir(own_tokenizer) else tokenizer_dir)
    vision = projector = None
    if options.visual_guidance:
        if clip_vision is None:
            raise ValueError("visual guidance needs a CLIP vision model (clip-vit-large-patch14 for SD1.5); "
                             "pass one or turn visual guidance off")
        vision = load_clip_vision(clip_vision)
        projector = new_projector(text_encoder.config.hidden_size, seed)
        released = os.path.join(model_dir, PROJECTOR_FILE)
        path = projector_path or (released if os.path.isfile(released) else None)
        if path:
            projector.load_state_dict(smarteraser.read_projector_state_dict(path))
    model = SDInpaintModel(unet, vae, text_encoder, tokenizer, scheduler.alphas_cumprod, options, vision, projector)
    model.noise_scheduler = scheduler  # exported when the base folder has no scheduler/ of its own
    return model.to(device)


def new_projector(width, seed):
    """A fresh IM2TEXT projector, initialised the same way for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return smarteraser.Im2TextProjector(width)


def trainable_parameters(model: SDInpaintModel, options: SDInpaintOptions):
    """``{name: Parameter}`` the optimiser updates: all of UNet + text encoder + projector, or their LoRA."""
    from .lora import inject_lora

    text_trained = options.train_text_encoder
    model.unet.requires_grad_(options.mode == "full")
    model.text_encoder.requires_grad_(options.mode == "full" and text_trained)
    params = {}
    if options.mode == "lora":
        unet = inject_lora(model.unet, UNET_LORA_TARGETS, options.lora_rank, options.lora_alpha)
        params.update({f"unet.{k}": v for k, v in unet.items()})
        if text_trained:
            # into the encoder module: transformers' own add_adapter demands a newer peft than diffusers needs
            text = inject_lora(model.text_encoder.encoder, TEXT_LORA_TARGETS, options.lora_rank, options.lora_alpha)
            params.update({f"text_encoder.encoder.{k}": v for k, v in text.items()})
    else:
        params.update({f"unet.{k}": v for k, v in model.unet.named_parameters()})
        if text_trained:
            params.update({f"text_encoder.{k}": v for k, v in model.text_encoder.named_parameters()})
    if model.projector is not None:
        model.projector.requires_grad_(True)
        params.update({f"projector.{k}": v for k, v in model.projector.named_parameters()})
    model.unet.train()
    model.text_encoder.train(text_trained)
    return params


def step_fn(model, batch, generator):
    """The loop's step: the model's forward is the loss (so DDP wraps it as a whole)."""
    return model(batch, generator)


# ---------------------------------------------------------------------------------------------- export

def merged_state_dict(module):
    """The module's weights with any peft LoRA folded into its base layers, in the base model's key names."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and "default" in getattr(sub, "lora_A", {}):
            deltas[f"{name}.base_layer.weight"] = sub.get_delta_weight("default")
    merged = {}
    for key, value in module.state_dict().items():
        if "lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value.detach().clone()
    return merged


def _save_component(component, state, out_dir):
    """Save ``component``'s architecture with ``state`` as weights, the way ``save_pretrained`` lays it out."""
    fresh = type(component).from_config(component.config) if hasattr(type(component), "from_config") \
        else type(component)(component.config)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise ValueError(f"merged weights do not fit {type(component).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    fresh.save_pretrained(out_dir)


def export_model(model: SDInpaintModel, base_dir, out_dir, options: SDInpaintOptions, comfy_name=None):
    """Write the trained model as the SmartEraser release is laid out: a diffusers folder + clip_mlp_weight.pth.

    With LoRA the adapters are merged into the saved UNet / text encoder and also written as
    ``sd_inpaint_lora.safetensors`` (peft keys under ``unet.`` / ``text_encoder.``). With ``comfy_name`` the
    folder is also converted (``erasers.smarteraser_convert``) into ``<comfy_name>.safetensors`` (a ComfyUI
    checkpoint) and ``<comfy_name>_projector.safetensors`` next to it. Returns the written paths.
    """
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _save_component(model.unet, merged_state_dict(model.unet), os.path.join(tmp, "unet"))
    _save_component(model.text_encoder, merged_state_dict(model.text_encoder), os.path.join(tmp, "text_encoder"))
    model.vae.save_pretrained(os.path.join(tmp, "vae"))
    model.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    for name in ("scheduler", "feature_extractor"):
        if os.path.isdir(os.path.join(base_dir, name)):
            shutil.copytree(os.path.join(base_dir, name), os.path.join(tmp, name))
    if not os.path.isdir(os.path.join(tmp, "scheduler")) and getattr(model, "noise_scheduler", None) is not None:
        model.noise_scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    if os.path.isfile(os.path.join(base_dir, "model_index.json")):
        shutil.copy(os.path.join(base_dir, "model_index.json"), os.path.join(tmp, "model_index.json"))
    if model.projector is not None:
        torch.save({k: v.detach().cpu().float().clone() for k, v in model.projector.state_dict().items()},
                   os.path.join(tmp, PROJECTOR_FILE))
    if options.mode == "lora":
        from .lora import lora_state_dict, save_lora_file

        state = lora_state_dict(model.unet, prefix="unet.")
        if options.train_text_encoder:
            state.update(lora_state_dict(model.text_encoder.encoder, prefix="text_encoder.encoder."))
        save_lora_file(os.path.join(tmp, LORA_FILE), state, metadata={"erasekit": asdict(options)})
    with open(os.path.join(tmp, "erasekit_training.json"), "w") as handle:
        json.dump({"options": asdict(options), "base": os.path.abspath(base_dir)}, handle, indent=1)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    written = {"folder": out_dir}
    if comfy_name:
        from ..erasers.smarteraser_convert import convert

        if model.projector is None:
            raise ValueError("a ComfyUI SmartEraser export needs visual guidance (the projector); "
                             "load the diffusers folder instead")
        written["checkpoint"], written["projector"] = convert(out_dir, os.path.dirname(os.path.abspath(out_dir)),
                                                              comfy_name)
    return written


# ---------------------------------------------------------------------------------------------- the run

def build_dataset(dataset_dir, resolution, seed, mask_augmentation=True, variants=None):
    """Paired crops of a triplet dataset; the short side is scaled to the crop size so objects stay whole.

    ``variants`` = K fixes K crop/augmentation versions per sample (what makes latents cacheable).
    """
    return PairedCropDataset(open_triplets(dataset_dir), resolution, seed=seed,
                             augment_mask=smarteraser_mask_augmenter if mask_augmentation else None,
                             resize_short_side=resolution, variants=variants)


def train_sd_inpaint(model_dir, dataset, output_dir, loop_config: loop.LoopConfig, options: SDInpaintOptions,
                     clip_vision=None, projector_path=None, resolution=RESOLUTION, mask_augmentation=True,
                     resume=False, progress=None, check_interrupt=None, comfy_name=None, accelerator=None,
                     export_dir=None, tokenizer_dir=None, cache_latents=0, cache_dir=None):
    """Train and export; returns ``{"result": TrainResult, "export": paths or None, "loss_curve": png, "model"}``.

    ``dataset`` is a triplet folder or a dataset keyed like ``PairedCropDataset``. Checkpoints go to
    ``output_dir/checkpoints`` unless the loop config names a folder; the trained model is exported to
    ``export_dir`` (default ``output_dir/model``; see ``export_model``) unless the run was interrupted.
    ``cache_latents`` = K > 0 fixes K variants per sample of a dataset folder and caches their VAE moments
    and CLIP image embeds (in memory, and in ``cache_dir`` when given); the text encoder is trained, so text
    is never cached.
    """
    options.check()
    if isinstance(dataset, (str, os.PathLike)):
        dataset = build_dataset(dataset, resolution, loop_config.seed, mask_augmentation, cache_latents or None)
        dataset.validate()  # a bad pair fails here, before any model is loaded
    loop_config.output_dir = loop_config.output_dir or output_dir
    loop_config.checkpoint_dir = loop_config.checkpoint_dir or os.path.join(output_dir, "checkpoints")
    accelerator = accelerator or loop.default_accelerator()
    device = accelerator.device
    model = load_model(model_dir, options, clip_vision, projector_path, seed=loop_config.seed, device=device,
                       tokenizer_dir=tokenizer_dir)
    params = trainable_parameters(model, options)
    if cache_latents:
        model.latent_cache = caching.LatentCache(
            cache_dir, tag=f"{os.path.abspath(model_dir)}|{clip_vision}|{resolution}|{loop_config.seed}", device=device)
    result = loop.train(step_fn, params, dataset, loop_config, model=model, accelerator=accelerator,
                        collate_fn=collate, resume=resume, progress=progress, check_interrupt=check_interrupt,
                        device=device)
    exported = None
    if not result.interrupted and accelerator.is_main_process:
        exported = export_model(model, model_dir, export_dir or os.path.join(output_dir, "model"), options, comfy_name)
    accelerator.wait_for_everyone()
    return {"result": result, "export": exported, "loss_curve": os.path.join(loop_config.output_dir, "loss_curve.png"),
            "model": model}


# ---------------------------------------------------------------------------------------------- command

def add_arguments(parser):
    """Options of ``erasekit-train sd-inpaint`` (defaults = the SmartEraser recipe)."""
    parser.add_argument("--model", required=True,
                        help="diffusers SD-inpainting folder (unet/ with 9 input channels, vae/, text_encoder/, "
                             "tokenizer/, scheduler/); the SmartEraser release is one")
    parser.add_argument("--data", required=True,
                        help="triplet dataset folder (source/, mask/, target/, manifest.jsonl) or WebDataset shards "
                             "(a shard folder, or a pattern such as shards/shard-{000000..000099}.tar; local or a URL)")
    parser.add_argument("--output", required=True,
                        help="output folder: model/ (diffusers + clip_mlp_weight.pth), checkpoints/, loss_curve.png, logs/")
    parser.add_argument("--clip-vision", default=None,
                        help="CLIP vision model with projection (clip-vit-large-patch14 folder or ComfyUI clip_vision "
                             ".safetensors); needed with visual guidance")
    parser.add_argument("--projector", default=None, help="initial IM2TEXT weights (default: MODEL/clip_mlp_weight.pth if present)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="epsilon",
                        help="epsilon (SmartEraser) or cro (Erase Diffusion's chain-rectifying objective)")
    parser.add_argument("--image-condition", choices=IMAGE_CONDITIONS, default="region",
                        help="region: VAE of the whole source (SmartEraser RG); masked: VAE of source·(1−mask)")
    parser.add_argument("--no-visual-guidance", action="store_true", help="plain text context (no projector, 77 tokens)")
    parser.add_argument("--prompt", default=TRAIN_PROMPT)
    parser.add_argument("--condition-dropout", type=float, default=CONDITION_DROPOUT)
    parser.add_argument("--max-jump", type=int, default=cro.MAX_JUMP, help="CRO's largest DDIM jump γ")
    parser.add_argument("--mode", choices=MODES, default="full", help="full fine-tune (official) or peft LoRA")
    parser.add_argument("--no-train-text-encoder", dest="train_text_encoder", action="store_false",
                        help="keep the text encoder frozen (the official recipe fine-tunes it)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (mode lora)")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (mode lora)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="training crop size in px (official 512)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE,
                        help="learning rate (official 5e-7 × batch 4 × 8 GPUs = 1.6e-5)")
    loop.add_loop_arguments(parser, batch_size=4, grad_accum=1, lr_scheduler="constant", scale_lr=False)
    parser.add_argument("--no-mask-augmentation", action="store_true", help="train on the dataset's masks as they are")
    parser.add_argument("--cache-latents", type=int, default=0, metavar="K",
                        help="fix K crop/augmentation variants per sample and cache their VAE latents and CLIP "
                             "image embeds (0: no cache)")
    parser.add_argument("--cache-dir", default=None, help="disk folder for the caches (default: memory only)")
    parser.add_argument("--comfy-name", default=None,
                        help="also write OUTPUT/<name>.safetensors (ComfyUI checkpoint) and <name>_projector.safetensors")


def options_from_args(args):
    return SDInpaintOptions(
        objective=args.objective, image_condition=args.image_condition, visual_guidance=not args.no_visual_guidance,
        prompt=args.prompt, condition_dropout=args.condition_dropout, max_jump=args.max_jump, mode=args.mode,
        lora_rank=args.rank, lora_alpha=args.alpha, train_text_encoder=args.train_text_encoder).check()


def run(args):
    """``erasekit-train sd-inpaint``: train, export OUTPUT/model; returns a summary dict (also OUTPUT/summary.json)."""
    for module in ("diffusers", "transformers", "accelerate") + (("peft",) if args.mode == "lora" else ()):
        require(module, extra="train", feature="erasekit-train sd-inpaint")
    accelerator = loop.default_accelerator()
    os.makedirs(args.output, exist_ok=True)
    with CliHost("erasekit-train sd-inpaint", enabled=accelerator.is_main_process, unit="steps") as host:
        def progress(step_number, total, loss):
            host.progress(step_number, total, "steps")
            if step_number == total or step_number % 10 == 0:
                host.log(f"step {step_number}/{total} loss {loss:.5f}")

        out = train_sd_inpaint(args.model, args.data, args.output, loop.loop_config_from_args(args),
                               options_from_args(args), clip_vision=args.clip_vision, projector_path=args.projector,
                               resolution=args.resolution, mask_augmentation=not args.no_mask_augmentation,
                               resume=args.resume, progress=progress, comfy_name=args.comfy_name,
                               accelerator=accelerator, cache_latents=args.cache_latents, cache_dir=args.cache_dir)
    result = out["result"]
    summary = {"steps": result.step, "final_loss": result.history[-1][1] if result.history else None,
               "export": out["export"], "loss_curve": out["loss_curve"]}
    if accelerator.is_main_process:
        with open(os.path.join(args.output, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        print(json.dumps(summary), flush=True)
    return summary
