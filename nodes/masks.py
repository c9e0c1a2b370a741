"""Mask nodes: SmartEraser mask irregularisation and the clean-ups core ComfyUI lacks."""
from comfy_api.latest import io

from ..erasers import layout
from ..erasers import masks as core
from ._host import ComfyHost

CATEGORY = "erasekit/masks"
RANDOM = "random (shape rule)"
AREA_RATIO = "area ratio"
CHOICE_OPTIONS = [RANDOM] + [f"{n} {name}" for n, name in core.CHOICE_NAMES.items()] + [AREA_RATIO]
FIXED_RATIOS = "fixed (paper test mode)"
RANDOM_RATIOS = "random (paper training ranges)"
THRESHOLD_NOTE = "Soft or painted masks are thresholded at 0.5 first."
IMAGE_TOOLTIP = ("Optional: the image this mask belongs to. The node stops with an error naming both sizes "
                 "if they differ; a mask batch of 1 is repeated for every image.")


def _mask_for(mask, image):
    return mask if image is None else layout.check_mask_matches_image(image, mask)


def _progress_callbacks():
    host = ComfyHost()
    return host.progress, host.check_interrupt


class IrregularizeMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitIrregularizeMask",
            display_name="SmartEraser Mask Irregularisation",
            category=CATEGORY,
            description=(
                "Enlarges or reshapes an object mask the way SmartEraser does, so the eraser also removes the "
                "shadow, reflection and halo that a tight mask leaves behind. '3 dilate' with fixed ratios is "
                "the 1.10x dilation SmartEraser uses at inference; 'random' picks a choice allowed for the "
                "mask's shape, per batch item, for training-data augmentation."),
            inputs=[
                io.Mask.Input("mask", tooltip=f"Object mask, 1 = remove. {THRESHOLD_NOTE} Empty masks pass "
                              "through unchanged."),
                io.Combo.Input("choice", options=CHOICE_OPTIONS, default=CHOICE_OPTIONS[3],
                               tooltip="SmartEraser choice: 1 keep, 2 erode to 80-90 % of the area, 3 dilate "
                               "to 125-150 %, 4 convex hull dilated 125-150 %, 5 dilate 200-250 % then fit an "
                               "ellipse, 6 box grown 110-120 % then a Bezier blob. 'random' draws one the "
                               "shape allows; 'area ratio' grows/shrinks to exactly area_ratio. Results "
                               "covering over 70 % of the image fall back to the input mask."),
                io.Combo.Input("ratios", options=[FIXED_RATIOS, RANDOM_RATIOS], default=FIXED_RATIOS,
                               tooltip="Fixed: the paper's test-mode area ratios (erode 0.85, dilate 1.10, "
                               "hull 1.35, ellipse 2.25, blob 1.15). Random: drawn from the training ranges "
                               "with the seed."),
                io.Float.Input("area_ratio", default=core.EVAL_DILATION, min=0.05, max=20.0, step=0.01,
                               tooltip="Target area / mask area, used when choice is 'area ratio' "
                               "(> 1 grows, < 1 shrinks; growth stops at the full image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for random choices, ratios and blob shapes; each batch item "
                             "derives its own generator from it."),
                io.Combo.Input("metric", options=list(core.METRICS), default="chessboard",
                               tooltip="Grow/shrink geometry: chessboard = the official square kernels "
                               "(corners reach further); euclidean = round growth."),
                io.Image.Input("image", optional=True, tooltip=IMAGE_TOOLTIP),
            ],
            outputs=[
                io.Mask.Output("irregular_mask", display_name="mask", tooltip="The irregularised mask, 0 or 1."),
                io.String.Output("choices", tooltip="The choice used for each batch item, comma separated "
                                 "(1 where the > 70 % fallback kept the input)."),
            ],
        )

    @classmethod
    def execute(cls, mask, choice, ratios, area_ratio, seed, metric, image=None) -> io.NodeOutput:
        mask = _mask_for(mask, image)
        progress, check_interrupt = _progress_callbacks()
        if choice == AREA_RATIO:
            out = core.resize_to_area_batch(mask, area_ratio, metric, progress, check_interrupt)
            return io.NodeOutput(out, ",".join(f"area x{area_ratio:g}" for _ in range(out.shape[0])))
        picked = "random" if choice == RANDOM else int(choice.split(" ", 1)[0])
        out, used = core.irregularize_batch(mask, picked, seed, ratios == FIXED_RATIOS, metric,
                                            progress, check_interrupt)
        return io.NodeOutput(out, ",".join(str(c) for c in used))


class CleanMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitCleanMask",
            display_name="Mask Clean-up (holes, islands, soft edge)",
            category=CATEGORY,
            description=(
                "Tidies a painted or SAM mask before erasing: drops stray specks, fills holes inside the "
                "object and adds a soft edge that fades outwards, keeping the object itself fully masked."),
            inputs=[
                io.Mask.Input("mask", tooltip=f"Object mask, 1 = remove. {THRESHOLD_NOTE}"),
                io.Boolean.Input("fill_holes", default=True,
                                 tooltip="Fill background regions enclosed by the mask (regions touching the "
                                 "image border are not holes)."),
                io.Int.Input("max_hole_pixels", default=0, min=0, max=1 << 30,
                             tooltip="Only fill holes up to this many pixels; 0 fills holes of any size."),
                io.Int.Input("min_island_pixels", default=0, min=0, max=1 << 30,
                             tooltip="Drop mask pieces (8-connected) smaller than this many pixels; 0 keeps "
                             "all. Done before filling holes."),
                io.Int.Input("soft_edge_px", default=0, min=0, max=512,
                             tooltip="Fade from 1 at the mask edge to 0 this many pixels outside it; the "
                             "inside stays 1. 0 keeps a hard edge."),
                io.Image.Input("image", optional=True, tooltip=IMAGE_TOOLTIP),
            ],
            outputs=[io.Mask.Output("clean_mask", display_name="mask", tooltip="The cleaned mask.")],
        )

    @classmethod
    def execute(cls, mask, fill_holes, max_hole_pixels, min_island_pixels, soft_edge_px,
                image=None) -> io.NodeOutput:
        mask = _mask_for(mask, image)
        progress, check_interrupt = _progress_callbacks()
        out = core.clean_mask_batch(mask, fill_holes, max_hole_pixels or None, min_island_pixels,
                                    float(soft_edge_px), progress, check_interrupt)
        return io.NodeOutput(out)


NODES = [IrregularizeMask, CleanMask]
