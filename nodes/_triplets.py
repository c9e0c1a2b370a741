"""Triplet datasets (dataset_tools/triplets.py) as ComfyUI IMAGE/MASK batches, for the dataset nodes."""
import numpy as np
import torch

from ..dataset_tools.triplets import TripletDataset


def to_image(arrays):
    """uint8 HxWx3 arrays of one size → IMAGE [B,H,W,3] in [0, 1]."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def preview(folder, start, count, skip_other_sizes=False):
    """Samples ``start``..``start+count`` of a triplet dataset → (source IMAGE, MASK, target IMAGE, records).

    A batch needs one size: samples of another size than the first are an error, or are left out with
    ``skip_other_sizes`` (a dataset mined from videos of several sizes)."""
    dataset = TripletDataset(folder)
    if len(dataset) == 0:
        raise ValueError(f"the triplet dataset {folder} has no samples to preview")
    if start >= len(dataset):
        raise ValueError(f"start {start} is past the last sample: {folder} holds {len(dataset)} samples")
    items = [dataset[i] for i in range(start, min(len(dataset), start + max(1, count)))]
    sizes = {item["source"].shape[:2] for item in items}
    if len(sizes) > 1:
        if not skip_other_sizes:
            raise ValueError(
                f"samples {start}..{start + len(items) - 1} of {folder} have different sizes {sorted(sizes)}: "
                "preview them with count 1")
        items = [i for i in items if i["source"].shape == items[0]["source"].shape]
    mask = torch.from_numpy(np.stack([i["mask"] for i in items])).float()
    return (to_image([i["source"] for i in items]), mask, to_image([i["target"] for i in items]),
            [i["record"] for i in items])
