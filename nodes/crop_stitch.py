"""Crop a photo around its mask to an eraser's working size, and stitch the erased crop back."""
import comfy.model_management
from comfy_api.latest import io

from ..erasers import crop_stitch as core

CATEGORY = "erasekit/masks"
CropInfo = io.Custom("ERASEKIT_CROP_INFO")


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
                io.Float.Input("context", default=0.5, min=0.0, max=10.0, step=0.05,
                               tooltip="Margin around the mask's bounding box on every side, as a fraction of the "
                               "box's longer side (clipped to the photo). More context helps the eraser match the "
                               "scene and reach shadows and reflections."),
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
                CropInfo.Output("crop_info", tooltip="Where the crop came from; connect to the stitch node."),
            ],
        )

    @classmethod
    def execute(cls, image, mask, context, target_side, multiple, upscale, square) -> io.NodeOutput:
        crop, crop_mask, info = core.crop_around_mask(image, _as_batch(mask), context=context, target_side=target_side,
                                                      multiple=multiple, square=square, upscale=upscale)
        return io.NodeOutput(crop, crop_mask, info)


class StitchCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitStitchCrop",
            display_name="Stitch Erased Crop Back",
            category=CATEGORY,
            description=(
                "Scales the eraser's output back to the crop box and pastes it into the original photo through a "
                "feathered copy of the mask. Every pixel the feathered mask does not reach is returned exactly "
                "as it was."),
            inputs=[
                io.Image.Input("original_image", tooltip="The photo given to 'Crop Around Mask'."),
                io.Image.Input("erased_crop", tooltip="The eraser's output for the crop (same size as the crop)."),
                CropInfo.Input("crop_info", tooltip="The crop_info output of 'Crop Around Mask'."),
                io.Mask.Input("mask", tooltip="The full-size mask (1 = removed) that limits the paste-back. "
                              "OmniEraser also removes shadows and reflections outside the object mask: grow it, "
                              "or pass a larger mask, so they are pasted too."),
                io.Int.Input("grow", default=0, min=0, max=1024,
                             tooltip="Dilate the mask by this many pixels before feathering."),
                io.Float.Input("blur_radius", default=5.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Gaussian feather (standard deviation in pixels, like PIL's GaussianBlur "
                               "radius; SmartEraser pastes back with 5). 0 pastes with a hard edge."),
            ],
            outputs=[io.Image.Output("image", tooltip="The photo with the erased region pasted back.")],
        )

    @classmethod
    def execute(cls, original_image, erased_crop, crop_info, mask, grow, blur_radius) -> io.NodeOutput:
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = core.stitch(original_image, erased_crop, crop_info, _as_batch(mask), grow=grow, blur_radius=blur_radius)
        return io.NodeOutput(out)


NODES = [CropAroundMask, StitchCrop]
