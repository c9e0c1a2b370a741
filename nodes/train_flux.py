"""Train OmniEraser LoRAs on ComfyUI's own FLUX (UNETLoader MODEL + VAE) from a triplet dataset folder.

The adapter is trained in the official parameterisation: one rank-r LoRA per diffusers module of the
official target list (separate q/k/v on ComfyUI's fused qkv/linear1 rows, x_embedder widened to 256
inputs), applied through weight wrappers on the patcher, so the result saves straight to the official file
layout and loads back through EraseKit's OmniEraser loader. The training loop, objective, data and curves
are the core's (``train/``); this module only adapts ComfyUI's model, VAE and conditioning.
"""
import logging
import os

import torch
import torch.nn.functional as F

import comfy.model_base
import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..erasers import omnieraser as oe
from ..train import curves, flow_matching, loop
from ..train.datasets import PairedCropDataset, collate, smarteraser_mask_augmenter
from ..train.flux import CAPTION, TARGET_MODULES, WIDEN_FACTOR, lora_metadata, official_lora_state, open_triplets, split_heldout
from ..train.lora import save_lora_file
from . import _paths
from .omnieraser import _original_shapes, apply_omnieraser_lora

log = logging.getLogger(__name__)

CATEGORY = "erasekit/train"
HELDOUT_REPEATS = 4
LATENT_PARTS = ("target", "background", "foreground")


# ------------------------------------------------------------------------------------------------ adapter

class LoraSlot(torch.nn.Module):
    """One diffusers-named LoRA pair (A: [r, in], kaiming-uniform like peft; B: [out, r], zero)."""

    def __init__(self, rank, in_features, out_features, generator):
        super().__init__()
        bound = 1.0 / in_features ** 0.5  # kaiming_uniform_(a=√5) on [r, in], peft's default init
        self.A = torch.nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        self.B = torch.nn.Parameter(torch.zeros(out_features, rank))


class FusedLoraWeight(torch.nn.Module):
    """Weight function for one ComfyUI weight: widen (zero columns) then add scale·B·A on each slot's rows."""

    def __init__(self, slots, scale, widen_to=None):
        super().__init__()
        self.slots = torch.nn.ModuleList(slot for _, slot in slots)
        self.rows = [rows for rows, _ in slots]
        self.scale = scale
        self.widen_to = widen_to

    def __call__(self, weight):
        if self.widen_to is not None and weight.shape[1] < self.widen_to:
            weight = F.pad(weight, (0, self.widen_to - weight.shape[1]))
        else:
            weight = weight.clone()
        for (start, size), slot in zip(self.rows, self.slots):
            delta = (slot.B.float() @ slot.A.float()) * self.scale
            weight[start:start + size] = weight[start:start + size] + delta.to(weight.dtype)
        return weight

    def move_to(self, device):
        self.to(device)
        return 0


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


def build_adapter(shapes, rank, alpha, seed):
    """{diffusers module: LoraSlot} on the official targets and {ComfyUI weight key: FusedLoraWeight}."""
    depth, depth_single, hidden, mlp_ratio = oe.flux_geometry(shapes)
    table = oe.diffusers_to_comfy_targets(depth, depth_single, hidden, mlp_ratio)
    generator = torch.Generator().manual_seed(seed)
    slots, by_weight = {}, {}
    for name in sorted(table):
        target = table[name]
        if not any(name == t or name.endswith("." + t) for t in TARGET_MODULES) or not target.key.endswith(".weight"):
            continue
        out_rows, in_features = shapes[target.key]
        if name == "x_embedder":
            in_features *= WIDEN_FACTOR
        start, size = (target.offset[1], target.offset[2]) if target.offset else (0, out_rows)
        slots[name] = LoraSlot(rank, in_features, size, generator)
        by_weight.setdefault(target.key, []).append(((start, size), slots[name]))
    wrappers = {key: FusedLoraWeight(parts, alpha / rank, 64 * WIDEN_FACTOR if key == "img_in.weight" else None)
                for key, parts in by_weight.items()}
    return slots, wrappers


def adapter_state(slots, rank, alpha, dtype=torch.bfloat16):
    """The official file tensors (``transformer.<module>.lora_A/B.weight``) of the trained slots."""
    raw = {}
    for name, slot in slots.items():
        raw[f"transformer.{name}.lora_A.weight"] = slot.A.detach()
        raw[f"transformer.{name}.lora_B.weight"] = slot.B.detach()
    return official_lora_state(raw, rank, alpha, dtype)


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


# ------------------------------------------------------------------------------------------------ objective

def encode_latents(vae, base_model, sample):
    """Normalised latents (target, background, foreground) of one dataset sample with ComfyUI's VAE."""
    background, foreground = oe.condition_images(sample["source"][None], sample["mask"][None])
    images = {"target": sample["target"][None], "background": background, "foreground": foreground}
    with torch.no_grad():  # VAE weights may require grad; cached latents must not carry a graph
        return {part: base_model.process_latent_in(vae.encode(images[part]).float()).detach().cpu() for part in images}


def text_inputs(positive):
    """(context [1,T,4096], pooled [1,768]) cloned out of a CONDITIONING, or a clear error."""
    if not positive or len(positive[0]) < 2 or "pooled_output" not in positive[0][1]:
        raise ValueError("positive must be a FLUX conditioning (CLIPTextEncode with a DualCLIPLoader of type flux) "
                         f"holding a pooled output; encode {CAPTION!r}.")
    context, extra = positive[0]
    return context[:1].clone(), extra["pooled_output"][:1].clone()


def comfy_eraser_loss(diffusion_model, latents, mask, text, generator, guidance, dtype):
    """The OmniEraser flow-matching loss through ComfyUI's FLUX (input: 16 noisy + 48 condition channels)."""
    device = generator.device
    target = latents["target"].to(device)
    condition = oe.condition_latent(latents["background"].to(device), latents["foreground"].to(device), mask.to(device))
    noise = torch.randn(target.shape, generator=generator, device=device)
    sigmas = flow_matching.sample_sigmas(target.shape[0], generator, device)
    noisy = flow_matching.noisy_latents(target, noise, sigmas)
    batch = target.shape[0]
    context, pooled = text
    out = diffusion_model(torch.cat([noisy, condition], 1).to(dtype), sigmas.to(dtype),
                          context=context.to(device, dtype).expand(batch, -1, -1),
                          y=pooled.to(device, dtype).expand(batch, -1),
                          guidance=torch.full((batch,), guidance, device=device, dtype=dtype))
    return flow_matching.flow_matching_loss(out, target, noise, sigmas)


def heldout_loss(diffusion_model, latents, mask, text, guidance, dtype, seed=0, repeats=HELDOUT_REPEATS):
    """Mean loss over fixed draws on the held-out sample; the same number for the trainer and any loader."""
    device = next(diffusion_model.parameters()).device
    values = []
    with torch.no_grad():
        for r in range(repeats):
            generator = torch.Generator(device).manual_seed(loop.derive_seed(seed, r, 99))
            values.append(float(comfy_eraser_loss(diffusion_model, latents, mask, text, generator, guidance, dtype)))
    return sum(values) / len(values)


def estimate_training_bytes(model, slots, size, tokens_text, checkpointing, batch=1):
    """Rough peak memory: weights + LoRA with grads and Adam state + activations of the FLUX blocks."""
    hidden = model.model.diffusion_model.hidden_size
    blocks = len(model.model.diffusion_model.double_blocks) + len(model.model.diffusion_model.single_blocks)
    tokens = (size // 16) ** 2 + tokens_text
    per_block = batch * tokens * hidden * 2 * (4 if checkpointing else 40)
    lora_bytes = sum(p.numel() for s in slots.values() for p in s.parameters()) * 4 * 4
    return model.model_size() + lora_bytes + per_block * blocks


def save_partial(slots, rank, alpha, prefix, step):
    folder = folder_paths.get_folder_paths("loras")[0]
    path = os.path.join(folder, f"{prefix}_interrupted_step{step}.safetensors")
    save_lora_file(path, adapter_state(slots, rank, alpha), lora_metadata(rank, extra={"erasekit_steps": str(step)}))
    return path


def train_omnieraser(model, vae, positive, dataset, steps, learning_rate, rank, alpha=None, grad_accum=8,
                     resolution=1024, resize_short_side=0, mask_augmentation=True, variants=4, guidance=oe.GUIDANCE,
                     gradient_checkpointing=True, training_dtype="bf16", scale_lr=True, seed=0,
                     interrupt_prefix="omnieraser_trained"):
    """Train and return (patched MODEL, LoRA state dict, loss history, held-out loss)."""
    alpha = float(rank if alpha is None else alpha)
    shapes = flux_shapes(model)
    triplets = open_triplets([_paths.dataset_folder(dataset)])
    train_part, held_part = split_heldout(triplets, 1)
    data = PairedCropDataset(train_part, resolution, seed=seed, variants=variants,
                             augment_mask=smarteraser_mask_augmenter if mask_augmentation else None,
                             resize_short_side=resize_short_side or None)
    held = PairedCropDataset(held_part, resolution, seed=seed + 1, resize_short_side=resize_short_side or None)
    data.validate()
    held.validate()
    with torch.inference_mode(False):
        text = text_inputs(positive)
        slots, wrappers = build_adapter(shapes, rank, alpha, seed)
        device = comfy.model_management.get_torch_device()
        needed = estimate_training_bytes(model, slots, resolution, text[0].shape[1], gradient_checkpointing)
        free = comfy.model_management.get_free_memory(device)
        if needed > free:
            raise ValueError(f"Training this FLUX at {resolution} px needs about {needed / 2**30:.1f} GiB on {device}; "
                             f"{free / 2**30:.1f} GiB is free. Lower the resolution, turn gradient checkpointing on, "
                             "or free memory.")
        # Latents first (ComfyUI's VAE, deterministic mean), so the VAE never evicts FLUX during training.
        keys = [(i, v) for i in range(len(data)) for v in range(variants)]
        bar = comfy.utils.ProgressBar(len(keys) + steps)
        cache = {}
        for n, key in enumerate(keys):
            comfy.model_management.throw_exception_if_processing_interrupted()
            sample = data[key]
            cache[sample["key"]] = encode_latents(vae, model.model, sample)
            bar.update_absolute(n + 1)
        held_sample = held[(0, 0)]
        held_latents = encode_latents(vae, model.model, held_sample)
        held_mask = held_sample["mask"][None]

        if training_dtype == "auto":
            training_dtype = "bf16" if loop.native_bf16(device) else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(training_dtype)
        if dtype is None:  # "model": the MODEL's own compute dtype
            dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        patcher = model.clone()
        patcher.set_model_compute_dtype(dtype)  # every layer casts its weights to the training dtype
        for key, wrapper in wrappers.items():
            patcher.add_weight_wrapper(f"diffusion_model.{key}", wrapper)
        comfy.model_management.load_models_gpu([patcher], memory_required=needed, force_full_load=True)
        diffusion_model = patcher.model.diffusion_model
        clone_inference_tensors(diffusion_model)
        diffusion_model.requires_grad_(False)  # only the adapter trains
        slots_on_device = {k: s.to(device) for k, s in slots.items()}
        params = {f"{name}.{p}": getattr(slot, p) for name, slot in slots_on_device.items() for p in ("A", "B")}

        def step(_model, batch, generator):
            latents = {part: torch.cat([cache[k][part] for k in batch["key"]]) for part in LATENT_PARTS}
            return comfy_eraser_loss(diffusion_model, latents, batch["mask"], text, generator, guidance, dtype)

        done = {"step": 0}

        def progress(step_number, total, loss):
            done["step"] = step_number
            bar.update_absolute(len(keys) + step_number)

        config = loop.LoopConfig(steps=steps, grad_accum=grad_accum, learning_rate=learning_rate, scale_lr=scale_lr,
                                 lr_scheduler="constant", mixed_precision="no", seed=seed,
                                 gradient_checkpointing=gradient_checkpointing)
        loop.set_gradient_checkpointing(diffusion_model, gradient_checkpointing)
        hooks = protect_norm_inputs(diffusion_model)
        try:
            result = loop.train(step, params, data, config, accelerator=loop.SingleProcess(device),
                                collate_fn=collate, progress=progress, device=device,
                                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        except comfy.model_management.InterruptProcessingException:
            if done["step"]:
                log.warning("training interrupted: partial LoRA saved to %s",
                            save_partial(slots, rank, alpha, interrupt_prefix, done["step"]))
            raise
        finally:
            loop.set_gradient_checkpointing(diffusion_model, False)
            for hook in hooks:
                hook.remove()
        for p in params.values():
            p.requires_grad_(False)
        final_heldout = heldout_loss(diffusion_model, held_latents, held_mask, text, guidance, dtype, seed)
        lora_state = adapter_state(slots, rank, alpha, torch.float32)
    trained, _ = apply_omnieraser_lora(model, lora_state, 1.0)
    return trained, lora_state, result.history, final_heldout


# ------------------------------------------------------------------------------------------------ nodes

class TrainOmniEraserLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitTrainOmniEraserLora",
            display_name="Train OmniEraser LoRA (FLUX)",
            category=CATEGORY,
            description=(
                "Trains an OmniEraser control LoRA (METHODS.md §3) on your own removal pairs: FLUX.1-dev with "
                "img_in widened to 256 inputs, LoRA on the official modules, flow matching with target noise − "
                "latents on paired random crops. Outputs the FLUX with the new LoRA (use it with 'OmniEraser "
                "Conditioning'), the LoRA in the official file layout, and the loss curve. Interrupting saves the "
                "partial LoRA to models/loras."),
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1-dev from UNETLoader (plain dev: img_in with 64 inputs)."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors) that encodes the training pairs."),
                io.Conditioning.Input("positive", tooltip=f"CLIPTextEncode of the fixed caption {CAPTION!r} "
                                      "(DualCLIPLoader type flux); it is encoded once and reused every step."),
                io.String.Input("dataset", default="", tooltip="Triplet dataset folder (source/, mask/, target/, "
                                "manifest.jsonl), absolute or inside ComfyUI's output (or input) folder. The last sample is "
                                "held out to measure the final loss."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=3e-5, min=1e-7, max=1.0, step=1e-6,
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
                             tooltip="Fixed crop/mask variants per sample; their latents are encoded once "
                             "before training so the VAE never runs during a step."),
                io.Float.Input("guidance", default=oe.GUIDANCE, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX guidance embedded during training (official 3.5)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute block activations in the backward pass: much less memory, "
                                 "about a third slower."),
                io.Combo.Input("training_dtype", options=["auto", "bf16", "fp32", "model"], default="auto",
                               tooltip="Compute dtype of the forward pass (LoRA weights stay fp32). auto: bf16 where "
                               "the device runs it natively (CUDA GPUs with bf16, CPUs with AVX-512-BF16 or AMX), "
                               "fp32 elsewhere (emulated bf16 on a CPU is many times slower). 'model' uses the "
                               "MODEL's own compute dtype."),
                io.Boolean.Input("scale_lr", default=True, tooltip="Multiply the learning rate by the "
                                 "accumulation steps (diffusers' --scale_lr, used by OmniEraser)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of LoRA init, data order, crops, noise and timesteps."),
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
                                "noise and timesteps)."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, dataset, steps, learning_rate, rank, grad_accumulation, resolution,
                resize_short_side, mask_augmentation, crop_variants, guidance, gradient_checkpointing,
                training_dtype, scale_lr, seed, interrupt_prefix) -> io.NodeOutput:
        trained, lora_state, history, held = train_omnieraser(
            model, vae, positive, dataset, steps, learning_rate, rank, rank, grad_accumulation, resolution,
            resize_short_side, mask_augmentation, crop_variants, guidance, gradient_checkpointing, training_dtype,
            scale_lr, seed, interrupt_prefix)
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
        save_lora_file(path, lora, lora_metadata(ranks.pop()))
        return io.NodeOutput(os.path.relpath(path, root).replace(os.sep, "/"))


NODES = [TrainOmniEraserLora, SaveEraserLora]
