"""Text to Mask: object masks from words (GroundingDINO boxes cut out by SAM 2; core: segment/text_masks.py).

The models are small next to an eraser (GroundingDINO-T ~0.7 GB, SAM 2.1-L ~0.9 GB) and are kept loaded between
runs (the last pair used), so a folder run or a re-queued graph does not reload them for every image.
"""
import comfy.model_management
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io

from ..segment import text_masks as core
from ._paths import model_choices, model_path
from ._segmenter_models import DINO_FOLDER, SAM2_FOLDER

CATEGORY = "erasekit/masks"
DINO_URL = "https://huggingface.co/IDEA-Research/grounding-dino-tiny (the whole repository as a folder)"
SAM2_URL = ("https://huggingface.co/facebook/sam2.1-hiera-large (a transformers folder), or Meta's "
            "sam2.1_hiera_large.pt from https://github.com/facebookresearch/sam2")
UNION = "union"
PER_OBJECT = "one mask per object"

_loaded = {}  # (grounding-dino path, sam path, device) → TextMasker; only the last pair is kept


def masker_for(grounding_dino, sam2, device):
    """The loaded GroundingDINO + SAM 2 pair for these files (loaded once, kept until another pair is asked for)."""
    key = (model_path(DINO_FOLDER, grounding_dino, DINO_URL), model_path(SAM2_FOLDER, sam2, SAM2_URL), str(device))
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = core.load_text_masker(key[0], key[1], device)
    return _loaded[key]


def to_uint8(image):
    """ComfyUI IMAGE [B,H,W,3] float → uint8 numpy [B,H,W,3]."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class TextToMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitTextToMask",
            display_name="Text to Mask (GroundingDINO + SAM 2)",
            category=CATEGORY,
            description=("Masks of the objects a text prompt names: GroundingDINO finds them, SAM 2 cuts each box "
                         "out. Weights stay local: models/grounding-dino and models/sam2; nothing downloads."),
            inputs=[
                io.Image.Input("image", tooltip="The photo(s) to find objects in."),
                io.String.Input("prompt", default="",
                                tooltip='Objects to mask, e.g. "person" or "car. bicycle." (phrases split by periods '
                                        'or commas).'),
                io.Combo.Input("grounding_dino", options=model_choices(DINO_FOLDER),
                               tooltip="GroundingDINO transformers folder in models/grounding-dino (e.g. "
                                       "IDEA-Research/grounding-dino-tiny)."),
                io.Combo.Input("sam2", options=model_choices(SAM2_FOLDER),
                               tooltip="SAM 2 / 2.1 in models/sam2: Meta's checkpoint (sam2.1_hiera_large.pt) or a "
                                       "transformers folder (facebook/sam2.1-hiera-large)."),
                io.Float.Input("box_threshold", default=core.BOX_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Keep boxes scoring at least this (GroundingDINO's README: 0.35). Lower "
                                       "finds more objects, and more false ones."),
                io.Float.Input("text_threshold", default=core.TEXT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="A box's words must match the prompt at least this well (README: 0.25)."),
                io.Combo.Input("output", options=[UNION, PER_OBJECT], default=UNION,
                               tooltip="union: one mask per image with every object found. one mask per object: "
                                       "a batch of masks, best detection first (a single image only)."),
            ],
            outputs=[
                io.Mask.Output("masks", tooltip="1 = object. Nothing found gives an empty mask."),
                io.Int.Output("count", tooltip="How many objects were found (over the whole image batch)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, grounding_dino, sam2):
        """Model names not in the lists reach here: say which file is missing, where, and where to get it."""
        try:
            model_path(DINO_FOLDER, grounding_dino, DINO_URL)
            model_path(SAM2_FOLDER, sam2, SAM2_URL)
        except FileNotFoundError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, image, prompt, grounding_dino, sam2, box_threshold, text_threshold, output) -> io.NodeOutput:
        if output == PER_OBJECT and image.shape[0] != 1:
            raise ValueError(f"'{PER_OBJECT}' needs a single image, got a batch of {image.shape[0]}: use "
                             f"'{UNION}' for batches")
        masker = masker_for(grounding_dino, sam2, comfy.model_management.get_torch_device())
        pictures = to_uint8(image)
        bar = comfy.utils.ProgressBar(len(pictures))
        found = []
        for index, picture in enumerate(pictures):
            comfy.model_management.throw_exception_if_processing_interrupted()
            found.append(masker(picture, prompt, box_threshold, text_threshold))
            bar.update_absolute(index + 1, len(pictures))
        count = sum(len(f) for f in found)
        if output == UNION:
            masks = np.stack([f.union() for f in found])
        else:
            masks = found[0].masks if len(found[0]) else np.zeros((1, *pictures.shape[1:3]), bool)
        return io.NodeOutput(torch.from_numpy(masks.astype(np.float32)), count)


NODES = [TextToMask]
