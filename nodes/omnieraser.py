"""OmniEraser on ComfyUI's own FLUX: the LoRA loader (with img_in widening) and the 48-channel conditioning.

The loader patches the MODEL through ComfyUI's patch mechanism (LoRA adapters on the mapped keys, the
``reshape`` of img_in to 256 input features), so unpatching, strength, fp8 weights and offloading keep working.
A widened FLUX then needs ``[noise 16 | condition 48]`` on every call: the loader replaces the model's
``concat_cond`` (an object patch, applied only while this MODEL is loaded) with one that builds the condition
from values the conditioning node stored in the conditioning. ``concat_cond`` feeds ComfyUI's own ``c_concat``,
which the samplers already batch, split for CFG and slice per area, so every sampler and scheduler gets it.
"""
import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.utils
import folder_paths
import node_helpers
import torch
from comfy_api.latest import io

from ..erasers import omnieraser as core
from ..erasers import layout
from ._paths import model_file

CATEGORY = "erasekit/omnieraser"
CONDITION_KEY = "erasekit_omnieraser_condition"
LORA_URL = "https://huggingface.co/theSure/Omnieraser/resolve/main/pytorch_lora_weights.safetensors"
MAX_LISTED = 20


def _original_shapes(model):
    """ComfyUI FLUX weight shapes (without ``diffusion_model.``), as the file has them, even while patched."""
    shapes = {}
    for key, tensor in model.model_state_dict("diffusion_model.").items():
        backup = model.backup.get(key)
        shapes[key[len("diffusion_model."):]] = tuple((backup.weight if backup is not None else tensor).shape)
    return shapes


def _listed(keys):
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", … ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def comfy_target(patch):
    """A ``LoraPatch``'s key in ``ModelPatcher.add_patches``: the weight's name, with its rows for a fused weight."""
    key = "diffusion_model." + patch.target.key
    return key if patch.target.offset is None else (key, patch.target.offset)


def comfy_patches(mapping, lora):
    """The patch dict ``ModelPatcher.add_patches`` takes, built by ComfyUI's own ``comfy.lora.load_lora``.

    The mapping decides which ComfyUI weight (and rows of a fused one) each LoRA module patches: ComfyUI's key map
    (``comfy.lora.model_lora_keys_unet``) knows some of the namings OmniEraser files come in, the core mapping all of
    them and works without ComfyUI (trainer, merge), so it is the one source. ComfyUI then reads the adapters (A/B,
    up/down, alpha, DoRA scales) as for any LoRA; the widening travels as the ``reshape_weight`` key ComfyUI's LoRA
    adapter reads (``comfy/weight_adapter/lora.py``), trained norm scales as ``set_weight``.
    """
    to_load, extra = {}, {}
    for patch in mapping.patches:
        to_load[patch.module] = comfy_target(patch)
        if patch.reshape is not None:
            extra[f"{patch.module}.reshape_weight"] = torch.tensor(list(patch.reshape))
        if patch.kind == "set":
            extra[f"{patch.module}.set_weight"] = patch.weight
    return comfy.lora.load_lora({**lora, **extra}, to_load, log_missing=False)


class OmniEraserConcat:
    """Replacement for ``BaseModel.concat_cond`` on a FLUX with OmniEraser's widened img_in.

    Returns ``[B,48,h,w]`` = normalised VAE(background), VAE(foreground), inverted mask ×16, for the noise being
    sampled. Independent of the weights' current shape, so it also holds when img_in is patched lazily
    (low-VRAM loading) and ComfyUI's own check of img_in's width would see 64.
    """

    def __init__(self, base_model):
        self.base_model = base_model

    def __call__(self, **kwargs):
        condition = kwargs.get(CONDITION_KEY)
        if condition is None:
            raise ValueError(
                "This MODEL carries the OmniEraser LoRA (img_in widened to 256 features), but a conditioning that "
                "reached the sampler has no OmniEraser condition: pass both positive and negative through "
                "'OmniEraser Conditioning'.")
        noise, device = kwargs["noise"], kwargs["device"]
        background = self.base_model.process_latent_in(condition["background"].to(device, torch.float32))
        foreground = self.base_model.process_latent_in(condition["foreground"].to(device, torch.float32))
        if tuple(background.shape[-2:]) != tuple(noise.shape[-2:]):
            raise ValueError(
                f"The OmniEraser condition is {background.shape[-1]}x{background.shape[-2]} latent pixels but the "
                f"latent being sampled is {noise.shape[-1]}x{noise.shape[-2]}; sample the latent that "
                "'OmniEraser Conditioning' outputs (or one of the same size).")
        cond = core.condition_latent(background, foreground, condition["mask"].to(device))
        if cond.shape[0] not in (1, noise.shape[0]):
            raise ValueError(
                f"The OmniEraser condition has a batch of {cond.shape[0]} but {noise.shape[0]} latents are sampled; "
                "use a batch of 1 or the same batch.")
        return cond.expand(noise.shape[0], -1, -1, -1)


def _require_flux(model):
    """A clear error for a MODEL that is not FLUX (OmniEraser's LoRA and its merge fit FLUX.1-dev only)."""
    if not isinstance(model.model, comfy.model_base.Flux):
        raise ValueError(f"OmniEraser needs a FLUX.1-dev MODEL; this MODEL is {type(model.model).__name__}.")


def _checked_mapping(model, lora):
    """``core.map_lora`` of ``lora`` onto ``model``'s FLUX weights (as stored, past any patch), or a clear error: the
    model is merged already, a LoRA key matches nothing, or the LoRA widens img_in to another width than
    OmniEraser's. A LoRA that does not widen img_in passes (its ``widened_in_features`` is None)."""
    shapes = _original_shapes(model)
    if shapes.get("img_in.weight", (0, 0))[1] == core.WIDENED_IN_FEATURES:
        raise ValueError("This FLUX already has OmniEraser's 256-wide img_in: it is a merged OmniEraser model. Use "
                         "'OmniEraser Merged Model' on it instead of loading the LoRA again.")
    mapping = core.map_lora(lora, shapes)
    if mapping.unmatched:
        raise ValueError(
            f"{len(mapping.unmatched)} of {len(lora)} LoRA keys match nothing in this FLUX model "
            f"(depth {core.flux_geometry(shapes)[:2]}): {_listed(mapping.unmatched)}.")
    widened = mapping.widened_in_features
    if widened is not None and widened != core.WIDENED_IN_FEATURES:
        raise ValueError(
            f"The LoRA widens img_in to {widened} input features; OmniEraser's layout needs "
            f"{core.WIDENED_IN_FEATURES} (16 noise + 48 condition channels, 2x2 packed).")
    return mapping


def apply_omnieraser_lora(model, lora, strength):
    """Clone ``model`` and patch ``lora`` (a state dict) onto it; raises on any key that does not apply."""
    _require_flux(model)
    mapping = _checked_mapping(model, lora)
    widened = mapping.widened_in_features
    patched = model.clone()
    patches = comfy_patches(mapping, lora)
    applied = patched.add_patches(patches, strength)
    missing = {comfy_target(p) for p in mapping.patches} - set(applied)
    if missing:
        raise ValueError(f"ComfyUI could not patch these FLUX weights: {_listed(sorted(map(str, missing)))}.")
    if widened is not None:
        use_omnieraser_condition(patched)
    return patched, mapping


def use_omnieraser_condition(model):
    """Make ``model`` (a ModelPatcher, changed in place) read OmniEraser's 48-channel condition: the object patch
    on ``concat_cond``, active while this MODEL is loaded."""
    model.add_object_patch("concat_cond", OmniEraserConcat(model.model))
    return model


class OmniEraserLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitOmniEraserLoraLoader",
            display_name="OmniEraser LoRA Loader (FLUX)",
            category=CATEGORY,
            description=(
                "Loads an OmniEraser LoRA onto a FLUX.1-dev MODEL (UNETLoader, any weight dtype incl. fp8): "
                "theSure/Omnieraser's pytorch_lora_weights.safetensors widens img_in to 256 input features and "
                "makes the model read the 48-channel OmniEraser condition; the ControlNet version's LoRA is a plain "
                "FLUX LoRA. diffusers/PEFT, kohya and ComfyUI namings are accepted; keys that match nothing are an "
                "error. On cards that cannot hold the whole FLUX (8-12 GB) ComfyUI re-applies the LoRA to every "
                "offloaded weight at every step: save a merged model once with 'Save OmniEraser Merged FLUX' and load "
                "it with UNETLoader + 'OmniEraser Merged Model' instead."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1-dev MODEL from UNETLoader / Load Diffusion Model."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The LoRA file in ComfyUI's models/loras folder, e.g. theSure/Omnieraser's "
                               "pytorch_lora_weights.safetensors (renamed as you like)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength. 1.0 is what OmniEraser was trained for; the img_in widening "
                               "applies at any strength."),
            ],
            outputs=[io.Model.Output("omnieraser_model", display_name="model",
                                     tooltip="The patched FLUX. Use it with 'OmniEraser Conditioning'.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = model_file("loras", lora_name, LORA_URL)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patched, _ = apply_omnieraser_lora(model, lora, strength)
        return io.NodeOutput(patched)


def _check_size(image):
    height, width = image.shape[1:3]
    if height % 16 or width % 16:
        raise ValueError(
            f"OmniEraser needs an image whose sides are multiples of 16 (FLUX packs 2x2 latent patches); this one is "
            f"{width}x{height}. Use 'Crop Around Mask (for erasers)' with multiple 16 first.")


def omnieraser_condition(vae, image, mask, progress=None):
    """Encode the official pair of condition images; returns the dict stored in the conditioning."""
    mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
    _check_size(image)
    background, foreground = core.condition_images(image, mask)
    latents = []
    for done, pixels in enumerate((background, foreground), start=1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        latents.append(vae.encode(pixels[:, :, :, :3]))
        if progress is not None:
            progress(done, 2)
    return {"background": latents[0], "foreground": latents[1], "mask": layout.binarize(mask).float()}


class OmniEraserConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitOmniEraserConditioning",
            display_name="OmniEraser Conditioning",
            category=CATEGORY,
            description=(
                "Builds OmniEraser's condition from the photo and the object mask: VAE(background with the object "
                "blacked out), VAE(the object alone) and the inverted mask, at latent resolution. It travels with "
                "positive and negative to a MODEL from 'OmniEraser LoRA Loader'. Sample the output latent at "
                f"denoise 1.0. Official settings: prompt '{core.PROMPT}' encoded with T5 padded to "
                f"{core.T5_TOKENS} tokens (core T5TokenizerOptions, min_length {core.T5_TOKENS}), FLUX guidance "
                f"{core.GUIDANCE}, CFG 1, {core.STEPS} steps on the sigmas of 'FLUX Sigmas (diffusers schedule)' "
                "after core ModelSamplingFlux set to the image's width and height."),
            inputs=[
                io.Conditioning.Input("positive", tooltip=f"Encoded prompt; the paper uses '{core.PROMPT}'."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (only used with CFG > 1)."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors)."),
                io.Image.Input("image", tooltip="The photo or crop, sides a multiple of 16 (about 1024 px works best)."),
                io.Mask.Input("mask", tooltip="Object mask at the image's size, 1 = remove, thresholded at 0.5. The "
                              "object's shadow and reflection need not be masked."),
            ],
            outputs=[
                io.Conditioning.Output("positive_out", display_name="positive", tooltip="Positive with the condition."),
                io.Conditioning.Output("negative_out", display_name="negative", tooltip="Negative with the condition."),
                io.Latent.Output("latent", tooltip="An empty latent of the image's size and batch to sample from."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, image, mask) -> io.NodeOutput:
        bar = comfy.utils.ProgressBar(2)
        condition = omnieraser_condition(vae, image, mask, lambda done, total: bar.update_absolute(done, total))
        batch = max(image.shape[0], condition["mask"].shape[0])
        latent = torch.zeros(batch, core.LATENT_CHANNELS, image.shape[1] // 8, image.shape[2] // 8)
        positive = node_helpers.conditioning_set_values(positive, {CONDITION_KEY: condition})
        negative = node_helpers.conditioning_set_values(negative, {CONDITION_KEY: condition})
        return io.NodeOutput(positive, negative, {"samples": latent})


NODES = [OmniEraserLoraLoader, OmniEraserConditioning]
