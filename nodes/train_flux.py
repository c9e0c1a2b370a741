"""Train OmniEraser LoRAs on ComfyUI's own FLUX (UNETLoader MODEL + VAE) from a triplet dataset folder.

The trainer is the core's (``train.eraser_lora.train_eraser``, the one ``erasekit-train flux`` runs); this module
supplies ``ComfyFlux``, its adapter for ComfyUI's FLUX as the user loaded it: the official diffusers-named LoRA
targets located on ComfyUI's fused weights (q/k/v as row slices of ``qkv`` / ``linear1``, ``img_in`` read 256 wide),
the velocity through ComfyUI's model, the VAE posterior through ComfyUI's VAE, and the memory plan through
ComfyUI's loader (fp8 storage with its manual-cast ops, partial loading). The trained LoRA is in the official file
layout and is applied to the output MODEL by EraseKit's OmniEraser loader.
"""
import copy
import logging
import os

import torch
import torch.nn.functional as F

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..erasers import omnieraser as oe
from ..erasers.attention import plain_attention, split_heads
from ..train import curves, loop, memory
from ..train.datasets import dataset_fingerprint
from ..train.eraser_lora import (CAPTION, LEARNING_RATE, PACKED_INPUT, EraserJob, FluxAdapter, MemoryFacts,
                                 linear_facts, official_lora_targets, save_lora, train_eraser)
from ..train.lora import LoraTarget
from . import _host, _paths
from ._host import ComfyHost
from .omnieraser import _original_shapes, apply_omnieraser_lora

log = logging.getLogger(__name__)

CATEGORY = "erasekit/train"
TRAINING_DTYPES = {"auto": "auto", "bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # + "model": the MODEL's own


# ------------------------------------------------------------------------------------------------ adapter

def flux_shapes(model):
    """ComfyUI FLUX weight shapes, or a clear error for any other MODEL."""
    if not isinstance(model.model, comfy.model_base.Flux):
        raise ValueError(f"OmniEraser trains on a FLUX.1-dev MODEL (UNETLoader); this MODEL is {type(model.model).__name__}.")
    shapes = _original_shapes(model)
    width = shapes["img_in.weight"][1]
    if width != 64:
        raise ValueError(f"This FLUX's img_in takes {width} input features; OmniEraser starts from plain FLUX.1-dev "
                         "(64), not Fill/Kontext or an already widened model.")
    return shapes


def text_inputs(positive):
    """(context [1,T,4096], pooled [1,768]) cloned out of a CONDITIONING, or a clear error."""
    if not positive or len(positive[0]) < 2 or "pooled_output" not in positive[0][1]:
        raise ValueError("positive must be a FLUX conditioning (CLIPTextEncode with a DualCLIPLoader of type flux) "
                         f"holding a pooled output; encode {CAPTION!r}.")
    context, extra = positive[0]
    return context[:1].clone(), extra["pooled_output"][:1].clone()


def sdpa_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                   skip_output_reshape=False, **kwargs):
    """``optimized_attention_override`` for training steps: torch SDPA under the loop's back-end guard. ComfyUI's own
    SDPA wrapper (comfy/ops.py) puts cuDNN attention first, whose backward fails on Hopper (see loop.training_attention);
    attention back-ends without a backward (sage, ...) cannot train either."""
    qh, kh, vh = (q, k, v) if skip_reshape else (split_heads(t, heads) for t in (q, k, v))
    if mask is not None and mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if skip_output_reshape:
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return plain_attention(qh, kh, vh, mask)


def clone_inference_tensors(module):
    """Replace parameters/buffers made under inference mode by normal copies (autograd cannot save them)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_inference():
                sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_inference():
                sub._buffers[name] = buffer.clone()


def protect_norm_inputs(module):
    """ComfyUI's FLUX blocks update their residual streams in place (``x += …``) after a LayerNorm saved them
    for backward; a pre-hook hands every LayerNorm a copy so autograd keeps the value it saved. Returns the
    hook handles (remove them after training: the model is shared with other nodes)."""
    def copy_input(_module, args):
        return (args[0].clone(),) + tuple(args[1:])

    return [m.register_forward_pre_hook(copy_input) for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]


def stored_copy(model, dtype, compute_dtype):
    """A second MODEL with the same weights stored in ``dtype`` (e.g. fp8) and ComfyUI's manual-cast ops up-casting
    them per layer to ``compute_dtype``, as UNETLoader's weight_dtype does; the MODEL's patches (LoRAs) carry over.
    The user's MODEL is not touched."""
    config = copy.copy(model.model.model_config)
    config.unet_config = dict(config.unet_config)
    config.set_inference_dtype(dtype, compute_dtype)
    base = config.get_model({}, "", device=model.offload_device)
    base.load_model_weights(model.model_state_dict("diffusion_model."), "diffusion_model.")
    patched = comfy.model_patcher.ModelPatcher(base, load_device=model.load_device, offload_device=model.offload_device)
    patched.patches = {key: list(value) for key, value in model.patches.items()}
    patched.patches_uuid = model.patches_uuid
    return patched


class ComfyFlux(FluxAdapter):
    """ComfyUI's FLUX (``model_base.Flux``) + ComfyUI's VAE + a FLUX conditioning, for the one trainer."""

    encode_ahead = True  # the VAE runs before FLUX is loaded, never between steps

    def __init__(self, model, vae, positive, device=None):
        self.shapes = flux_shapes(model)
        self.model, self.vae = model, vae
        self.context, self.pooled = text_inputs(positive)
        self.device = torch.device(device or comfy.model_management.get_torch_device())
        self.module = model.model.diffusion_model
        self.compute_dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        self.cache_tag = f"comfy-flux-{id(model):x}"
        self.transformer_options = {"optimized_attention_override": sdpa_attention}
        self._patcher, self._hooks = None, []

    def lora_targets(self):
        depth, depth_single, hidden, mlp_ratio = oe.flux_geometry(self.shapes)
        table = oe.diffusers_to_comfy_targets(depth, depth_single, hidden, mlp_ratio)
        targets = {}
        for name in official_lora_targets(n for n, t in table.items() if t.key.endswith(".weight")):
            target = table[name]
            module = self.module.get_submodule(target.key[: -len(".weight")])
            out_rows, in_features = self.shapes[target.key]
            wide = name == "x_embedder"
            targets[name] = LoraTarget(module, PACKED_INPUT if wide else in_features, out_rows,
                                       (target.offset[1], target.offset[2]) if target.offset else None,
                                       in_features if wide else None)
        return targets

    def velocity(self, noisy, condition, sigmas, guidance):
        dtype, batch = self.compute_dtype, noisy.shape[0]
        out = self.module(torch.cat([noisy, condition.to(noisy.dtype)], 1).to(dtype), sigmas.to(dtype),
                          context=self.context.to(noisy.device, dtype).expand(batch, -1, -1),
                          y=self.pooled.to(noisy.device, dtype).expand(batch, -1),
                          guidance=torch.full((batch,), guidance, device=noisy.device, dtype=dtype),
                          transformer_options=dict(self.transformer_options))
        return out.float()

    def vae_moments(self, images):
        """ComfyUI's ``VAE.encode`` with the posterior's parameters read where its regulariser takes them."""
        first_stage = self.vae.first_stage_model
        regulariser = getattr(first_stage, "regularization", None)
        if regulariser is None:
            raise ValueError(f"This VAE ({type(first_stage).__name__}) has no Gaussian posterior to sample; "
                             "OmniEraser trains with the FLUX VAE (ae.safetensors).")
        seen = []
        handle = regulariser.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        try:
            self.vae.encode(images)
        finally:
            handle.remove()
        if sum(p.shape[0] for p in seen) != images.shape[0]:
            raise ValueError("ComfyUI encoded these training crops in tiles (too little memory for the VAE); lower "
                             "the resolution or free memory.")
        mean, logvar = torch.cat(seen).float().to(self.device).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # ComfyUI's DiagonalGaussianDistribution

    def memory_facts(self):
        linears, other, order = linear_facts(self.module, ("single_blocks", "double_blocks"))
        return MemoryFacts(linears, other, self.module.hidden_size, len(self.module.double_blocks),
                           len(self.module.single_blocks), self.context.shape[1], order)

    def apply_plan(self, plan, compute_dtype, offload=(), estimate=None):
        """Store the weights as the plan says (a copy when it asks for a narrower dtype than loaded) and load them
        with ComfyUI's loader, which keeps in CPU memory whatever does not fit next to the run's own memory."""
        comfy.model_management.unload_all_models()
        stored = memory.STORAGE_DTYPES.get(plan.base)
        loaded = self.model.model.get_dtype()
        base = self.model
        if stored is not None and torch.finfo(stored).bits < torch.finfo(loaded).bits:
            base = stored_copy(self.model, stored, compute_dtype)
        patcher = base.clone()
        patcher.set_model_compute_dtype(compute_dtype)  # every layer up-casts its weights to the compute dtype
        reserve = (estimate.total - estimate.weights) if estimate is not None else 0
        comfy.model_management.load_models_gpu([patcher], memory_required=reserve,
                                               force_full_load=plan.budget_gib is None)
        self._patcher, self.compute_dtype = patcher, compute_dtype
        self.module = patcher.model.diffusion_model
        clone_inference_tensors(self.module)
        self.module.requires_grad_(False)
        self._hooks = protect_norm_inputs(self.module)

    def close(self):
        loop.set_gradient_checkpointing(self.module, False)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def memory_check(device):
    """Refuse a run whose estimate exceeds what is free on ``device`` (the weights ComfyUI can offload aside)."""
    def check(estimate, plan):
        free = comfy.model_management.get_free_memory(device)
        needed = estimate.total - (estimate.weights if plan.budget_gib is not None else 0)
        if needed > free:
            raise ValueError(f"Training this FLUX with memory plan {plan.name} at this resolution needs "
                             f"{estimate.describe()} on {device}; {free / memory.GIB:.1f} GiB is free. Choose the "
                             "16gb plan, lower the resolution, or free memory.")
    return check


def train_omnieraser(model, vae, positive, dataset, job: EraserJob, interrupt_prefix="omnieraser_trained"):
    """Train on ComfyUI's FLUX; returns (MODEL with the LoRA, LoRA state dict, loss history, held-out loss)."""
    adapter = ComfyFlux(model, vae, positive)
    loras = folder_paths.get_folder_paths("loras")[0]

    def save_partial(step, state):
        path = os.path.join(loras, f"{interrupt_prefix}_interrupted_step{step}.safetensors")
        save_lora(path, state, job.rank, extra={"erasekit_steps": str(step)})
        log.warning("training interrupted: partial LoRA saved to %s", path)

    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes under inference mode
        result = train_eraser(job, adapter, ComfyHost(), folders=[_paths.dataset_source(dataset)],
                              partial_lora=save_partial, check_memory=memory_check(adapter.device))
    trained, _ = apply_omnieraser_lora(model, result.lora_state, 1.0)
    return trained, result.lora_state, result.history, result.heldout_loss


def mixed_precision_of(training_dtype, model):
    """The loop's mixed precision for the node's ``training_dtype`` ("model": the MODEL's own compute dtype)."""
    if training_dtype == "model":
        dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    return TRAINING_DTYPES[training_dtype]


# ------------------------------------------------------------------------------------------------ nodes

class TrainOmniEraserLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitTrainOmniEraserLora",
            display_name="Train OmniEraser LoRA (FLUX)",
            category=CATEGORY,
            description=(
                "Trains an OmniEraser control LoRA (PRIS-CV/Omnieraser) on your own removal pairs, with the same "
                "trainer as erasekit-train flux: FLUX.1-dev reading 256 packed input features, LoRA on the official "
                "modules, flow matching with target noise − latents on paired random crops, latents drawn from the "
                "VAE posterior. Outputs the FLUX with the new LoRA (use it with 'OmniEraser Conditioning'), the LoRA "
                "in the official file layout, and the loss curve. Interrupting saves the partial LoRA to "
                "models/loras."),
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1-dev from UNETLoader (plain dev: img_in with 64 inputs), any "
                               "weight dtype."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors) that encodes the training pairs."),
                io.Conditioning.Input("positive", tooltip=f"CLIPTextEncode of the fixed caption {CAPTION!r} "
                                      "(DualCLIPLoader type flux); it is encoded once and reused every step."),
                io.String.Input("dataset", default="", tooltip="Triplet dataset folder (source/, mask/, target/, "
                                "manifest.jsonl) or WebDataset shards (a shard folder, or a pattern such as "
                                "shards/shard-{000000..000009}.tar, or an s3:// URL), absolute or inside ComfyUI's "
                                "output (or input) folder. The last sample is held out to measure the final loss. The "
                                "node runs again when the dataset's files change."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=LEARNING_RATE, min=1e-7, max=1.0, step=1e-6,
                               tooltip="Base learning rate (OmniEraser: 3e-5, multiplied by the accumulation "
                               "steps when scale_lr is on, as the official run did)."),
                io.Int.Input("rank", default=oe.LORA_RANK, min=1, max=256, tooltip="LoRA rank (official 32; alpha = rank)."),
                io.Int.Input("grad_accumulation", default=8, min=1, max=1024,
                             tooltip="Micro-batches per optimizer step (official: batch 1 × 8)."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=16,
                             tooltip="Paired random crop size in px (official 1024)."),
                io.Int.Input("resize_short_side", default=0, min=0, max=8192, step=16,
                             tooltip="Scale each pair's short side to this before cropping (0 = off: crops at "
                             "native resolution, the official behaviour)."),
                io.Boolean.Input("mask_augmentation", default=True,
                                 tooltip="Irregularise masks like SmartEraser (dilate, erode, hull, ellipse, blob) "
                                 "so the eraser tolerates loose user masks."),
                io.Int.Input("crop_variants", default=4, min=1, max=64,
                             tooltip="Fixed crop/mask variants per sample; their VAE posteriors are encoded once "
                             "before training (each step draws a fresh latent from them), so the VAE never runs "
                             "during a step."),
                io.Float.Input("guidance", default=oe.GUIDANCE, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX guidance embedded during training (official 3.5)."),
                io.Combo.Input("memory_plan", options=list(memory.PLAN_NAMES), default="auto",
                               tooltip="How training fits in GPU memory. auto: the fastest plan whose estimate fits "
                               f"this GPU. {memory.plans_help()}. ComfyUI keeps in CPU memory whatever weights do "
                               "not fit next to the run."),
                io.Combo.Input("training_dtype", options=["auto", "bf16", "fp16", "fp32", "model"], default="auto",
                               tooltip="Compute dtype of the forward pass (LoRA weights stay fp32). auto: bf16 where "
                               "the device runs it natively (CUDA GPUs with bf16, CPUs with AVX-512-BF16 or AMX), "
                               "fp32 elsewhere (emulated bf16 on a CPU is many times slower). fp16 uses a gradient "
                               "scaler. 'model' uses the MODEL's own compute dtype."),
                io.Boolean.Input("scale_lr", default=True, tooltip="Multiply the learning rate by the "
                                 "accumulation steps (diffusers' --scale_lr, used by OmniEraser)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of LoRA init, data order, crops, posterior draws, noise and timesteps."),
                io.String.Input("interrupt_prefix", default="omnieraser_trained",
                                tooltip="File name prefix of the partial LoRA written to models/loras when the "
                                "run is interrupted."),
            ],
            outputs=[
                io.Model.Output("trained_model", display_name="model",
                                tooltip="The FLUX with the trained OmniEraser LoRA (img_in widened); sample it with "
                                "'OmniEraser Conditioning'."),
                io.LoraModel.Output("lora", tooltip="The trained LoRA in the official OmniEraser layout; save it "
                                    "with 'Save Eraser LoRA'."),
                io.Image.Output("loss_curve", tooltip="Training loss per optimizer step (light) and its moving "
                                "average (dark)."),
                io.Float.Output("heldout_loss", tooltip="Final flow-matching loss on the held-out sample (fixed "
                                "posterior draws, noise and timesteps)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, dataset=None, **_):
        """Run again when the dataset folder's files change (ComfyUI would otherwise reuse the old LoRA)."""
        return _host.fingerprint(lambda: dataset_fingerprint(_paths.dataset_source(dataset)))

    @classmethod
    def execute(cls, model, vae, positive, dataset, steps, learning_rate, rank, grad_accumulation, resolution,
                resize_short_side, mask_augmentation, crop_variants, guidance, memory_plan, training_dtype,
                scale_lr, seed, interrupt_prefix) -> io.NodeOutput:
        job = EraserJob(steps=steps, rank=rank, learning_rate=learning_rate, scale_lr=scale_lr,
                        grad_accum=grad_accumulation, resolution=resolution,
                        resize_short_side=resize_short_side or None, mask_augmentation=mask_augmentation,
                        crop_variants=crop_variants, guidance=guidance, memory_plan=memory_plan,
                        mixed_precision=mixed_precision_of(training_dtype, model), seed=seed)
        trained, lora_state, history, held = train_omnieraser(model, vae, positive, dataset, job, interrupt_prefix)
        curve = torch.from_numpy(curves.loss_curve_array(history))[None]
        return io.NodeOutput(trained, lora_state, curve, held)


class SaveEraserLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSaveEraserLora",
            display_name="Save Eraser LoRA",
            category=CATEGORY,
            description="Writes a trained eraser LoRA to models/loras as safetensors (official OmniEraser layout, "
                        "with diffusers' adapter metadata).",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA from 'Train OmniEraser LoRA (FLUX)'."),
                io.String.Input("filename_prefix", default="erasekit/omnieraser",
                                tooltip="Path under models/loras, without extension; a counter is appended."),
            ],
            outputs=[io.String.Output("lora_name", tooltip="The file name as the LoRA loaders list it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix) -> io.NodeOutput:
        ranks = {v.shape[0] for k, v in lora.items() if ".lora_A." in k}
        if not lora or len(ranks) != 1:
            raise ValueError(f"This is not a trained eraser LoRA (lora_A ranks found: {sorted(ranks)}).")
        root = folder_paths.get_folder_paths("loras")[0]
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, root)
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        save_lora(path, lora, ranks.pop())
        return io.NodeOutput(os.path.relpath(path, root).replace(os.sep, "/"))


NODES = [TrainOmniEraserLora, SaveEraserLora]
