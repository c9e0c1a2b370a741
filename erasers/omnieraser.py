"""OmniEraser on FLUX.1-dev: the 48-channel condition and the LoRA key mapping onto ComfyUI's FLUX.

The official pipeline (PRIS-CV/Omnieraser, pipeline_flux_control_removal.py) widens FLUX's ``x_embedder``
(ComfyUI ``img_in``) from 64 to 256 input features and feeds, after the 64 packed noise features,
the packed condition ``cat([VAE(masked background), VAE(foreground only), 1 - mask ×16])`` at latent resolution.
It samples on ``pipeline_timesteps`` shifted for the image's token count. Everything here is plain torch: the
nodes, the trainer and the tests share it.

LoRA files come in three namings, all mapped onto ComfyUI's FLUX module names (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ...), the separate diffusers q/k/v (and ``proj_mlp``) landing on row slices of
the fused weights:
- diffusers / PEFT: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (the official files);
- kohya: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (+ ``.alpha``), or the diffusers names
  flattened as ``lora_transformer_transformer_blocks_0_attn_to_q``;
- ComfyUI / BFL: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (or lora_down/lora_up).
"""
from dataclasses import dataclass, field
import re

import numpy as np
import torch
import torch.nn.functional as F

from . import layout

PROMPT = "There is nothing here."
GUIDANCE = 3.5
STEPS = 28
T5_TOKENS = 512  # the official pipeline pads the prompt's T5 tokens to max_sequence_length=512
LORA_RANK = 32
CONDITION_CHANNELS = 48  # 16 background + 16 foreground + 16 inverted mask
LATENT_CHANNELS = 16
# img_in's input features after the widening: noise and condition channels, each 2x2-packed (16·4 + 48·4 = 256).
WIDENED_IN_FEATURES = 4 * (LATENT_CHANNELS + CONDITION_CHANNELS)
# FLUX VAE latent normalisation (diffusers ``vae.config.shift_factor`` / ``scaling_factor``; ComfyUI latent_formats.Flux).
FLUX_LATENT_SHIFT = 0.1159
FLUX_LATENT_SCALE = 0.3611
# Official LoRA targets (train_control_lora_flux.py); PEFT matches them as suffixes, so the single blocks'
# attn.to_q/k/v are included.
LORA_TARGETS = (
    "x_embedder",
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


# --------------------------------------------------------------------------------------------------------------
# Condition


def condition_images(image, mask):
    """``(background_only, foreground_only)`` IMAGEs: the masked pixels, resp. the unmasked ones, set to black.

    Black in [0, 1] is the official −1 in [−1, 1]. ``image`` ``[B,H,W,3]``, ``mask`` ``[B,H,W]`` (batch 1 broadcasts).
    """
    mask = layout.check_mask_matches_image(layout.check_image(image), mask)
    # The official mask processor binarises at 0.5 (diffusers VaeImageProcessor.binarize), layout's one rule.
    remove = layout.binarize(mask).unsqueeze(-1).to(image.dtype)
    return image * (1 - remove), image * remove


def condition_latent(background_latent, foreground_latent, mask):
    """``[B,48,h,w]`` = ``cat([background, foreground, (1 - mask) ×16])``.

    The latents are already normalised (``(z - shift) * scale``); ``mask`` is the pixel-space MASK ``[B,H,W]``.
    Batches of 1 broadcast.
    """
    if background_latent.shape[1:] != foreground_latent.shape[1:] or background_latent.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"Background and foreground latents must both be [B,16,h,w]; got {tuple(background_latent.shape)} "
            f"and {tuple(foreground_latent.shape)}."
        )
    height, width = background_latent.shape[-2:]
    # The official latent-resolution mask: binarised, nearest-resized, inverted (1 = keep).
    keep = (1 - layout.latent_mask(mask, height, width)).to(background_latent)
    batch = max(background_latent.shape[0], foreground_latent.shape[0], keep.shape[0])
    parts = [background_latent, foreground_latent, keep.expand(-1, LATENT_CHANNELS, -1, -1)]
    for part in parts:
        if part.shape[0] not in (1, batch):
            raise ValueError(f"Condition batch sizes {[p.shape[0] for p in parts]} differ; each must be 1 or {batch}.")
    return torch.cat([p.expand(batch, -1, -1, -1) for p in parts], dim=1)


def normalize_flux_latent(latent):
    """Raw FLUX VAE latent → the normalised space the transformer sees."""
    return (latent - FLUX_LATENT_SHIFT) * FLUX_LATENT_SCALE


def pack_latents(latent):
    """``[B,C,h,w]`` → ``[B,(h/2)(w/2),4C]``, FLUX's 2×2 patch packing (feature = c·4 + dy·2 + dx)."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches; the latent is {w}x{h}, which is not even.")
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed, height, width):
    """Inverse of ``pack_latents`` for a latent of ``height × width``."""
    b, n, features = packed.shape
    c = features // 4
    return packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def packed_model_input(noise_latent, condition):
    """The official transformer input: packed noise (64) then packed condition (192) → ``[B,N,256]``."""
    return torch.cat([pack_latents(noise_latent), pack_latents(condition)], dim=2)


@torch.no_grad()
def widen_x_embedder(transformer, factor=4):
    """The official widening of a diffusers ``FluxTransformer2DModel``: x_embedder in-features ×``factor``.

    The first columns keep the original weight, the new ones are zero (they are not stored in the LoRA).
    """
    old = transformer.x_embedder
    new = torch.nn.Linear(old.in_features * factor, old.out_features, bias=old.bias is not None,
                          dtype=old.weight.dtype, device=old.weight.device)
    new.weight.zero_()
    new.weight[:, : old.in_features].copy_(old.weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    transformer.x_embedder = new
    transformer.register_to_config(in_channels=old.in_features * factor)
    return transformer


# --------------------------------------------------------------------------------------------------------------
# Sampling


def pipeline_timesteps(steps):
    """The unshifted sigmas of diffusers' FLUX pipelines: ``linspace(1, 1/steps, steps)`` in float32.

    pipeline_flux_control_removal.py passes them with ``mu = calculate_shift(tokens)`` to
    FlowMatchEulerDiscreteScheduler, which shifts each one as ``e^mu / (e^mu + 1/t - 1)`` and appends 0. The
    same shift is ComfyUI FLUX's model_sampling ``sigma(t)`` once core ModelSamplingFlux has set ``mu`` from the
    image's size.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    return torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps).astype(np.float32))


# --------------------------------------------------------------------------------------------------------------
# LoRA key mapping


@dataclass(frozen=True)
class Target:
    """A ComfyUI FLUX weight (key without ``diffusion_model.``) and, for fused weights, the rows ``(dim, start, size)``."""

    key: str
    offset: tuple | None = None


@dataclass
class LoraPatch:
    """One adapter on one ComfyUI FLUX weight: ``W[rows] += strength · alpha/rank · up @ down`` (``kind`` "lora")
    or ``W = weight`` (``kind`` "set", for trained norm scales). ``reshape`` widens the weight first (zero-padded)."""

    target: Target
    kind: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    reshape: tuple | None = None
    weight: torch.Tensor | None = None
    source_keys: tuple = ()
    module: str = ""  # the LoRA file's module name (its keys without the up/down/alpha suffix)


@dataclass
class LoraMapping:
    patches: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    naming: str = ""

    def describe(self):
        widened = self.widened_in_features
        return (
            f"{len(self.patches)} weights patched ({self.naming or 'no'} naming), "
            f"img_in {'widened to ' + str(widened) + ' input features' if widened else 'not widened'}, "
            f"{len(self.unmatched)} unmatched keys"
        )

    @property
    def widened_in_features(self):
        """img_in's in-features after the LoRA (None when the LoRA does not widen it)."""
        for patch in self.patches:
            if patch.target.key == "img_in.weight" and patch.reshape is not None:
                return patch.reshape[1]
        return None


def diffusers_to_comfy_targets(depth, depth_single, hidden=3072, mlp_ratio=4.0):
    """diffusers FLUX linear/norm module name → ``Target`` on ComfyUI's FLUX (weights only)."""
    mlp = int(hidden * mlp_ratio)
    table = {
        "x_embedder": Target("img_in.weight"),
        "context_embedder": Target("txt_in.weight"),
        "proj_out": Target("final_layer.linear.weight"),
        "time_text_embed.timestep_embedder.linear_1": Target("time_in.in_layer.weight"),
        "time_text_embed.timestep_embedder.linear_2": Target("time_in.out_layer.weight"),
        "time_text_embed.text_embedder.linear_1": Target("vector_in.in_layer.weight"),
        "time_text_embed.text_embedder.linear_2": Target("vector_in.out_layer.weight"),
        "time_text_embed.guidance_embedder.linear_1": Target("guidance_in.in_layer.weight"),
        "time_text_embed.guidance_embedder.linear_2": Target("guidance_in.out_layer.weight"),
    }
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            table[f"{src}.attn.{name}"] = Target(f"{dst}.img_attn.qkv.weight", (0, j * hidden, hidden))
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            table[f"{src}.attn.{name}"] = Target(f"{dst}.txt_attn.qkv.weight", (0, j * hidden, hidden))
        for name, comfy in (
            ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
        ):
            table[f"{src}.{name}"] = Target(f"{dst}.{comfy}.weight")
        for name, comfy in (
            ("attn.norm_q", "img_attn.norm.query_norm"),
            ("attn.norm_k", "img_attn.norm.key_norm"),
            ("attn.norm_added_q", "txt_attn.norm.query_norm"),
            ("attn.norm_added_k", "txt_attn.norm.key_norm"),
        ):
            table[f"{src}.{name}"] = Target(f"{dst}.{comfy}.scale")
    for i in range(depth_single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            table[f"{src}.attn.{name}"] = Target(f"{dst}.linear1.weight", (0, j * hidden, hidden))
        table[f"{src}.proj_mlp"] = Target(f"{dst}.linear1.weight", (0, 3 * hidden, mlp))
        table[f"{src}.proj_out"] = Target(f"{dst}.linear2.weight")
        table[f"{src}.norm.linear"] = Target(f"{dst}.modulation.lin.weight")
        table[f"{src}.attn.norm_q"] = Target(f"{dst}.norm.query_norm.scale")
        table[f"{src}.attn.norm_k"] = Target(f"{dst}.norm.key_norm.scale")
    return table


def flux_geometry(model_shapes):
    """``(depth, depth_single, hidden, mlp_ratio)`` of a ComfyUI FLUX from its weight shapes (keys without prefix)."""
    if "img_in.weight" not in model_shapes:
        raise ValueError("The model is not a FLUX transformer (it has no img_in.weight); OmniEraser needs FLUX.1-dev.")
    hidden = model_shapes["img_in.weight"][0]
    depth = len({k.split(".")[1] for k in model_shapes if k.startswith("double_blocks.")})
    depth_single = len({k.split(".")[1] for k in model_shapes if k.startswith("single_blocks.")})
    mlp_ratio = 4.0
    if "double_blocks.0.img_mlp.0.weight" in model_shapes:
        mlp_ratio = model_shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden
    return depth, depth_single, hidden, mlp_ratio


_FOREIGN_MARKERS = (
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
    "lora_te_", "lora_te1_", "lora_te2_", "text_model.", "conv_in", "time_embedding",
)


def foreign_architecture(keys):
    """A sentence when ``keys`` belong to an SD1.5/SDXL LoRA (UNet/CLIP names), else None."""
    hits = [k for k in keys if any(marker in k for marker in _FOREIGN_MARKERS)]
    if not hits or len(hits) * 2 < len(keys):
        return None
    sdxl = any(("lora_te2_" in k or "text_encoder_2" in k or "add_embedding" in k or "label_emb" in k) for k in keys)
    kind = "an SDXL" if sdxl else "an SD1.5/SDXL"
    return (
        f"This LoRA is {kind} UNet/text-encoder LoRA (keys like {hits[0]!r}), not a FLUX one; "
        "OmniEraser needs a FLUX.1-dev LoRA such as theSure/Omnieraser's pytorch_lora_weights.safetensors."
    )


_PEFT_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.diffusion_model.", "")
_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)


def _split_key(key):
    """``(module, part)`` where part is down/up/alpha, or ``(module_param, "weight")`` for a plain tensor."""
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    for end in (".weight", ".scale"):
        if key.endswith(end):
            return key[: -len(end)], "weight"
    return key, None


def _module_index(table):
    """Lookup from every accepted module spelling (prefixed, underscored, comfy names) to a ``Target``."""
    index = {}
    for diffusers_name, target in table.items():
        comfy_name = target.key.rsplit(".", 1)[0]
        for prefix in _PEFT_PREFIXES:
            index[prefix + diffusers_name] = (target, "diffusers")
        index["lora_transformer_" + diffusers_name.replace(".", "_")] = (target, "kohya")
        if target.offset is None:
            for prefix in ("diffusion_model.", "model.diffusion_model.", "transformer.", ""):
                index.setdefault(prefix + comfy_name, (target, "comfyui"))
            index.setdefault("lora_unet_" + comfy_name.replace(".", "_"), (target, "kohya"))
    return index


def _fused_index(table):
    """Fused ComfyUI weights (qkv, linear1) named directly in ComfyUI/kohya naming → whole-weight targets."""
    index = {}
    for target in table.values():
        if target.offset is not None:
            comfy_name = target.key.rsplit(".", 1)[0]
            whole = Target(target.key)
            for prefix in ("diffusion_model.", "model.diffusion_model.", "transformer.", ""):
                index[prefix + comfy_name] = (whole, "comfyui")
            index["lora_unet_" + comfy_name.replace(".", "_")] = (whole, "kohya")
    return index


def map_lora(state_dict, model_shapes=None, depth=None, depth_single=None, hidden=3072, mlp_ratio=4.0):
    """Map a FLUX LoRA state dict onto ComfyUI FLUX weights.

    ``model_shapes``: ComfyUI FLUX weight shapes keyed without ``diffusion_model.`` (from the MODEL); it fixes the
    depth and lets shapes be checked. Without it, give ``depth``/``depth_single`` (or they are read from the keys).
    Returns a ``LoraMapping``; keys that name nothing in this FLUX are in ``.unmatched`` (never dropped silently).
    Raises ``ValueError`` for an SD1.5/SDXL LoRA and for shape mismatches.
    """
    keys = list(state_dict.keys())
    foreign = foreign_architecture(keys)
    if foreign:
        raise ValueError(foreign)
    if model_shapes is not None:
        depth, depth_single, hidden, mlp_ratio = flux_geometry(model_shapes)
    else:
        depth = _count_blocks(keys, ("transformer_blocks.", "transformer_blocks_", "double_blocks.", "double_blocks_")) if depth is None else depth
        depth_single = _count_blocks(keys, ("single_transformer_blocks.", "single_transformer_blocks_", "single_blocks.", "single_blocks_")) if depth_single is None else depth_single
    table = diffusers_to_comfy_targets(depth, depth_single, hidden, mlp_ratio)
    index = _module_index(table)
    index.update({k: v for k, v in _fused_index(table).items() if k not in index})

    groups, unmatched, namings = {}, [], set()
    for key in keys:
        module, part = _split_key(key)
        found = index.get(module)
        if found is None or part is None:
            unmatched.append(key)
            continue
        target, naming = found
        if part == "weight" and not target.key.endswith(".scale"):
            unmatched.append(key)  # a full linear weight is not a LoRA; refusing beats replacing FLUX weights
            continue
        namings.add(naming)
        groups.setdefault(target, {}).setdefault(part, []).append(key)

    mapping = LoraMapping(unmatched=unmatched, naming="+".join(sorted(namings)))
    problems = []
    for target, parts in groups.items():
        if "weight" in parts:
            (key,) = parts["weight"]
            mapping.patches.append(LoraPatch(target, "set", weight=state_dict[key], source_keys=(key,),
                                             module=_split_key(key)[0]))
            continue
        if len(parts.get("up", ())) != 1 or len(parts.get("down", ())) != 1:
            mapping.unmatched.extend(k for ks in parts.values() for k in ks)  # half a LoRA pair
            continue
        up, down = state_dict[parts["up"][0]], state_dict[parts["down"][0]]
        alpha = float(state_dict[parts["alpha"][0]]) if "alpha" in parts else None
        patch = LoraPatch(target, "lora", up=up, down=down, alpha=alpha,
                          source_keys=tuple(k for ks in parts.values() for k in ks), module=_split_key(parts["up"][0])[0])
        problem = _check_shapes(patch, model_shapes)
        if problem:
            problems.append(problem)
        mapping.patches.append(patch)
    if problems:
        raise ValueError("The LoRA does not fit this FLUX model: " + "; ".join(problems))
    mapping.unmatched.sort()
    return mapping


def unmatched_keys(state_dict, model_shapes=None, **geometry):
    """The keys of a FLUX LoRA that map onto nothing (empty list = the whole file applies)."""
    return map_lora(state_dict, model_shapes, **geometry).unmatched


def _count_blocks(keys, prefixes):
    found = set()
    for key in keys:
        for prefix in prefixes:
            at = key.find(prefix)
            # "transformer_blocks" also ends "single_transformer_blocks": count it only as its own name.
            if at >= 0 and (at == 0 or key[at - 1] in "._") and not key[:at].endswith("single_"):
                m = re.match(r"(\d+)", key[at + len(prefix):])
                if m:
                    found.add(int(m.group(1)))
    return max(found) + 1 if found else 0


def _check_shapes(patch, model_shapes):
    up, down = patch.up, patch.down
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        return f"{patch.source_keys[0]}: up {tuple(up.shape)} and down {tuple(down.shape)} are not a LoRA pair"
    if model_shapes is None:
        if patch.target.key == "img_in.weight" and down.shape[1] > 64:
            patch.reshape = (up.shape[0], down.shape[1])
        return None
    shape = tuple(model_shapes.get(patch.target.key, ()))
    if len(shape) != 2:
        return f"{patch.source_keys[0]}: the model has no 2-D weight {patch.target.key}"
    rows = patch.target.offset[2] if patch.target.offset else shape[0]
    if up.shape[0] != rows:
        return f"{patch.source_keys[0]}: {up.shape[0]} output rows, the model's {patch.target.key} slice has {rows}"
    if down.shape[1] != shape[1]:
        # Only img_in may be widened (OmniEraser: 64 → 256); the new columns start at zero.
        if patch.target.key == "img_in.weight" and down.shape[1] > shape[1] and down.shape[1] % shape[1] == 0:
            patch.reshape = (shape[0], down.shape[1])
        else:
            return f"{patch.source_keys[0]}: {down.shape[1]} input features, the model's {patch.target.key} has {shape[1]}"
    return None


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def merged_shape(shape, patches):
    """A weight's shape after its patches (only a ``reshape`` widens it)."""
    for patch in patches:
        if patch.reshape is not None:
            shape = tuple(max(a, b) for a, b in zip(shape, patch.reshape))
    return tuple(shape)


def merge_weight(weight, patches, strength=1.0):
    """One weight with its ``LoraPatch`` list merged, in float32: the arithmetic of ComfyUI's LoRA patch (widen by
    zero-padding, then ``+ strength · alpha/rank · up @ down`` on the target rows; ``set`` replaces)."""
    weight = weight.to(torch.float32, copy=True)
    for patch in patches:
        if patch.kind == "set":
            weight = patch.weight.to(torch.float32, copy=True)
            continue
        if patch.reshape is not None:
            weight = F.pad(weight, (0, patch.reshape[1] - weight.shape[1], 0, patch.reshape[0] - weight.shape[0]))
        scale = 1.0 if patch.alpha is None else patch.alpha / patch.down.shape[0]
        delta = strength * scale * (patch.up.to(torch.float32) @ patch.down.to(torch.float32))
        target = weight if patch.target.offset is None else weight.narrow(*patch.target.offset)
        target += delta
    return weight


def storage_dtype(source_dtype, ndim, dtype):
    """The dtype a weight is stored in when a file asks for ``dtype`` (None: its own). Float8 files keep 1-D
    tensors (biases, norm scales) in bfloat16: tiny, and ComfyUI computes with them cast up anyway."""
    if dtype is None or not source_dtype.is_floating_point:
        return source_dtype
    if dtype in FLOAT8 and ndim < 2:
        return source_dtype if source_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return dtype


def _cast(weight, target):
    """``weight`` in ``target``; float8 rounds to nearest, saturated at its largest finite value (a plain cast turns
    larger values into NaN)."""
    if target in FLOAT8 and weight.dtype != target:
        limit = torch.finfo(target).max
        return weight.to(torch.float32).clamp(-limit, limit).to(target)
    return weight.to(target)


def to_storage_dtype(weight, dtype):
    """``weight`` as stored in a file that asks for ``dtype`` (``storage_dtype``), cast by ``_cast``."""
    return _cast(weight, storage_dtype(weight.dtype, weight.ndim, dtype))


def storage_plan(shapes, dtypes, mapping, dtype=None):
    """``{key: (shape, dtype)}`` of the merged weights, in order, known before any is computed (a streamed file's
    header). ``shapes``/``dtypes``: the model's, by key."""
    by_key = _patches_by_key(mapping)
    return {key: (merged_shape(shape, by_key.get(key, ())), storage_dtype(dtypes[key], len(shape), dtype))
            for key, shape in shapes.items()}


def _patches_by_key(mapping):
    by_key = {}
    for patch in mapping.patches:
        by_key.setdefault(patch.target.key, []).append(patch)
    return by_key


def merged_weights(weights, mapping, strength=1.0, dtype=None):
    """Yield ``(key, weight)`` for every ComfyUI-named FLUX weight with the LoRA merged, one at a time (so a merge
    of a 12 B model holds one merged weight at once). ``dtype``: the stored dtype (``storage_dtype``); None keeps
    each weight's own. ``weights`` is any mapping (a state dict, a lazy view of a loaded model)."""
    by_key = _patches_by_key(mapping)
    missing = sorted(set(by_key) - set(weights))
    if missing:
        raise ValueError(f"The LoRA patches weights this model does not have: {', '.join(missing[:5])}")
    for key in weights:
        weight = weights[key]
        patches = by_key.get(key)
        stored = storage_dtype(weight.dtype, weight.ndim, dtype)
        # merged on the CPU: a model loaded on a small GPU has no room for float32 copies of its largest weights
        yield key, _cast(merge_weight(weight.to("cpu"), patches, strength) if patches else weight, stored)


def merge_lora(weights, mapping, strength=1.0, dtype=None):
    """Plain-torch merge of a ``LoraMapping`` into ComfyUI-named FLUX ``weights`` (new dict; inputs untouched).

    The same arithmetic as ComfyUI's LoRA patch (``merge_weight``). Used by tools and tests that have no ComfyUI;
    ``merged_weights`` streams the same result one weight at a time.
    """
    return dict(merged_weights(weights, mapping, strength, dtype))
