"""OmniEraser as a merged FLUX, for cards that cannot hold the whole model (8-12 GB).

'Save OmniEraser Merged FLUX' merges the LoRA into the weights once, on the CPU, and writes a FLUX file that core
UNETLoader reads (``erasers/omnieraser_merge.py`` says why: ComfyUI re-applies the LoRA to every offloaded weight at
every step). 'OmniEraser Merged Model' gives such a model (img_in 256 wide) OmniEraser's 48-channel condition
layout, which the LoRA loader installs for a patched model.
"""
import os

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..erasers import omnieraser as core
from ..erasers import omnieraser_merge as merge
from ._host import ComfyHost
from ._paths import model_file
from .omnieraser import (CATEGORY, LORA_URL, _checked_mapping, _original_shapes, _require_flux,
                         use_omnieraser_condition)

DTYPE_OPTIONS = ["fp8_e4m3fn", "bf16", "same as the model"]


def model_weights(model):
    """The MODEL's diffusion-model weights, ComfyUI-named without ``diffusion_model.``, as stored (unpatched), read
    lazily through ComfyUI's ``get_key_patches`` (which sees past any patch currently applied to shared weights)."""
    if getattr(model.model.model_config, "scaled_fp8", None) is not None:
        raise ValueError("This FLUX is a scaled-fp8 checkpoint (weights with scale factors); merge into the bf16 "
                         "FLUX.1-dev (flux1-dev.safetensors) or a plain fp8 one instead.")
    key_patches = model.get_key_patches("diffusion_model.")
    patched = sorted(k for k, v in key_patches.items() if len(v) > 1)
    if patched:
        raise ValueError(f"This MODEL already carries patches on {len(patched)} weights (another LoRA?): "
                         f"{', '.join(patched[:3])}. Merge into the MODEL straight from UNETLoader.")
    return {key[len("diffusion_model."):]: key_patches[key][0][0] for key in key_patches}


def merged_file_path(name):
    """``models/diffusion_models/<name>.safetensors``; the name may not leave that folder."""
    name = (name or "").strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"file name {name!r} must be a plain file name (no folders), e.g. flux1-dev-omnieraser-fp8")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], name)


def save_merged_omnieraser(model, lora, strength, dtype_name, path, lora_name="", host=None):
    """Map ``lora`` onto ``model`` as the loader does, merge it and write the merged FLUX to ``path``."""
    mapping = _checked_mapping(model, lora)
    if mapping.widened_in_features != core.WIDENED_IN_FEATURES:
        raise ValueError(f"{lora_name or 'This LoRA'} does not widen img_in to {core.WIDENED_IN_FEATURES} input "
                         "features, so it is not the OmniEraser LoRA (the ControlNet variant's LoRA is a plain FLUX "
                         "LoRA: use core LoraLoader for it).")
    metadata = {"format": "pt", "erasekit": "OmniEraser LoRA merged into FLUX (img_in 256 wide)",
                "lora": lora_name, "strength": strength}
    return merge.save_merged_flux(model_weights(model), mapping, path, strength,
                                  merge.STORAGE_DTYPES.get(dtype_name), metadata, host)


class SaveOmniEraserMerged(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSaveOmniEraserMerged",
            display_name="Save OmniEraser Merged FLUX",
            category=CATEGORY,
            description=(
                "For 8-12 GB cards: merges the OmniEraser LoRA into FLUX.1-dev once (on the CPU, one weight at a "
                "time) and saves the merged model into models/diffusion_models, where UNETLoader lists it. Load it "
                "with UNETLoader + 'OmniEraser Merged Model': no LoRA is re-applied at each step, so a partly "
                "offloaded model runs as fast as plain FLUX. Run it once; it refuses to overwrite a file."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1-dev straight from UNETLoader (bf16 or plain fp8; no other "
                               "LoRA applied)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The OmniEraser LoRA (theSure/Omnieraser's pytorch_lora_weights.safetensors)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength baked into the weights; 1.0 is what OmniEraser was trained for."),
                io.Combo.Input("weight_dtype", options=DTYPE_OPTIONS, default="fp8_e4m3fn",
                               tooltip="fp8_e4m3fn: 12 GB on disk and in memory, for small cards (rounded to nearest; "
                               "biases and norms stay bf16). bf16: 24 GB, full precision. Or keep the model's own."),
                io.String.Input("file_name", default="flux1-dev-omnieraser-fp8",
                                tooltip="Name of the new file in models/diffusion_models (.safetensors is added)."),
            ],
            outputs=[io.String.Output("file", tooltip="The saved file's name, as UNETLoader lists it.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, weight_dtype, file_name) -> io.NodeOutput:
        path = merged_file_path(file_name)
        lora = comfy.utils.load_torch_file(model_file("loras", lora_name, LORA_URL), safe_load=True)
        save_merged_omnieraser(model, lora, strength, weight_dtype, path, lora_name, ComfyHost())
        return io.NodeOutput(os.path.basename(path))


class OmniEraserMergedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitOmniEraserMergedModel",
            display_name="OmniEraser Merged Model (FLUX)",
            category=CATEGORY,
            description=(
                "Makes a merged OmniEraser FLUX (from 'Save OmniEraser Merged FLUX', loaded with UNETLoader) read "
                "OmniEraser's 48-channel condition, as the LoRA loader does for a patched model. Use it with "
                "'OmniEraser Conditioning'."),
            inputs=[io.Model.Input("model", tooltip="A merged OmniEraser FLUX from UNETLoader (img_in 256 wide).")],
            outputs=[io.Model.Output("omnieraser_model", display_name="model",
                                     tooltip="The FLUX with OmniEraser's condition layout.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(omnieraser_merged_model(model))


def omnieraser_merged_model(model):
    """A clone of a merged OmniEraser FLUX that reads the 48-channel condition; a clear error for any other MODEL."""
    _require_flux(model)
    width = _original_shapes(model)["img_in.weight"][1]
    if width != core.WIDENED_IN_FEATURES:
        raise ValueError(f"This FLUX's img_in takes {width} input features, not OmniEraser's "
                         f"{core.WIDENED_IN_FEATURES}: it is not a merged OmniEraser model. Load the LoRA with "
                         "'OmniEraser LoRA Loader', or save a merged model with 'Save OmniEraser Merged FLUX' first.")
    return use_omnieraser_condition(model.clone())


NODES = [SaveOmniEraserMerged, OmniEraserMergedModel]
