"""Convert the released SmartEraser diffusers folder into files ComfyUI's own loaders read.

The official release is a diffusers ``save_pretrained`` folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) plus ``clip_mlp_weight.pth``. This writes

* ``<name>.safetensors``: one SD1.5-inpainting checkpoint for ComfyUI's ``CheckpointLoaderSimple``
  (UNet in the original LDM layout under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and
  the fine-tuned text encoder under ``cond_stage_model.transformer.``; ComfyUI converts the diffusers-layout
  VAE and the transformers-layout text encoder itself when it loads them),
* ``<name>_projector.safetensors``: the IM2TEXT projector for EraseKit's projector loader.

Console script: ``erasekit-convert-smarteraser FOLDER OUT_DIR [--name smarteraser] [--half]``. Exit codes (shared by
every ``erasekit-*`` command): 0 written, 1 a weights file could not be read or written, 2 the folder is not a
SmartEraser release, 130 interrupted.
"""
import argparse
import json
import os
import re
import struct
import sys
import zipfile

import torch

from ..jobs import EXIT_OK, UsageError, check_output_folder, cli_main
from .smarteraser import read_projector_state_dict

WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
PROJECTOR_NAMES = ("clip_mlp_weight.pth", "clip_mlp_weight.safetensors")

RESNET_KEYS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LEVEL_KEYS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


# --------------------------------------------------------------------------------------------- files
def component_file(folder, component):
    """The weight file of ``component`` (unet, vae, text_encoder) in a diffusers folder, or a clear error."""
    sub = os.path.join(folder, component)
    path = _first_file(sub, WEIGHT_NAMES[component])
    if path:
        return path
    raise FileNotFoundError(
        f"{folder} is not a complete SmartEraser diffusers folder: no {component} weights "
        f"(looked for {', '.join(WEIGHT_NAMES[component])} in {sub})."
    )


def _first_file(folder, names):
    """The first of ``names`` that is a file in ``folder``, or None."""
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def projector_file(folder):
    path = _first_file(folder, PROJECTOR_NAMES)
    if path:
        return path
    raise FileNotFoundError(
        f"no SmartEraser projector in {folder}: expected {PROJECTOR_NAMES[0]} (released next to unet/ and vae/) "
        f"or {PROJECTOR_NAMES[1]}."
    )


class UnreadableWeights(OSError):
    """A weights file exists but cannot be read (truncated, damaged, or not a weights file)."""


def diagnose_weights(path):
    """Why a weights file that failed to load cannot be read, judged from its bytes: "is truncated: ..." (its
    header or its zip directory promises more bytes than the file has) or "is not a weights file: ..."."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if size == 0:
        return "is empty (0 bytes): the download or copy did not finish"
    if path.lower().endswith(".safetensors"):
        if size < 8:
            return f"is truncated: {size} bytes, shorter than a safetensors header"
        length = struct.unpack("<Q", head[:8])[0]
        if not head[8:9] == b"{" or length > 100 << 20:
            return f"is not a weights file: it does not start with a safetensors header (it starts with {head[:16]!r})"
        if 8 + length > size:
            return f"is truncated: its header alone needs {8 + length} bytes but the file has {size}"
        with open(path, "rb") as handle:
            handle.seek(8)
            try:
                header = json.loads(handle.read(length))
            except ValueError:
                return "is not a weights file: its safetensors header is not JSON"
        end = max((entry["data_offsets"][1] for key, entry in header.items()
                   if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
        if 8 + length + end > size:
            return f"is truncated: its tensors need {8 + length + end} bytes but the file has {size}"
        return "is damaged: its safetensors header and size agree but the tensors cannot be read"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError):
            return f"is truncated: the end of its zip archive is missing ({size} bytes)"
        return f"is damaged: {damaged} inside it fails its checksum" if damaged else "is damaged"
    if head[:1] == b"\x80":  # a legacy pickle (protocol 2+)
        return f"is truncated or damaged: its pickle ends early or breaks ({size} bytes)"
    return f"is not a weights file: it is neither safetensors nor a PyTorch file (it starts with {head[:16]!r})"


def read_weights(path):
    """A state dict from safetensors, or from a pickle loaded with weights_only=True; UnreadableWeights naming the
    file and saying whether it is truncated or not a weights file at all when it cannot be read."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UnreadableWeights(f"{path} {diagnose_weights(path)}; download it again "
                                f"(the loader said: {type(error).__name__}: {error})") from error
    return state_dict.get("state_dict", state_dict)


# --------------------------------------------------------------------------------------------- UNet keys
def _levels(keys, prefix):
    """{level: (resnet count, has attentions, has resampler)} for diffusers down_blocks/up_blocks."""
    found = {}
    pattern = re.compile(rf"^{prefix}\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
    for key in keys:
        match = pattern.match(key)
        if match:
            level, kind, index = int(match.group(1)), match.group(2), int(match.group(3))
            resnets, attentions, sampler = found.get(level, (0, False, False))
            if kind == "resnets":
                resnets = max(resnets, index + 1)
            elif kind == "attentions":
                attentions = True
            else:
                sampler = True
            found[level] = (resnets, attentions, sampler)
    return [found[i] for i in sorted(found)]


def unet_diffusers_to_ldm_keys(keys):
    """{diffusers key: LDM key} for an SD-style UNet2DConditionModel of any depth/width.

    LDM numbers blocks sequentially: input_blocks = conv_in, then per level its resnets (each with its
    attention as sub-module 1) and a downsampler; output_blocks = per up level its resnets (+attention) with
    the upsampler as the last sub-module of the level's last block.
    """
    keys = list(keys)
    mapping = {}

    def resnet(src, dst):
        for d, l in RESNET_KEYS.items():
            mapping.update({k: k.replace(f"{src}.{d}.", f"{dst}.{l}.") for k in keys if k.startswith(f"{src}.{d}.")})

    def whole(src, dst):
        mapping.update({k: dst + k[len(src):] for k in keys if k.startswith(src + ".")})

    block = 1
    for level, (resnets, _, sampler) in enumerate(_levels(keys, "down_blocks")):
        for i in range(resnets):
            resnet(f"down_blocks.{level}.resnets.{i}", f"input_blocks.{block}.0")
            whole(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{block}.1")
            block += 1
        if sampler:
            whole(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{block}.0.op")
            block += 1

    resnet("mid_block.resnets.0", "middle_block.0")
    whole("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")

    block = 0
    for level, (resnets, attentions, sampler) in enumerate(_levels(keys, "up_blocks")):
        for i in range(resnets):
            resnet(f"up_blocks.{level}.resnets.{i}", f"output_blocks.{block}.0")
            whole(f"up_blocks.{level}.attentions.{i}", f"output_blocks.{block}.1")
            if sampler and i == resnets - 1:
                whole(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{block}.{2 if attentions else 1}.conv")
            block += 1

    for src, dst in TOP_LEVEL_KEYS.items():
        whole(src, dst)
    unmapped = [k for k in keys if k not in mapping]
    if unmapped:
        raise ValueError(f"unexpected keys in the SmartEraser UNet (not an SD1.5-style UNet?): {unmapped[:5]}")
    return mapping


def check_inpaint_unet(unet_sd, source):
    """SmartEraser is a 9-channel SD1.5 inpainting UNet with a 768-wide context; say what was found otherwise."""
    conv_in = unet_sd.get("conv_in.weight", unet_sd.get("input_blocks.0.0.weight"))
    if conv_in is None:
        raise ValueError(f"{source} has no conv_in weight: it is not a diffusers UNet.")
    if conv_in.shape[1] != 9:
        raise ValueError(
            f"{source} is a {conv_in.shape[1]}-channel UNet; SmartEraser needs the 9-channel SD1.5-inpainting "
            "UNet ([noisy latent 4, mask 1, image latent 4]). A plain SD1.5 UNet cannot use masked-region guidance."
        )


# --------------------------------------------------------------------------------------------- convert
def convert(folder, out_dir, name="smarteraser", half=False):
    """Write ``<name>.safetensors`` (ComfyUI checkpoint) and ``<name>_projector.safetensors``; returns both paths."""
    from safetensors.torch import save_file

    unet_path = component_file(folder, "unet")
    unet = read_weights(unet_path)
    check_inpaint_unet(unet, unet_path)
    keys = unet_diffusers_to_ldm_keys(unet)
    checkpoint = {"model.diffusion_model." + keys[k]: v for k, v in unet.items()}
    checkpoint.update({"first_stage_model." + k: v for k, v in read_weights(component_file(folder, "vae")).items()})
    text = read_weights(component_file(folder, "text_encoder"))
    # transformers ≥ 5 saves CLIPTextModel without the "text_model." level that older releases have
    checkpoint.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                       for k, v in text.items() if not k.endswith("position_ids")})
    dtype = torch.float16 if half else None
    checkpoint = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                  for k, v in checkpoint.items()}
    projector = read_projector_state_dict(projector_file(folder))

    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, f"{name}.safetensors")
    projector_path = os.path.join(out_dir, f"{name}_projector.safetensors")
    for path, tensors in ((checkpoint_path, checkpoint), (projector_path, projector)):
        partial = path + ".partial"
        save_file(tensors, partial, metadata={"format": "pt", "source": "SmartEraser (longtaojiang/SmartEraser)"})
        os.replace(partial, path)
    return checkpoint_path, projector_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="erasekit-convert-smarteraser",
        description="Convert the official SmartEraser diffusers folder (+ clip_mlp_weight.pth) into a ComfyUI "
                    "checkpoint (models/checkpoints) and a projector file (models/smarteraser).")
    parser.add_argument("folder", help="the released folder with unet/, vae/, text_encoder/ and clip_mlp_weight.pth")
    parser.add_argument("out_dir", help="where to write <name>.safetensors and <name>_projector.safetensors")
    parser.add_argument("--name", default="smarteraser", help="file name stem (default: smarteraser)")
    parser.add_argument("--half", action="store_true", help="store the checkpoint in fp16 (half the size)")
    args = parser.parse_args(argv)
    return cli_main("erasekit-convert-smarteraser", lambda: run(args))


def run(args):
    if not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder} is not a folder: give the released SmartEraser folder (unet/, vae/, "
                         "text_encoder/, clip_mlp_weight.pth)")
    check_output_folder(args.out_dir, "output folder")
    try:
        checkpoint, projector = convert(args.folder, args.out_dir, args.name, args.half)
    except (FileNotFoundError, ValueError) as error:  # parts missing, or another model than SmartEraser's
        raise UsageError(str(error)) from None
    print(f"wrote {checkpoint}\n  → put it in ComfyUI/models/checkpoints and load it with Load Checkpoint")
    print(f"wrote {projector}\n  → put it in ComfyUI/models/smarteraser and load it with SmartEraser Projector Loader")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
