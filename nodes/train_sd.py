"""Train an SD-inpainting eraser (SmartEraser RG + VG, epsilon or Erase Diffusion's CRO) from a node graph.

A thin adapter over ``train.sd_inpaint.train_sd_inpaint``, the same function ``erasekit-train sd-inpaint``
runs: the result is written as a SmartEraser release folder into models/smarteraser, where
"SmartEraser Loader" picks it up. Training needs the pack's train extras (diffusers, transformers; peft for LoRA);
without them the node says which package to install when it runs.
"""
import json
import os

import comfy.model_management
import comfy.sd1_clip
import folder_paths
import torch
from comfy_api.latest import io

from ..jobs import require
from ..train import curves, loop
from ..train import sd_inpaint as core
from ..train.datasets import dataset_fingerprint
from . import _host, _paths
from ._host import ComfyHost

CATEGORY = "erasekit/train"
SMARTERASER_FOLDER = _paths.register_folder("smarteraser")
RUNS_FOLDER = "erasekit_train"  # under ComfyUI's output folder: checkpoints/, loss_curve.png, logs/
# The SD1.5 CLIP tokenizer ComfyUI ships, for base folders without tokenizer/ (SmartEraser's release has one).
SD1_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(comfy.sd1_clip.__file__)), "sd1_tokenizer")


def base_model_folders():
    """Diffusers SD-inpainting folders (with unet/) in models/smarteraser and models/diffusers."""
    found = []
    for kind in (SMARTERASER_FOLDER, "diffusers"):
        for root in folder_paths.get_folder_paths(kind):
            if os.path.isdir(root):
                found += [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d, "unet"))]
    return sorted(set(found))


def base_model_path(name):
    for kind in (SMARTERASER_FOLDER, "diffusers"):
        for root in folder_paths.get_folder_paths(kind):
            path = os.path.join(root, name or "")
            if name and os.path.isdir(os.path.join(path, "unet")):
                return path
    where = folder_paths.get_folder_paths(SMARTERASER_FOLDER) + folder_paths.get_folder_paths("diffusers")
    raise FileNotFoundError(
        f"SD-inpainting folder {name!r} was not found in {', '.join(where)}: put a diffusers folder with unet/ "
        "(9 input channels), vae/ and text_encoder/ there (the SmartEraser release, or "
        "stable-diffusion-v1-5/stable-diffusion-inpainting)."
    )


def _output_name(name):
    name = (name or "").strip()
    if not name or os.sep in name or name.startswith(".") or (os.altsep and os.altsep in name):
        raise ValueError(f"output_name {name!r} must be a plain folder name (no path separators)")
    return name


class TrainSDInpaintEraser(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitTrainSDInpaintEraser",
            display_name="Train SD Inpainting Eraser (SmartEraser / CRO)",
            category=CATEGORY,
            description="Fine-tunes an SD-inpainting model on a triplet dataset the SmartEraser way: the UNet sees "
                        "the whole unmasked image (RG), a frozen CLIP vision model + trained projector turn the "
                        "masked object into a prompt token (VG), the condition is dropped 10 % of the time. The "
                        "objective is epsilon or Erase Diffusion's chain-rectifying objective (CRO). The result "
                        "is written to models/smarteraser/<output_name> for the SmartEraser Loader; checkpoints and "
                        "the loss curve to output/erasekit_train/<output_name>. Running again with resume on "
                        "continues from the newest checkpoint.",
            is_output_node=True,
            inputs=[
                io.Combo.Input("base_model", options=base_model_folders(),
                               tooltip="Diffusers SD-inpainting folder in models/smarteraser or models/diffusers "
                                       "(unet/ with 9 input channels, vae/, text_encoder/). The SmartEraser release "
                                       "continues SmartEraser; SD1.5-inpainting starts it afresh."),
                io.Combo.Input("clip_vision", options=folder_paths.get_filename_list("clip_vision"),
                               tooltip="Frozen CLIP vision model with projection (clip-vit-large-patch14, 768-d) "
                                       "in models/clip_vision; used for visual guidance."),
                io.String.Input("dataset_folder", default="erasekit_syn4removal",
                                tooltip="Triplet dataset folder (source/, mask/, target/, manifest.jsonl) or "
                                        "WebDataset shards (a shard folder, a pattern such as "
                                        "shards/shard-{000000..000009}.tar, or an s3:// URL); absolute or relative "
                                        "to ComfyUI's output (or input) folder."),
                io.String.Input("output_name", default="smarteraser_trained",
                                tooltip="Name of the trained model folder in models/smarteraser (replaced when a "
                                        "run finishes) and of the run folder in output/erasekit_train."),
                io.Combo.Input("objective", options=list(core.OBJECTIVES), default="epsilon",
                               tooltip="epsilon: noise prediction (SmartEraser). cro: Erase Diffusion's chain-"
                                       "rectifying objective (the object fades out of the target chain, λt = 1 − ᾱt, "
                                       "one DDIM jump of γ ~ U{1..100})."),
                io.Combo.Input("mode", options=list(core.MODES), default="full",
                               tooltip="full: fine-tune UNet + text encoder + projector (the official recipe). "
                                       "lora: peft LoRA on UNet and text encoder (the projector is still trained)."),
                io.Int.Input("steps", default=1000, min=1, max=10_000_000, tooltip="Optimizer steps to train to."),
                io.Float.Input("learning_rate", default=core.LEARNING_RATE, min=0.0, max=1.0, step=1e-7,
                               tooltip="Constant AdamW learning rate; official: 5e-7 × batch 4 × 8 GPUs = 1.6e-5."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Samples per micro-batch (official 4)."),
                io.Int.Input("grad_accum", default=1, min=1, max=1024,
                             tooltip="Micro-batches per optimizer step (more = larger effective batch)."),
                io.Int.Input("resolution", default=core.RESOLUTION, min=64, max=2048, step=16,
                             tooltip="Training crop size in px (official 512); the short side is scaled to it."),
                io.Float.Input("condition_dropout", default=core.CONDITION_DROPOUT, min=0.0, max=1.0, step=0.01,
                               tooltip="Chance per batch of training the unconditional branch (empty prompt + "
                                       "zero-image token) instead; official 0.1, needed for CFG."),
                io.Combo.Input("image_condition", options=list(core.IMAGE_CONDITIONS), default="region",
                               tooltip="region: the UNet sees the whole unmasked image (SmartEraser RG). masked: "
                                       "ordinary SD inpainting, the image with the mask region grayed out."),
                io.Boolean.Input("visual_guidance", default=True,
                                 tooltip="SmartEraser's VG: the masked object as a CLIP token in a 7-token prompt. "
                                         "Off: plain 77-token text prompt, no projector."),
                io.Int.Input("lora_rank", default=32, min=1, max=1024, tooltip="LoRA rank (mode lora only)."),
                io.Boolean.Input("train_text_encoder", default=True,
                                 tooltip="Fine-tune the text encoder too (the official recipe). Off: it stays "
                                         "frozen, for less memory and time."),
                io.Int.Input("checkpoint_every", default=250, min=0, max=1_000_000,
                             tooltip="Write a resumable checkpoint every N steps (0: only at the end)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the newest checkpoint of this output_name, if there is one."),
                io.Combo.Input("mixed_precision", options=list(loop.MIXED_PRECISION), default="auto",
                               tooltip="bf16 autocast, or no (full fp32, also for exact comparisons). auto: bf16 "
                               "where the device runs it natively (CUDA GPUs with bf16, CPUs with AVX-512-BF16 or "
                               "AMX), fp32 elsewhere (emulated bf16 on a CPU is many times slower)."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute activations in the backward pass: less memory, slower."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seeds data order, crops, mask augmentation, noise and the projector's start."),
            ],
            outputs=[
                io.Image.Output("loss_curve", tooltip="Training loss per step (raw and smoothed)."),
                io.String.Output("model_folder", tooltip="The trained folder's name in models/smarteraser."),
                io.String.Output("summary", tooltip="Run summary as JSON: steps, final loss, written paths."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_folder=None, **_):
        """Run again when the dataset folder's files change (ComfyUI would otherwise reuse the old result)."""
        return _host.fingerprint(lambda: dataset_fingerprint(_paths.dataset_source(dataset_folder, "dataset_folder")))

    @classmethod
    def execute(cls, base_model, clip_vision, dataset_folder, output_name, objective, mode, steps, learning_rate,
                batch_size, grad_accum, resolution, condition_dropout, image_condition, visual_guidance, lora_rank,
                train_text_encoder, checkpoint_every, resume, mixed_precision, gradient_checkpointing,
                seed) -> io.NodeOutput:
        feature = "The 'Train SD Inpainting Eraser' node"
        for module in ("diffusers", "transformers") + (("peft",) if mode == "lora" else ()):
            require(module, extra="train", feature=feature)
        name = _output_name(output_name)
        base = base_model_path(base_model)
        dataset = _paths.dataset_source(dataset_folder, "dataset_folder")
        vision = _paths.model_file("clip_vision", clip_vision,
                                   "https://huggingface.co/openai/clip-vit-large-patch14") if visual_guidance else None
        run_dir = os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER, name)
        export_dir = os.path.join(folder_paths.get_folder_paths(SMARTERASER_FOLDER)[0], name)
        if os.path.abspath(export_dir) == os.path.abspath(base):
            raise ValueError(f"output_name {name!r} is the base model's own folder: choose another name")
        options = core.SDInpaintOptions(objective=objective, image_condition=image_condition,
                                        visual_guidance=visual_guidance, condition_dropout=condition_dropout,
                                        mode=mode, lora_rank=lora_rank, lora_alpha=float(lora_rank),
                                        train_text_encoder=train_text_encoder).check()
        config = loop.LoopConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                                 learning_rate=learning_rate, mixed_precision=mixed_precision,
                                 gradient_checkpointing=gradient_checkpointing, seed=seed, output_dir=run_dir,
                                 checkpoint_dir=os.path.join(run_dir, "checkpoints"), checkpoint_every=checkpoint_every)
        comfy.model_management.unload_all_models()  # the trainer loads its own copies; free ComfyUI's first
        comfy.model_management.soft_empty_cache()
        host = ComfyHost()
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes under inference mode
            out = core.train_sd_inpaint(
                base, dataset, run_dir, config, options, clip_vision=vision, resolution=resolution, resume=resume,
                progress=lambda step, total, loss: host.progress(step, total, "steps"),
                check_interrupt=host.check_interrupt, export_dir=export_dir, tokenizer_dir=SD1_TOKENIZER,
                accelerator=loop.SingleProcess(comfy.model_management.get_torch_device()))
        result = out["result"]
        curve = torch.from_numpy(curves.loss_curve_array(result.history)).unsqueeze(0)
        summary = {"steps": result.step, "final_loss": result.history[-1][1] if result.history else None,
                   "model_folder": export_dir, "run_folder": run_dir, "checkpoint": result.checkpoint,
                   "seconds": round(result.seconds, 2)}
        return io.NodeOutput(curve, name, json.dumps(summary))


NODES = [TrainSDInpaintEraser]
