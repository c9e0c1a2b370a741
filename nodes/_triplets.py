"""Triplet datasets (dataset_tools/triplets.py) as ComfyUI IMAGE/MASK batches, for the dataset nodes."""
import numpy as np
import torch

from ..dataset_tools.triplets import TripletPreview, preview_triplets

RESUME_TOOLTIP = ("Continue a folder that already holds samples made with the same settings (what is there is kept "
                  "and not made again). Off: such a folder is an error. Other settings than the folder's are refused "
                  "with the differences listed, unless append is on.")
APPEND_TOOLTIP = ("Add samples made with other settings to a folder that holds samples; each new sample records its "
                  "settings in manifest.jsonl and dataset.json lists every run's settings.")


def to_image(arrays):
    """uint8 HxWx3 arrays of one size → IMAGE [B,H,W,3] in [0, 1]."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def to_mask(arrays):
    """bool HxW arrays of one size → MASK [B,H,W] of 0 and 1."""
    return torch.from_numpy(np.stack(arrays)).float()


def preview(folder, start, count, host=None, skip_other_sizes=False):
    """Samples ``start``..``start+count`` of a triplet dataset → (source IMAGE, MASK, target IMAGE, records)."""
    items = preview_triplets(TripletPreview(folder, start, count, skip_other_sizes), host)
    return (to_image([i["source"] for i in items]), to_mask([i["mask"] for i in items]),
            to_image([i["target"] for i in items]), [i["record"] for i in items])
