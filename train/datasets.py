"""Training samples over the triplet format: paired random crops and mask augmentation.

``open_triplets`` reads a dataset in either format: a triplet folder, or WebDataset shards (a shard folder, a
``.tar``, a pattern such as ``shards/shard-{000000..000099}.tar``; local or an fsspec URL). Both readers order
samples by id, so sample ``i`` and its crops are the same in both.

``PairedCropDataset`` wraps any indexable of triplets (``dataset_tools.triplets.TripletDataset`` or a list
of dicts with uint8 ``source``/``target`` H×W×3 and a ``mask`` H×W: bool, uint8 0/255 or 0/1, or float in [0, 1]) and yields crops at the
training size in ComfyUI's layout, so model-specific step functions and the nodes share one format:

- ``source``, ``target``: float32 ``[S, S, 3]`` in [0, 1]; ``mask``: float32 ``[S, S]`` in {0, 1}, 1 = remove.

Items are addressed by a key ``(index, draw)``. The crop and the mask augmentation come from a generator
seeded with ``(seed, index, draw)``, so a sample depends only on its key: the same on every worker, every
process and after a resume. With ``variants=K`` the draw is taken modulo K, giving each sample K fixed
versions; that is what makes VAE latents cacheable (``train.caching``).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from ..dataset_tools import shards
from ..erasers.layout import binarize
from ..jobs import fingerprint

# the reader of a dataset in either format (a triplet folder or WebDataset shards)
open_triplets = shards.open_triplets

# OmniEraser's PairedRandomCrop upsamples an image smaller than the crop by this margin over the exact fit.
UPSCALE_MARGIN = 1.1


def _as_mask(mask, where):
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] in (1, 3):
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{where}: mask must be H×W, got shape {mask.shape}")
    return binarize(mask)


def check_triplet(sample, where="sample"):
    """Source/target uint8 H×W×3 of one size and a mask of the same H×W, else ValueError naming both sizes."""
    source, target = np.asarray(sample["source"]), np.asarray(sample["target"])
    for name, image in (("source", source), ("target", target)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{where}: {name} must be a uint8 H×W×3 image, got {image.dtype} {image.shape}")
    if source.shape != target.shape:
        raise ValueError(
            f"{where}: source is {source.shape[1]}×{source.shape[0]} but target is "
            f"{target.shape[1]}×{target.shape[0]}; a training pair must have one size"
        )
    mask = _as_mask(sample["mask"], where)
    if mask.shape != source.shape[:2]:
        raise ValueError(
            f"{where}: mask is {mask.shape[1]}×{mask.shape[0]} but source is {source.shape[1]}×{source.shape[0]}"
        )
    return source, mask, target


def sample_rng(seed, index, draw):
    """The generator behind one sample's crop and augmentation."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(draw)])


def _resize(source, mask, target, width, height):
    interp = cv2.INTER_AREA if width < source.shape[1] else cv2.INTER_LINEAR
    source = cv2.resize(source, (width, height), interpolation=interp)
    target = cv2.resize(target, (width, height), interpolation=interp)
    mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return source, mask, target


def paired_random_crop(source, mask, target, size, rng, resize_short_side=None):
    """One random ``size``×``size`` window cut at the same place from all three images.

    OmniEraser's rule: an image smaller than the crop is first upscaled to 1.1× the exact fit. With
    ``resize_short_side`` the short side is first scaled to that length (keeps whole objects in a small crop).
    """
    height, width = source.shape[:2]
    if resize_short_side:
        scale = resize_short_side / min(height, width)
        source, mask, target = _resize(source, mask, target, max(1, round(width * scale)), max(1, round(height * scale)))
        height, width = source.shape[:2]
    if width < size or height < size:
        scale = max(size / width, size / height) * UPSCALE_MARGIN
        source, mask, target = _resize(source, mask, target, int(width * scale), int(height * scale))
        height, width = source.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return source[window], mask[window], target[window]


def smarteraser_mask_augmenter(mask, rng):
    """SmartEraser's mask irregularisation (``erasers.masks.irregularize``, random choice)."""
    from ..erasers.masks import irregularize

    return irregularize(mask, "random", rng)[0]


class PairedCropDataset(torch.utils.data.Dataset):
    """Paired random crops of triplets at ``size`` px; see the module docstring for keys and layout.

    ``augment_mask``: ``None`` or ``callable(bool mask H×W, np.random.Generator) → bool mask``, applied to
    the full-size mask before cropping (SmartEraser's area ratios refer to the whole image);
    ``smarteraser_mask_augmenter`` is the mask core's irregularisation.
    """

    def __init__(self, triplets: Sequence, size: int, seed: int = 0, augment_mask: Callable | None = None,
                 resize_short_side: int | None = None, variants: int | None = None):
        if len(triplets) == 0:
            raise ValueError("the training dataset is empty: it holds no (source, mask, target) samples")
        if size < 16 or size % 16:
            raise ValueError(f"training size must be a positive multiple of 16 px, got {size}")
        if variants is not None and variants < 1:
            raise ValueError(f"variants must be >= 1 or None, got {variants}")
        self.triplets = triplets
        self.size = int(size)
        self.seed = int(seed)
        self.augment_mask = augment_mask
        self.resize_short_side = resize_short_side
        self.variants = variants

    def __len__(self):
        return len(self.triplets)

    def rank_items(self, rank, world):
        """The indices process ``rank`` of ``world`` trains on (``rank_items``); None: all, by position."""
        return rank_items(self.triplets, rank, world)

    def key(self, index, draw):
        """The canonical key of ``(index, draw)``: identical keys give identical samples."""
        return int(index), int(draw) % self.variants if self.variants else int(draw)

    def validate(self, progress=None):
        """Read every triplet once and check sizes; raises ValueError on the first bad one."""
        for index in range(len(self.triplets)):
            check_triplet(self.triplets[index], self._where(index))
            if progress is not None:
                progress(index + 1, len(self.triplets))
        return len(self.triplets)

    def _where(self, index):
        record = getattr(self.triplets, "records", None)
        if record is not None:
            return f"sample {record[index].get('id', index)!r} of {getattr(self.triplets, 'root', 'the dataset')}"
        return f"sample {index}"

    def __getitem__(self, key):
        index, draw = key if isinstance(key, tuple) else (key, 0)
        index, draw = self.key(index, draw)
        source, mask, target = check_triplet(self.triplets[index], self._where(index))
        rng = sample_rng(self.seed, index, draw)
        if self.augment_mask is not None:
            mask = np.asarray(self.augment_mask(mask, rng), bool)
        source, mask, target = paired_random_crop(source, mask, target, self.size, rng, self.resize_short_side)
        return {
            "source": torch.from_numpy(np.ascontiguousarray(source)).float().div_(255.0),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float(),
            "target": torch.from_numpy(np.ascontiguousarray(target)).float().div_(255.0),
            "index": index,
            "key": f"{index}:{draw}",
        }


def _shards_of(triplets):
    """For each sample of ``triplets`` (a shard reader, or a ``Subset``/``ConcatDataset`` of them) the shard file
    that holds it; None when some sample comes from a folder."""
    if isinstance(triplets, torch.utils.data.Subset):
        inner = _shards_of(triplets.dataset)
        return None if inner is None else [inner[i] for i in triplets.indices]
    if isinstance(triplets, torch.utils.data.ConcatDataset):
        parts = [_shards_of(part) for part in triplets.datasets]
        return None if any(p is None for p in parts) else [shard for part in parts for shard in part]
    shards = getattr(triplets, "shards", None)
    if shards is None or not hasattr(triplets, "shard_of"):
        return None
    return [shards[position] for position in triplets.shard_of]


def rank_items(triplets, rank, world):
    """The sample indices process ``rank`` of ``world`` trains on when the samples come from WebDataset shards:
    those of its own shards (the k-th shard, by name, goes to process k % world), so each process reads only its
    own shards and no two draw the same sample. None for one process or a folder dataset (every process then
    takes its own positions of one shared order)."""
    if world <= 1:
        return None
    shards = _shards_of(triplets)
    if shards is None:
        return None
    order = {shard: k for k, shard in enumerate(sorted(set(shards)))}
    if len(order) < world:
        raise ValueError(f"the dataset has {len(order)} shards for {world} training processes: each process reads "
                         "its own shards, so write at least one shard per process (a smaller --shard-size, or "
                         "erasekit-dataset convert --shard-size)")
    return [index for index, shard in enumerate(shards) if order[shard] % world == rank]


def collate(samples):
    """Stack samples into a batch: IMAGE-layout tensors plus lists of indices and cache keys."""
    return {
        "source": torch.stack([s["source"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "index": [s["index"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def dataset_fingerprint(spec):
    """``jobs.fingerprint`` of a dataset folder (either format: every file's relative name, size and modification
    time, so an added, removed or rewritten pair counts), or the shard files' sizes and times of a shard pattern or
    URL: a node training on it runs again when it changes and reuses its result while nothing changed."""
    if os.path.isdir(os.fspath(spec)):
        return fingerprint(spec)
    return shards.dataset_fingerprint(spec)
