"""Crop a photo around its mask (or take it whole) at an eraser's working size, and stitch the erased crop back."""
import comfy.model_management
from comfy_api.latest import io

from ..erasers import crop_stitch as core
from ..erasers.smarteraser import PASTE_BLUR_RADIUS

CATEGORY = "erasekit/masks"
# The socket type that carries an ``erasers.crop_stitch.CropInfo`` (crop box, working size, how it was scaled)
# from a crop node to 'Stitch Erased Crop Back'. nodes/smarteraser.py's crop node outputs it too.
CropInfoSocket = io.Custom("ERASEKIT_CROP_INFO")


def _as_batch(mask):
    return mask.unsqueeze(0) if mask.ndim == 2 else mask


class CropAroundMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitCropAroundMask",
            display_name="Crop Around Mask (for erasers)",
            category=CATEGORY,
            description=(
                "Cuts the masked object with some surrounding context out of a photo of any size and scales it to "
                "the eraser's working size (OmniEraser 1024 px, SmartEraser 512 px), padded to a multiple of 16. "
                "Feed the crop to the eraser and its output to 'Stitch Erased Crop Back'."),
            inputs=[
                io.Image.Input("image", tooltip="The photo; every batch item gets the same crop box."),
                io.Mask.Input("mask", tooltip="Object mask at the photo's size, 1 = remove. The crop box holds the "
                              "union of the batch's masks. A mask batch of 1 is used for every image."),
                io.Float.Input("context", default=core.CONTEXT, min=0.0, max=10.0, step=0.05,
                               tooltip="Margin around the mask's bounding box on every side, as a fraction of the "
                               f"box's longer side (clipped to the photo). {core.CONTEXT} holds the shadows and "
                               "floor reflections measured on real removal pairs (up to 0.63x the object's "
                               "height); raise it for long evening shadows."),
                io.Int.Input("target_side", default=1024, min=64, max=8192, step=16,
                             tooltip="Longer side of the crop after scaling, floored to a multiple of 'multiple'. "
                             "OmniEraser: 1024; SmartEraser: 512."),
                io.Int.Input("multiple", default=16, min=1, max=128,
                             tooltip="The crop's sides are padded up to a multiple of this (16 for FLUX's 2x2 "
                             "latent patches, 8 for SD)."),
                io.Boolean.Input("upscale", default=True,
                                 tooltip="Scale crops smaller than target_side up to it (the papers work at their "
                                 "fixed size). Off: small crops keep their size and are only padded."),
                io.Boolean.Input("square", default=False,
                                 tooltip="Make the box square where the photo allows (SmartEraser's 512x512 crops)."),
            ],
            outputs=[
                io.Image.Output("crop_image", display_name="image", tooltip="The scaled, padded crop."),
                io.Mask.Output("crop_mask", display_name="mask", tooltip="The mask cut and scaled the same way "
                               "(0 in the padding)."),
                CropInfoSocket.Output("crop_info", tooltip="Where the crop came from; connect to the stitch node."),
                io.Int.Output("width", tooltip="The crop's width in pixels (for ModelSamplingFlux's width)."),
                io.Int.Output("height", tooltip="The crop's height in pixels (for ModelSamplingFlux's height)."),
            ],
        )

    @classmethod
    def execute(cls, image, mask, context, target_side, multiple, upscale, square) -> io.NodeOutput:
        crop, crop_mask, info = core.crop_around_mask(image, _as_batch(mask), context=context, target_side=target_side,
                                                      multiple=multiple, square=square, upscale=upscale)
        return io.NodeOutput(crop, crop_mask, info, info.padded_width, info.padded_height)


class WholeImageAtWorkingSize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitWholeImageAtWorkingSize",
            display_name="Whole Image at Working Size (OmniEraser demo)",
            category=CATEGORY,
            description=(
                "The official OmniEraser demo's preprocessing (gradio_control_lora_flux.py): the whole photo, short "
                "side scaled to 1024, both sides floored to a multiple of 16, bicubic. 'Stitch Erased Crop Back' "
                "scales the result back to the photo's size."),
            inputs=[
                io.Image.Input("image", tooltip="The photo (any size)."),
                io.Mask.Input("mask", tooltip="Object mask at the photo's size, 1 = remove."),
                io.Int.Input("short_side", default=1024, min=64, max=8192, step=16,
                             tooltip="The short side after scaling; the demo uses 1024."),
                io.Int.Input("multiple", default=16, min=1, max=128,
                             tooltip="Both sides are floored to a multiple of this (16 for FLUX)."),
            ],
            outputs=[
                io.Image.Output("working_image", display_name="image", tooltip="The photo at the working size."),
                io.Mask.Output("working_mask", display_name="mask", tooltip="The mask at the working size."),
                CropInfoSocket.Output("crop_info", tooltip="The whole photo as the crop box; connect to the stitch "
                                      "node."),
                io.Int.Output("width", tooltip="The working width in pixels (for ModelSamplingFlux's width)."),
                io.Int.Output("height", tooltip="The working height in pixels (for ModelSamplingFlux's height)."),
            ],
        )

    @classmethod
    def execute(cls, image, mask, short_side, multiple) -> io.NodeOutput:
        working, working_mask, info = core.resize_whole_image(image, _as_batch(mask), short_side, multiple)
        return io.NodeOutput(working, working_mask, info, info.padded_width, info.padded_height)


class StitchCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitStitchCrop",
            display_name="Stitch Erased Crop Back",
            category=CATEGORY,
            description=(
                "Scales the eraser's output back to the crop box and pastes it into the original photo. "
                "'change-aware' pastes the object's region and wherever the eraser changed the picture (shadows, "
                "reflections); 'whole crop' pastes the whole box, feathered at its border; 'mask' pastes the "
                "feathered mask only. Every pixel the paste does not reach is returned exactly as it was."),
            inputs=[
                io.Image.Input("original_image", tooltip="The photo given to the crop node."),
                io.Image.Input("erased_crop", tooltip="The eraser's output for the crop (same size as the crop)."),
                CropInfoSocket.Input("crop_info", tooltip="The crop_info output of the crop node."),
                io.Mask.Input("mask", tooltip="The full-size object mask (1 = removed)."),
                io.Combo.Input("paste_back", options=list(core.PASTE_BACK), default="change-aware",
                               tooltip="change-aware: the grown mask plus every region the eraser changed beyond "
                               "VAE round-trip noise (OmniEraser removes shadows and reflections outside the mask). "
                               "whole crop: the whole box, feathered at its border. mask: the grown, feathered "
                               "mask only (SmartEraser, which removes the object alone)."),
                io.Int.Input("grow", default=0, min=0, max=1024,
                             tooltip="Dilate the mask (and the change map) by this many pixels before feathering. "
                             "Pixels are the photo's, or SmartEraser's 512-short-side pixels after 'SmartEraser "
                             "Crop 512' (the crop decides)."),
                io.Float.Input("blur_radius", default=5.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Gaussian feather (standard deviation in pixels, like PIL's GaussianBlur "
                               f"radius; SmartEraser's demo pastes back with {PASTE_BLUR_RADIUS} at its "
                               "512-short-side scale). 0 pastes with a hard edge."),
                io.Float.Input("change_threshold", default=core.CHANGE_THRESHOLD, min=0.0, max=1.0, step=0.005,
                               tooltip="change-aware only: how far (0-1 pixel value, after smoothing) the eraser's "
                               "output must differ from its input to count as changed. "
                               f"{core.CHANGE_THRESHOLD} ignores a VAE round trip and keeps faint reflections."),
            ],
            outputs=[io.Image.Output("image", tooltip="The photo with the erased region pasted back.")],
        )

    @classmethod
    def execute(cls, original_image, erased_crop, crop_info, mask, paste_back, grow, blur_radius,
                change_threshold) -> io.NodeOutput:
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = core.stitch(original_image, erased_crop, crop_info, _as_batch(mask), paste_back, grow, blur_radius,
                          change_threshold)
        return io.NodeOutput(out)


NODES = [CropAroundMask, WholeImageAtWorkingSize, StitchCrop]
