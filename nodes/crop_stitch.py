"""Crop a photo around its mask (or take it whole) at an eraser's working size, and stitch the erased crop back.

Several objects per photo use ComfyUI's list semantics: with ``split`` on, the crop node outputs one crop per group
of nearby objects as output lists (``is_output_list``), so every node between it and the stitch runs once per crop;
the stitch takes the whole lists (``is_input_list``) and pastes the crops into the photo one after another.
"""
import comfy.model_management
from comfy_api.latest import io

from ..erasers import crop_stitch as core
from ..erasers.smarteraser import PASTE_BLUR_RADIUS

CATEGORY = "erasekit/masks"
# The socket type that carries an ``erasers.crop_stitch.CropInfo`` (crop box, working size, how it was scaled)
# from a crop node to 'Stitch Erased Crop Back'. nodes/smarteraser.py's crop node outputs it too.
CropInfoSocket = io.Custom("ERASEKIT_CROP_INFO")


SPLIT_TOOLTIP = (
    "Off: one crop around every object of the mask. On: one crop per group of nearby objects (8-connected pieces "
    "of the mask), output as lists: the eraser runs once per crop and 'Stitch Erased Crop Back' pastes them into "
    "the photo one after another, so three separate objects cost three crops, not one over the whole photo. Stray "
    "specks count as objects: drop them first ('Mask Clean-up', min_island_pixels).")
GROUP_DISTANCE_TOOLTIP = (
    "split only: objects whose crop boxes (context included) overlap, touch or lie within this many pixels of the "
    "photo of each other share one crop; a merged group's box grows, and merging repeats. 0: only crops that would "
    "overlap or touch merge, so no pixel is erased twice.")


def crop_outputs(image_id, image_tooltip, crop_info_tooltip, with_size=False):
    """The crop nodes' outputs, as lists: one item per crop (a single crop is a list of one)."""
    outputs = [
        io.Image.Output(image_id, display_name="image", is_output_list=True,
                        tooltip=f"{image_tooltip} One per crop when split."),
        io.Mask.Output("crop_mask", display_name="mask", is_output_list=True,
                       tooltip="The mask cut and scaled the same way (0 in the padding)."),
        CropInfoSocket.Output("crop_info", is_output_list=True, tooltip=crop_info_tooltip),
    ]
    if with_size:
        outputs += [
            io.Int.Output("width", is_output_list=True,
                          tooltip="The crop's width in pixels (for ModelSamplingFlux's width)."),
            io.Int.Output("height", is_output_list=True,
                          tooltip="The crop's height in pixels (for ModelSamplingFlux's height)."),
        ]
    return outputs


def crop_lists(crops, with_size=False):
    """``NodeOutput`` of output lists from ``[(crop, crop_mask, info)]``."""
    columns = [[crop for crop, _, _ in crops], [m for _, m, _ in crops], [info for _, _, info in crops]]
    if with_size:
        columns += [[info.padded_width for _, _, info in crops], [info.padded_height for _, _, info in crops]]
    return io.NodeOutput(*columns)


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
                "Feed the crop to the eraser and its output to 'Stitch Erased Crop Back'. With split on, each group "
                "of nearby objects gets its own crop and the eraser runs once per crop."),
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
                io.Boolean.Input("split", default=False, tooltip=SPLIT_TOOLTIP),
                io.Int.Input("group_distance", default=core.GROUP_DISTANCE, min=0, max=16384,
                             tooltip=GROUP_DISTANCE_TOOLTIP),
            ],
            outputs=crop_outputs("crop_image", "The scaled, padded crop.", "Where the crop came from; connect to "
                                 "'Stitch Erased Crop Back'.", with_size=True),
        )

    @classmethod
    def execute(cls, image, mask, context, target_side, multiple, upscale, square, split,
                group_distance) -> io.NodeOutput:
        options = dict(context=context, target_side=target_side, multiple=multiple, square=square, upscale=upscale)
        if split:
            crops = core.crop_around_objects(image, mask, distance=group_distance, **options)
        else:
            crops = [core.crop_around_mask(image, mask, **options)]
        return crop_lists(crops, with_size=True)


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
        working, working_mask, info = core.resize_whole_image(image, mask, short_side, multiple)
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
                "feathered mask only. Every pixel the paste does not reach is returned exactly as it was. The crops "
                "of a split photo are pasted one after another into one result."),
            is_input_list=True,
            inputs=[
                io.Image.Input("original_image", tooltip="The photo given to the crop node."),
                io.Image.Input("erased_crop", tooltip="The eraser's output for the crop (same size as the crop); "
                               "after a split crop, the outputs of every crop (a list, as the eraser chain makes it)."),
                CropInfoSocket.Input("crop_info", tooltip="The crop_info output of the crop node."),
                io.Mask.Input("mask", tooltip="The full-size object mask (1 = removed), as given to the crop node."),
                io.Combo.Input("paste_back", options=list(core.PASTE_BACK), default="change-aware",
                               tooltip="change-aware: the grown mask plus every region the eraser changed beyond "
                               "VAE round-trip noise (OmniEraser removes shadows and reflections outside the mask). "
                               "whole crop: the whole box, feathered at its border. mask: the grown, feathered "
                               "mask only (SmartEraser, which removes the object alone). After a split, each crop "
                               "is compared with the photo it was cut from and pasted into the result of the "
                               "crops before it."),
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
            outputs=[io.Image.Output("image", is_output_list=True,
                                     tooltip="The photo with the erased region(s) pasted back; one per photo.")],
        )

    @classmethod
    def execute(cls, original_image, erased_crop, crop_info, mask, paste_back, grow, blur_radius,
                change_threshold) -> io.NodeOutput:
        # Every input is a list (is_input_list). The crop infos come in runs, one per photo (a split photo's parts
        # in a row); the other inputs hold one value per photo, or one for all.
        if len(erased_crop) != len(crop_info):
            raise ValueError(f"Got {len(erased_crop)} erased crops for {len(crop_info)} crop infos: connect the eraser "
                             "chain's output of every crop (one per crop info).")
        runs = core.part_runs(crop_info)
        photos = _per_photo(len(runs), original_image=original_image, mask=mask, paste_back=paste_back, grow=grow,
                            blur_radius=blur_radius, change_threshold=change_threshold)
        return io.NodeOutput([
            core.stitch_parts(photo["original_image"], erased_crop[start:end], crop_info[start:end],
                              photo["mask"], photo["paste_back"], photo["grow"], photo["blur_radius"],
                              photo["change_threshold"],
                              check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
            for photo, (start, end) in zip(photos, runs)])


def _per_photo(count, **lists):
    """``count`` dicts of one value per name: the list's item for that photo, or its only item for every photo."""
    for name, values in lists.items():
        if len(values) not in (1, count):
            raise ValueError(f"{name} has {len(values)} items for {count} photos' crops; give one, or one per photo.")
    return [{name: values[min(index, len(values) - 1)] for name, values in lists.items()} for index in range(count)]


NODES = [CropAroundMask, WholeImageAtWorkingSize, StitchCrop]
