"""SmartEraser nodes: load the released weights, build RG + VG conditioning, the official 512 crop/paste-back.

The conditioning works with ComfyUI's KSampler unchanged: RG rides on core SD1.5-inpaint's concat path
(``concat_latent_image`` = VAE latent of the *unmasked* image, ``concat_mask`` = the mask at latent size, so
``model_base.BaseModel.concat_cond`` builds ``[z, mask, VAE(image)]``); VG is the 7-token context itself.
"""
import os

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import node_helpers
import torch
from comfy_api.latest import io

from ..erasers import layout
from ..erasers import smarteraser as core
from ..erasers import smarteraser_convert as convert
from ..erasers.crop_stitch import CONTEXT, GROUP_DISTANCE
from . import _paths
from .crop_stitch import GROUP_DISTANCE_TOOLTIP, SPLIT_TOOLTIP, crop_lists, crop_outputs

CATEGORY = "erasekit/smarteraser"
FOLDER = _paths.register_folder("smarteraser")
REPO_URL = "https://github.com/longtaojiang/SmartEraser"
CLIP_VISION_URL = "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors"

Projector = io.Custom("SMARTERASER_PROJECTOR")
PRESETS = list(core.PRESETS) + ["custom"]


# --------------------------------------------------------------------------------------------- loading
def release_folders():
    """Sub-folders of models/smarteraser that hold a diffusers release (a unet/ folder)."""
    found = []
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            found += [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d, "unet"))]
    return found


def release_folder_path(name):
    for root in folder_paths.get_folder_paths(FOLDER):
        path = os.path.join(root, name or "")
        if name and os.path.isdir(os.path.join(path, "unet")):
            return path
    raise FileNotFoundError(
        f"SmartEraser folder {name!r} was not found in ComfyUI's '{FOLDER}' folder "
        f"({', '.join(folder_paths.get_folder_paths(FOLDER))}): put the released folder (unet/, vae/, text_encoder/, "
        f"clip_mlp_weight.pth) there. Weights: {REPO_URL} (Google Drive / Baidu links in its README)."
    )


def load_unet(path):
    """The diffusers UNet through ComfyUI's loader: keys → LDM layout, then comfy.sd's detection and loading.

    ComfyUI only recognises diffusers-layout UNets of the exact released sizes, so the keys are renamed first
    (the same mapping the converter CLI writes into checkpoints).
    """
    state_dict = comfy.utils.load_torch_file(path, safe_load=True)
    convert.check_inpaint_unet(state_dict, path)
    mapping = convert.unet_diffusers_to_ldm_keys(state_dict)
    model = comfy.sd.load_diffusion_model_state_dict({mapping[k]: v for k, v in state_dict.items()})
    if model is None:
        raise ValueError(f"ComfyUI could not recognise the UNet in {path} as SD1.5 (needs 320 channels, context 768).")
    return model


def load_text_encoder(path):
    state_dict = comfy.utils.load_torch_file(path, safe_load=True)
    # transformers ≥ 5 saves CLIPTextModel without the "text_model." level that ComfyUI's detection expects
    state_dict = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state_dict.items()}
    return comfy.sd.load_text_encoder_state_dicts([state_dict], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  embedding_directory=folder_paths.get_folder_paths("embeddings"))


def load_release(folder):
    """(MODEL, CLIP, VAE, projector) from an official SmartEraser diffusers folder."""
    model = load_unet(convert.component_file(folder, "unet"))
    clip = load_text_encoder(convert.component_file(folder, "text_encoder"))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(convert.component_file(folder, "vae"), safe_load=True))
    projector = core.load_projector(convert.projector_file(folder))
    return model, clip, vae, projector


class SmartEraserLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSmartEraserLoader",
            display_name="SmartEraser Loader (diffusers folder)",
            category=CATEGORY,
            description="Loads the released SmartEraser folder (SD1.5-inpainting UNet, VAE and text encoder, all "
                        "fine-tuned, plus the clip_mlp_weight projector) as ComfyUI MODEL, CLIP, VAE and projector.",
            inputs=[
                io.Combo.Input("folder", options=release_folders(),
                               tooltip="A folder in models/smarteraser with unet/, vae/, text_encoder/ and "
                                       f"clip_mlp_weight.pth, as released ({REPO_URL})."),
            ],
            outputs=[
                io.Model.Output(tooltip="SmartEraser's 9-channel SD1.5-inpainting UNet."),
                io.Clip.Output(tooltip="SmartEraser's fine-tuned CLIP text encoder (use it for the conditioning)."),
                io.Vae.Output(tooltip="The SD1.5 VAE."),
                Projector.Output(display_name="projector", tooltip="IM2TEXT: CLIP image embedding → text token."),
            ],
        )

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        return io.NodeOutput(*load_release(release_folder_path(folder)))


def projector_files():
    """Files in models/smarteraser, without the weights inside release folders (unet/, vae/, ...)."""
    inside_release = {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor"}
    return [f for f in folder_paths.get_filename_list(FOLDER)
            if not inside_release & set(f.replace(os.sep, "/").split("/")[:-1])]


class SmartEraserProjectorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSmartEraserProjectorLoader",
            display_name="SmartEraser Projector Loader",
            category=CATEGORY,
            description="Loads SmartEraser's image-to-text projector (clip_mlp_weight.pth or the converter's "
                        "_projector.safetensors) for use with a checkpoint made by erasekit-convert-smarteraser.",
            inputs=[
                io.Combo.Input("projector_name", options=projector_files(),
                               tooltip="Projector file in models/smarteraser (.pth loaded weights-only, or "
                                       ".safetensors)."),
            ],
            outputs=[Projector.Output(display_name="projector", tooltip="IM2TEXT: CLIP image embedding → text token.")],
        )

    @classmethod
    def execute(cls, projector_name) -> io.NodeOutput:
        return io.NodeOutput(core.load_projector(_paths.model_file(FOLDER, projector_name, REPO_URL)))


# --------------------------------------------------------------------------------------------- conditioning
def check_smarteraser_model(model):
    """A 9-channel SD1.5-inpainting MODEL, or an error naming what was given."""
    base = model.model
    unet = getattr(base.model_config, "unet_config", {})
    channels, context = unet.get("in_channels"), unet.get("context_dim")
    if tuple(getattr(base, "concat_keys", ())) != ("mask", "masked_image") or channels != 9 or context != 768:
        raise ValueError(
            f"SmartEraser needs its SD1.5-inpainting UNet (9 input channels, context 768); the MODEL given is "
            f"{type(base).__name__} with {channels} input channels and context {context}. A plain 4-channel SD1.5 "
            "UNet ignores the masked-region guidance: load SmartEraser's own weights."
        )


def _sd1_tokenizer(clip):
    tokenizer = clip.tokenizer
    inner = getattr(tokenizer, getattr(tokenizer, "clip", ""), None)
    if inner is None or getattr(tokenizer, "clip_name", None) != "l" or clip.cond_stage_model.__class__.__name__ != "SD1ClipModel":
        raise ValueError(f"SmartEraser needs the SD1.5 CLIP text encoder (CLIP-L); got {type(clip.cond_stage_model).__name__}.")
    return tokenizer.clip_name, inner


def text_context(clip, prompt):
    """SmartEraser's 7-token text hidden states ``[1, 7, 768]`` (the text encoder's last_hidden_state).

    The official code tokenises to max_length 7; ComfyUI's CLIP always encodes 77 tokens. CLIP's text
    transformer is causal (and ComfyUI's SD1 CLIP uses no padding mask), so the hidden states of the first 7
    positions depend only on the first 7 tokens: we give it the official 7 ids padded to 77 with the pad token
    and keep positions 0-6. The layer is forced to the last one (final layer norm applied), whatever
    CLIPSetLastLayer says, because that is what SmartEraser was trained with.
    """
    key, tokenizer = _sd1_tokenizer(clip)
    chunk = clip.tokenize(prompt)[key][0]
    ids = [t[0] for t in chunk]
    words = []
    for token in ids[1:]:
        if token == tokenizer.end_token:
            break
        if not isinstance(token, int):
            raise ValueError("SmartEraser prompts cannot use textual-inversion embeddings (the context is 7 plain tokens).")
        words.append(token)
    seven = core.seven_token_ids(words, tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token)
    tokens = {key: [[(t, 1.0) for t in seven + [tokenizer.pad_token] * (len(chunk) - len(seven))]]}
    clip = clip.clone()
    clip.layer_idx = None  # the model's default: SD1ClipModel's "last" layer
    hidden = clip.encode_from_tokens(tokens)
    return hidden[:, :core.CONTEXT_TOKENS].float()


def clip_image_embeds(clip_vision, pixel_values):
    """``image_embeds`` of pixel values already CLIP-preprocessed (so the zero tensor stays zero)."""
    model = getattr(clip_vision, "model", None)
    if model is None or not hasattr(clip_vision, "patcher"):
        raise ValueError(f"expected a CLIP_VISION model (CLIPVisionLoader with clip-vit-large-patch14); got {type(clip_vision).__name__}.")
    if getattr(clip_vision, "image_size", core.CLIP_SIZE) != core.CLIP_SIZE:
        raise ValueError(f"SmartEraser was trained with CLIP ViT-L/14 at {core.CLIP_SIZE} px (clip-vit-large-patch14); "
                         f"the CLIP vision model given works at {clip_vision.image_size} px.")
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    out = model(pixel_values=pixel_values.to(clip_vision.load_device, torch.float32), intermediate_output=-2)
    return out[2].float().to(comfy.model_management.intermediate_device())


def vg_contexts(clip, clip_vision, projector, image, mask, prompt):
    """(conditional [B,7,768], unconditional [1,7,768]) contexts of SmartEraser's visual guidance."""
    hidden = text_context(clip, prompt)
    empty = text_context(clip, "")
    tokens = []
    for index in range(image.shape[0]):
        comfy.model_management.throw_exception_if_processing_interrupted()
        crop = core.white_instance_crop(image[index, :, :, :3], mask[min(index, mask.shape[0] - 1)])
        tokens.append(core.image_tokens(clip_image_embeds(clip_vision, core.clip_pixel_values(crop)), projector))
    zero_token = core.image_tokens(clip_image_embeds(clip_vision, core.zero_pixel_values()), projector)
    conditional = core.splice_conditional(hidden.expand(len(tokens), -1, -1), torch.cat(tokens).to(hidden))
    return conditional, core.splice_unconditional(empty, zero_token.to(empty))


def rg_values(vae, image, mask):
    """RG's concat inputs: the VAE latent of the whole unmasked image and the mask at latent size."""
    latent = vae.encode(image[:, :, :, :3])
    return {"concat_latent_image": latent,
            "concat_mask": layout.latent_mask(mask, latent.shape[-2], latent.shape[-1]).to(latent)}


def check_image_mask(image, mask):
    """The mask broadcast to the image's batch; the image's sides must suit SD (multiples of 8)."""
    mask = layout.check_mask_matches_image(image, mask)
    core.check_inpaint_size(image.shape[1], image.shape[2])
    return mask.expand(image.shape[0], -1, -1)


class SmartEraserConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSmartEraserConditioning",
            display_name="SmartEraser Conditioning (RG + VG)",
            category=CATEGORY,
            description="SmartEraser's guidance for KSampler: the UNet sees the whole image (masked-region "
                        "guidance) and a CLIP token of the masked object spliced into a 7-token prompt (visual "
                        f"guidance). Sample with CFG {core.DEFAULT_CFG} and {core.DEFAULT_STEPS} steps on the "
                        "returned latent.",
            inputs=[
                io.Model.Input("model", tooltip="SmartEraser's 9-channel SD1.5-inpainting MODEL (checked here)."),
                io.Clip.Input("clip", tooltip="SmartEraser's fine-tuned text encoder (from its loader or checkpoint)."),
                io.Vae.Input("vae", tooltip="The SD1.5 VAE: encodes the unmasked image for the UNet's concat input."),
                Projector.Input("projector", tooltip="SmartEraser's IM2TEXT projector (clip_mlp_weight)."),
                io.Image.Input("image", tooltip="The image with the object, ideally the 512x512 SmartEraser crop; "
                                                "sides must be multiples of 8."),
                io.Mask.Input("mask", tooltip="Object mask, 1 = remove, same size as the image."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="CLIP ViT-L/14 vision: clip-vit-large-patch14 "
                                            f"({CLIP_VISION_URL}) in models/clip_vision, through CLIPVisionLoader."),
                io.Combo.Input("preset", options=PRESETS, default="demo",
                               tooltip=f"demo (app_remove.py): prompt '{core.DEFAULT_PROMPT}', the mask as given. "
                                       f"evaluation (inference_dis.py): prompt '{core.EVAL_PROMPT}', the mask "
                                       "dilated by the official test-mode loop (nominal 1.10x its area; 1.15-1.26x, "
                                       "mean 1.21x measured on ellipses). custom: the prompt and mask_area_ratio below."),
                io.String.Input("prompt", default=core.DEFAULT_PROMPT,
                                tooltip="custom preset only. Text before the object token: at most 5 words fit the "
                                        "7-token context (longer prompts are truncated like the official "
                                        "tokenizer)."),
                io.Float.Input("mask_area_ratio", default=1.0, min=1.0, max=4.0, step=0.01,
                               tooltip="custom preset only. Dilate the mask to exactly this multiple of its area "
                                       "first; 1.0 keeps the mask."),
            ],
            outputs=[
                io.Model.Output(tooltip="The same MODEL, passed through after the check."),
                io.Conditioning.Output(display_name="positive", tooltip="Prompt + object token, with RG concat."),
                io.Conditioning.Output(display_name="negative", tooltip="Empty prompt + zero-image token, with RG concat."),
                io.Latent.Output(tooltip="Empty latent of the image's size (the 9-channel UNet starts from pure noise; "
                                         "no latent blending)."),
                io.Mask.Output("used_mask", display_name="mask", tooltip="The (dilated) mask the guidance used."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, projector, image, mask, clip_vision, preset, prompt,
                mask_area_ratio) -> io.NodeOutput:
        check_smarteraser_model(model)
        mask = check_image_mask(image, mask)
        if preset == "custom":
            mask = core.dilate_mask(mask, mask_area_ratio)
        else:
            prompt = core.PRESETS[preset]["prompt"]
            mask = core.evaluation_mask(mask) if core.PRESETS[preset]["dilate"] else mask
        conditional, unconditional = vg_contexts(clip, clip_vision, projector, image, mask, prompt)
        values = rg_values(vae, image, mask)
        positive = node_helpers.conditioning_set_values([[conditional, {}]], values)
        negative = node_helpers.conditioning_set_values([[unconditional, {}]], values)
        latent = {"samples": torch.zeros_like(values["concat_latent_image"])}
        return io.NodeOutput(model, positive, negative, latent, mask)


# --------------------------------------------------------------------------------------------- crop / stitch
class SmartEraserCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSmartEraserCrop",
            display_name="SmartEraser Crop 512",
            category=CATEGORY,
            description="SmartEraser's 512x512 working image, as the official code makes it: the demo's square of "
                        "the image's short side around the mask scaled to 512 (masks larger than the short side: the "
                        "whole image scaled and padded white), or the evaluation's whole image resized to 512x512. "
                        "With split on (demo mode), one 512 square per group of nearby objects, erased one after "
                        "another.",
            inputs=[
                io.Image.Input("image", tooltip="The full image."),
                io.Mask.Input("mask", tooltip="Object mask (1 = remove), same size as the image."),
                io.Combo.Input("mode", options=list(core.CROP_MODES), default="demo",
                               tooltip="demo (app_remove.py): the crop around the mask. evaluation "
                                       "(inference_dis.py): the whole image squeezed to 512x512."),
                io.Boolean.Input("split", default=False,
                                 tooltip=f"{SPLIT_TOOLTIP} Demo mode only. Each group gets a square of its own (its "
                                         "box plus 'context', at most the image's short side) instead of the demo's "
                                         "short-side square, which every object of a photo would share."),
                io.Float.Input("context", default=CONTEXT, min=0.0, max=10.0, step=0.05,
                               tooltip="split only: margin around each group's box on every side, as a fraction of "
                                       "the box's longer side, before the box is made square."),
                io.Int.Input("group_distance", default=GROUP_DISTANCE, min=0, max=16384,
                             tooltip=GROUP_DISTANCE_TOOLTIP),
            ],
            outputs=crop_outputs(
                "crop", "512x512 image for SmartEraser Conditioning.",
                "Where the crop came from: connect to 'Stitch Erased Crop Back'. The demo pastes back with paste_back "
                f"'mask', grow 0, blur_radius {core.PASTE_BLUR_RADIUS} (at its 512-short-side scale, which this "
                "crop_info carries); the evaluation keeps the whole 512 output ('whole crop')."),
        )

    @classmethod
    def execute(cls, image, mask, mode, split, context, group_distance) -> io.NodeOutput:
        if not split:
            return crop_lists([core.smarteraser_crop(image, mask, mode)])
        if mode != "demo":
            raise ValueError(f"split works with mode 'demo' only; mode {mode!r} erases the whole image at 512x512 "
                             "in one crop. Turn split off or use mode 'demo'.")
        return crop_lists(core.smarteraser_split_crops(image, mask, context=context, distance=group_distance))


NODES = [SmartEraserLoader, SmartEraserProjectorLoader, SmartEraserConditioning, SmartEraserCrop]
