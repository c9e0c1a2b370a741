"""Merge the OmniEraser LoRA into FLUX's weights once, and save the merged FLUX as one safetensors file.

Why: ComfyUI applies LoRA patches to the weights when it loads a model, but a weight it leaves offloaded (partial
loading, the rule on 8-12 GB cards) carries its patches as a ``LowVramPatch`` that recomputes the patched weight on
every forward: the LoRA product, the add, and for float8 weights a stochastic rounding of the whole weight
(``comfy/model_patcher.py`` ``LowVramPatch``, ``comfy/lora.py`` ``calculate_weight``). OmniEraser's rank-32 LoRA
touches every linear of every block, so on a small card each step pays for it on most of the model. A merged
model has no patches: it costs what plain FLUX costs. Its img_in is 256 wide (the widening), so it still needs
OmniEraser's 48-channel condition layout, which the pack's 'OmniEraser Merged Model' node installs.

The merge streams: the file's header is known from the shapes and dtypes (``omnieraser.storage_plan``), then each
weight is merged on the CPU and written before the next, so the merge needs one weight's memory on top of the
model's. The file is written to a temporary name and renamed, so an interrupted merge leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from ..jobs import Host
from . import omnieraser as core

# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format").
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
STORAGE_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "fp32": torch.float32}


def safetensors_header(plan, metadata=None):
    """The header bytes (length prefix included) of a safetensors file holding ``plan`` ``{key: (shape, dtype)}``
    in order."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key, (shape, dtype) in plan.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: safetensors cannot store {dtype}")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_streamed(path, plan, tensors, metadata=None, host=None):
    """Write ``tensors`` (``(key, tensor)`` pairs in ``plan``'s order) to ``path`` as safetensors, one tensor in
    memory at a time, through a temporary file renamed at the end. Each tensor must match its planned shape/dtype."""
    host = host or Host()
    partial = f"{path}.partial"
    done = 0
    try:
        with open(partial, "wb") as f:
            f.write(safetensors_header(plan, metadata))
            for (key, tensor), (planned_key, (shape, dtype)) in zip(tensors, plan.items()):
                if key != planned_key or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise RuntimeError(f"{key} {tuple(tensor.shape)} {tensor.dtype} does not match the planned "
                                       f"{planned_key} {tuple(shape)} {dtype}")
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                done += 1
                host.progress(done, len(plan), "weights")
                host.check_interrupt()
        if done != len(plan):
            raise RuntimeError(f"only {done} of {len(plan)} tensors were given")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def save_merged_flux(weights, mapping, path, strength=1.0, dtype=None, metadata=None, host=None):
    """The job: ComfyUI-named FLUX ``weights`` (a mapping, read one weight at a time) with the ``LoraMapping``
    merged at ``strength``, stored in ``dtype`` (``STORAGE_DTYPES`` value, None: each weight's own) at ``path``."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; delete it or choose another file name")
    facts = {key: (tuple(weight.shape), weight.dtype) for key, weight in weights.items()}  # one pass over the weights
    shapes, dtypes = {k: f[0] for k, f in facts.items()}, {k: f[1] for k, f in facts.items()}
    plan = core.storage_plan(shapes, dtypes, mapping, dtype)
    merged = core.merged_weights(weights, mapping, strength, dtype)
    return write_safetensors_streamed(path, plan, merged, metadata, host)
