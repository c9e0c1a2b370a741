"""Which nodes of a workflow take the photo and the mask, and which keep the result; rebinding them per item.

A workflow written for one photo becomes a folder job by changing three kinds of inputs on a copy of its API
prompt, item after item:
- the photo: the ``LoadImage`` node whose IMAGE feeds the graph;
- the mask: a ``LoadImageMask`` node, or a ``LoadImage`` whose IMAGE only feeds ``ImageToMask`` (the
  mask-from-image pattern of some example workflows), or the photo loader's own MASK output (a mask painted into
  the photo's alpha in ComfyUI's mask editor);
- the results: every ``SaveImage`` node gets a filename prefix of its own per item.

Plain data (API prompts are dicts); nothing here imports ComfyUI.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from ..jobs import UsageError

LOAD_IMAGE, LOAD_MASK, IMAGE_TO_MASK, SAVE_IMAGE = "LoadImage", "LoadImageMask", "ImageToMask", "SaveImage"
MASK_FILE, MASK_VIA_IMAGE, MASK_IN_ALPHA = "LoadImageMask", "LoadImage → ImageToMask", "the photo's alpha"


@dataclass(frozen=True)
class Binding:
    """The nodes rebound per item (API prompt node ids)."""

    image_node: str
    mask_node: str | None  # None: the workflow makes its own mask
    mask_kind: str | None  # MASK_FILE, MASK_VIA_IMAGE or MASK_IN_ALPHA
    save_nodes: tuple  # SaveImage ids in numeric order; the first one's first image is the item's result


def _consumers(prompt):
    """``{(node_id, slot): [consumer class types]}`` over every link of the prompt."""
    found = {}
    for entry in prompt.values():
        for value in entry["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                found.setdefault((str(value[0]), value[1]), []).append(entry["class_type"])
    return found


def _name(prompt, node_id):
    entry = prompt[node_id]
    title = entry.get("_meta", {}).get("title")
    return f"{node_id} ({title or entry['class_type']})"


def _sort_ids(ids):
    return sorted(ids, key=lambda i: (len(i), i))


def find_binding(prompt, needs_mask, image_node=None, mask_node=None):
    """The photo, mask and save nodes of an API prompt, or a ``UsageError`` saying what is missing or ambiguous.

    ``needs_mask``: masks come from files (``--masks`` or ``--prompt``), so the workflow must load one.
    ``image_node`` / ``mask_node``: node ids that settle a choice among several candidates."""
    links = _consumers(prompt)
    photos, masks = [], []
    for node_id in _sort_ids(prompt):
        kind = prompt[node_id]["class_type"]
        if kind == LOAD_MASK:
            masks.append((node_id, MASK_FILE))
        elif kind == LOAD_IMAGE:
            image_uses = links.get((node_id, 0), [])
            if image_uses and all(use == IMAGE_TO_MASK for use in image_uses):
                masks.append((node_id, MASK_VIA_IMAGE))
            elif image_uses:
                photos.append(node_id)
                if links.get((node_id, 1)):
                    masks.append((node_id, MASK_IN_ALPHA))
    saves = tuple(i for i in _sort_ids(prompt) if prompt[i]["class_type"] == SAVE_IMAGE)

    for chosen, flag in ((image_node, "--image-node"), (mask_node, "--mask-node")):
        if chosen is not None and str(chosen) not in prompt:
            raise UsageError(f"{flag} {chosen}: the workflow has no node with that id")
    if image_node is not None:
        if str(image_node) not in photos:
            raise UsageError(f"--image-node {image_node}: node {_name(prompt, str(image_node))} is not a LoadImage "
                             "whose image feeds the graph")
        photos = [str(image_node)]
    if not photos:
        raise UsageError("the workflow has no LoadImage node whose image feeds the graph: erasekit-run puts each "
                         "photo into that node (add one where the photo enters)")
    if len(photos) > 1:
        raise UsageError(f"the workflow has {len(photos)} LoadImage nodes whose images feed the graph "
                         f"({', '.join(_name(prompt, p) for p in photos)}): say which one takes the photos with "
                         "--image-node ID")
    photo = photos[0]
    masks = [(i, k) for i, k in masks if k != MASK_IN_ALPHA or i == photo]
    if mask_node is not None:
        masks = [(i, k) for i, k in masks if i == str(mask_node)]
        if not masks:
            raise UsageError(f"--mask-node {mask_node}: node {_name(prompt, str(mask_node))} loads no mask "
                             "(a LoadImageMask, a LoadImage feeding ImageToMask, or the photo loader's MASK)")
    if not saves:
        raise UsageError("the workflow has no SaveImage node: erasekit-run keeps what SaveImage nodes receive "
                         "(PreviewImage results are not kept); end the graph with a SaveImage")
    if not needs_mask:
        if masks:
            raise UsageError(f"the workflow loads a mask (node {_name(prompt, masks[0][0])}) but no --masks folder "
                             "or --prompt was given: pass one, or give an image folder with masks (a triplet "
                             "dataset or images/ + masks/)")
        return Binding(photo, None, None, saves)
    if not masks:
        raise UsageError("the workflow loads no mask: erasekit-run puts each mask into a LoadImageMask node, a "
                         "LoadImage feeding ImageToMask, or the MASK output of the photo's LoadImage; add one "
                         "where the mask enters")
    if len(masks) > 1:
        raise UsageError(f"the workflow has {len(masks)} mask inputs "
                         f"({', '.join(f'{_name(prompt, i)}: {k}' for i, k in masks)}): say which one takes the "
                         "masks with --mask-node ID")
    return Binding(photo, masks[0][0], masks[0][1], saves)


def bind(prompt, binding, image_name, mask_name, prefix):
    """A copy of ``prompt`` with this item's photo and mask (names as LoadImage reads them) and save prefixes."""
    item = copy.deepcopy(prompt)
    item[binding.image_node]["inputs"]["image"] = image_name
    if binding.mask_kind in (MASK_FILE, MASK_VIA_IMAGE):
        item[binding.mask_node]["inputs"]["image"] = mask_name
    for node_id in binding.save_nodes:
        item[node_id]["inputs"]["filename_prefix"] = f"{prefix}/{node_id}"
    return item
