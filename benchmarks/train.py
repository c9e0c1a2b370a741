"""Speed and memory of EraseKit's trainers, as ratios and figures printed in one run.

    python benchmarks/train.py                    # CPU rows; the GPU rows too when CUDA is there
    python benchmarks/train.py --dry-run --comfyui PATH          # the GPU rows' code on CPU, tiny FLUX / tiny SD, fp32

On a GPU machine without internet, staged by ../shared/bench/stage_gpu.sh .gpu (ComfyUI/, erasekit/ = git HEAD,
whl/ with diffusers), about 5 minutes:

    cd .gpu && python3 -m pip install -q --no-index --no-deps --target /tmp/site whl/*.whl &&
    PYTHONPATH=/tmp/site python3 erasekit/benchmarks/train.py --gpu-only --comfyui ComfyUI --json $OUT/train.json

CPU (tiny FLUX in the diffusers layout, hidden 128, fp32, a triplet folder from ../shared/data):
1. EraseKit's OmniEraser trainer (``train.eraser_lora.train_eraser``, latents cached) against a minimal diffusers +
   peft loop (widened x_embedder, peft LoRA rank 32, AdamW, clipping, the same objective, latents pre-encoded):
   median step each, best of rounds; target ratio <= 1.1.
2. The trainer with frozen weights stored in fp8 (up-cast per layer) against full-precision frozen weights: target
   ratio <= 1.3.
3. The memory model's estimate for FLUX.1-dev at 1024 px per memory plan (parameter counts on the meta device).

GPU (random weights of the full shapes built on the device; speed and memory do not depend on the values):
4. CLI trainer on diffusers' FLUX.1-dev, 1024 px, batch 1, rank 32: one row per (memory plan, optimizer): s per
   step and peak GiB allocated (weights included). Targets: 16gb <= 16 GiB at <= 1.5x the unquantised checkpointed
   row's step; 24gb <= 24 GiB; no crash with torch's default attention back-ends.
5. Node trainer on ComfyUI's full-shape FLUX (``--comfyui``), same rows; the 16gb / 24gb rows run on a card made
   16 / 24 GiB by a ballast allocation, so ComfyUI's loader decides offloading as it would there.
6. SD-inpainting trainer (SmartEraser recipe: full fine-tune, visual guidance), SD1.5 shapes, 512 px, batch 4:
   fp16 / bf16 x text encoder trained / frozen.
7. A probe, in a subprocess: does cuDNN attention's backward work on this GPU with this torch? When it does, the
   guard in ``train.loop.training_attention`` can go.
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pack import import_checkout, import_file  # noqa: E402

import_checkout()  # this checkout, whatever else is installed
from erasekit.erasers import omnieraser as oe  # noqa: E402
from erasekit.headless import runtime  # noqa: E402
from erasekit.jobs import Host  # noqa: E402
from erasekit.train import caching, flow_matching, loop, memory  # noqa: E402
from erasekit.train import eraser_lora as core  # noqa: E402

SHARED = Path(os.environ.get("ERASEKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
GIB = 2 ** 30
ROWS = []


def tiny_module(name):
    """A test helper module of tests/comfy/tiny (not a package), imported by path."""
    return import_file(ROOT / "tests" / "comfy" / "tiny" / f"{name}.py", f"tiny_{name}")


def report(section, **row):
    """Print one result row as JSON (and keep it for --json)."""
    row = {"section": section, **row}
    ROWS.append(row)
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------ CPU rows

def build_dataset(folder):
    import cv2

    from erasekit.dataset_tools.triplets import TripletWriter

    syn = SHARED / "images" / "syn_triplets"
    if not syn.is_dir():
        raise SystemExit(f"real data not found at {SHARED} (set ERASEKIT_SHARED_DATA)")
    with TripletWriter(folder) as writer:
        for path in sorted((syn / "paste").glob("*.jpg")):
            rgb = lambda p: cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (128, 128), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(cv2.imread(str(syn / "mask" / path.name), cv2.IMREAD_GRAYSCALE), (128, 128)) > 127
            writer.write(path.stem, rgb(path), mask, rgb(syn / "gt" / path.name),
                         {"origin": {"kind": "image", "image": path.stem, "instance": 0}})
    return folder


class StepClock(Host):
    """A host that notes when each optimizer step finished."""

    def __init__(self):
        self.stamps = []

    def progress(self, done, total, unit="items"):
        if unit == "steps":
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())


def median_step(stamps, warmup):
    """Median time between consecutive steps after warm-up (robust to other processes' load spikes)."""
    gaps = sorted(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))
    return gaps[len(gaps) // 2]


def cpu_adapter(model_dir):
    from erasekit.train import flux

    transformer, vae, _ = flux.load_flux(model_dir, "cpu", torch.float32)
    text = flux.encode_caption(model_dir, max_sequence_length=16)
    return flux.DiffusersFlux(transformer, vae, text, "cpu")


def erasekit_step_time(model_dir, data_dir, steps, resolution, plan="full", warmup=5):
    clock = StepClock()
    job = core.EraserJob(steps=steps + warmup, learning_rate=1e-4, scale_lr=False, grad_accum=1, resolution=resolution,
                         crop_variants=1, mask_augmentation=False, mixed_precision="no", memory_plan=plan,
                         lr_scheduler="constant")
    core.train_eraser(job, cpu_adapter(model_dir), clock, folders=[str(data_dir)])
    return median_step(clock.stamps, warmup)


def minimal_step_time(model_dir, data_dir, steps, resolution, warmup=5):
    """The same work written the way a diffusers + peft example does it, latents pre-encoded."""
    from peft import LoraConfig

    from erasekit.train.datasets import PairedCropDataset, collate

    adapter = cpu_adapter(model_dir)
    transformer = adapter.module
    oe.widen_x_embedder(transformer, 4)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=list(oe.LORA_TARGETS)))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    data = PairedCropDataset(core.open_triplets([data_dir]), resolution, seed=0, variants=1)
    batches = [collate([data[(i, 0)]]) for i in range(len(data))]
    moments = [core.encode_moments(adapter, b["source"], b["mask"], b["target"]) for b in batches]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    stamps = []
    for step in range(steps + warmup):
        i = step % len(batches)
        latents = {p: oe.normalize_flux_latent(caching.sample_latent(moments[i][f"{p}_mean"], moments[i][f"{p}_std"], generator))
                   for p in core.LATENT_PARTS}
        condition = oe.condition_latent(latents["background"], latents["foreground"], batches[i]["mask"])
        noise = torch.randn(latents["target"].shape, generator=generator)
        sigmas = flow_matching.sample_sigmas(1, generator)
        noisy = flow_matching.noisy_latents(latents["target"], noise, sigmas)
        prediction = adapter.velocity(noisy, condition, sigmas, oe.GUIDANCE)
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - latents["target"]).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.detach().item()  # the trainer reads each step's loss too
        stamps.append(time.perf_counter())
    return median_step(stamps, warmup)


def cpu_rows(args):
    tiny = tiny_module("_diffusers_flux")
    torch.set_num_threads(args.threads)
    fp8 = memory.MemoryPlan("fp8 base", "fp8", False, None, "")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.save_random_flux_folder(Path(tmp) / "flux", hidden_heads=4, head_dim=32)
        data_dir = build_dataset(Path(tmp) / "data")
        # Alternate; each one's best round is its cost without other processes' load on the cores.
        best = {"minimal": float("inf"), "erasekit": float("inf"), "fp8": float("inf")}
        for _ in range(args.rounds):
            best["minimal"] = min(best["minimal"], minimal_step_time(model_dir, data_dir, args.steps, args.resolution))
            best["erasekit"] = min(best["erasekit"], erasekit_step_time(model_dir, data_dir, args.steps, args.resolution))
            best["fp8"] = min(best["fp8"], erasekit_step_time(model_dir, data_dir, args.steps, args.resolution, fp8))
    print(f"tiny FLUX (hidden 128), {args.resolution} px crops, {args.steps} steps, CPU threads {torch.get_num_threads()}")
    print(f"minimal diffusers+peft loop:        {best['minimal'] * 1000:.1f} ms/step (median step, best of rounds)")
    print(f"EraseKit trainer:                   {best['erasekit'] * 1000:.1f} ms/step")
    print(f"EraseKit trainer, fp8 frozen base:  {best['fp8'] * 1000:.1f} ms/step")
    report("cpu", row="trainer / minimal", ratio=round(best["erasekit"] / best["minimal"], 3), target=1.1)
    report("cpu", row="fp8 base / full-precision base", ratio=round(best["fp8"] / best["erasekit"], 3), target=1.3)


def estimate_rows():
    """The memory model's figures for FLUX.1-dev at 1024 px (what the help texts quote)."""
    from diffusers import FluxTransformer2DModel

    from erasekit.train.flux import DiffusersFlux

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
    adapter = DiffusersFlux(transformer, None, {"prompt_embeds": torch.zeros(1, 512, 4096, device="meta")}, "cpu")
    targets = adapter.lora_targets()
    lora_params = sum(32 * (t.in_features + (t.rows[1] if t.rows else t.out_features)) for t in targets.values())
    facts = adapter.memory_facts()
    for name, plan in memory.PLANS.items():
        estimate, offloaded = core.plan_memory(facts, plan, lora_params, 1024, 2)
        report("estimate", plan=name, gib=round(estimate.total / GIB, 1), weights_gib=round(estimate.weights / GIB, 1),
               lora_state_gib=round(estimate.lora_state / GIB, 2),
               activations_gib=round((estimate.activations + estimate.workspace) / GIB, 1),
               offloaded_gib=round(sum(facts.linears[n][0] * 2 for n in offloaded) / GIB, 1))


# ------------------------------------------------------------------------------------------------ GPU rows

FLUX_DEV_COMFY = tiny_module("flux").FLUX_DEV_PARAMS
TINY_COMFY = dict(FLUX_DEV_COMFY, vec_in_dim=32, context_in_dim=32, hidden_size=128, num_heads=4, depth=1,
                  depth_single_blocks=1, axes_dim=[8, 12, 12])
TINY_DIFFUSERS = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4,
                      joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))


def free_device():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def card_of(gib, device):
    """Make the GPU look like a ``gib`` GiB card to anyone asking how much is free (a ballast allocation)."""
    ballast = None
    if gib and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        spare = int(free - gib * GIB)
        if spare > 0:
            ballast = torch.empty(spare, dtype=torch.uint8, device=device)
    try:
        yield ballast.numel() if ballast is not None else 0
    finally:
        del ballast
        free_device()


class MomentsData(torch.utils.data.Dataset):
    """One synthetic training crop as the trainer caches it: VAE moments of target/background/foreground + mask."""

    def __init__(self, resolution, device):
        generator = torch.Generator().manual_seed(0)
        shape = (1, 16, resolution // 8, resolution // 8)
        self.item = {}
        for part in core.LATENT_PARTS:
            self.item[f"{part}_mean"] = torch.randn(shape, generator=generator)
            self.item[f"{part}_std"] = 0.1 * torch.rand(shape, generator=generator) + 0.01
        mask = torch.zeros(1, resolution, resolution)
        mask[:, resolution // 4: resolution // 2, resolution // 3: 2 * resolution // 3] = 1
        self.item["mask"] = mask
        self.device = device

    def __len__(self):
        return 1

    def __getitem__(self, key):
        return {k: v.to(self.device) for k, v in self.item.items()}


def time_trainer(adapter, job, plan, resolution, steps, warmup=1, ballast=0):
    """Steps of the one trainer (its plan, slots, model, loop) on synthetic moments: (s per step, peak GiB)."""
    device = adapter.device
    job.memory_plan = plan
    run = core.plan_run(job, adapter)
    slots, model = core.build_model(job, adapter, run)
    free_device()  # the peak counts from here: weights as the plan stores them, then the steps
    config = job.loop_config()
    config.steps, config.mixed_precision = steps + warmup, run.precision
    config.gradient_checkpointing = run.plan.gradient_checkpointing
    objective = job.objective()
    clock = StepClock()

    def step(trained, batch, generator):
        mask = batch.pop("mask")
        return core.eraser_loss(trained, batch, mask, generator, **objective)

    try:
        loop.train(step, slots.parameters_by_name(), MomentsData(resolution, device), config, model=model,
                   accelerator=loop.SingleProcess(device), collate_fn=lambda rows: dict(rows[0]),
                   progress=lambda s, t, loss: clock.progress(s, t, "steps"), device=device)
    finally:
        slots.detach()
        adapter.close()
    seconds = median_step(clock.stamps, warmup)
    peak = (torch.cuda.max_memory_allocated(device) - ballast) / GIB if device.type == "cuda" else float("nan")
    return seconds, peak, run


def flux_plans(device):
    """The rows, the targets first (a run cut short still has them)."""
    checkpointed = memory.MemoryPlan("full+checkpointing", None, True, None, "")
    return [memory.PLANS["16gb"], memory.PLANS["24gb"], checkpointed, memory.PLANS["full"]]


def failed(section, error, **row):
    """Report a row that raised, and go on with the next (a GPU run is too scarce to stop at one failure)."""
    import traceback

    traceback.print_exc()
    report(section, **row, s_per_step="out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else
           f"failed: {type(error).__name__}: {str(error)[:300]}")


def cli_rows(device, tiny, resolution, steps):
    """4. The CLI's adapter (diffusers FLUX) per memory plan and optimizer."""
    from diffusers import FluxTransformer2DModel

    from erasekit.train.flux import DiffusersFlux

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    optimizers = ["adamw"]
    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes"):
        optimizers.append("adamw8bit")
    elif device.type == "cuda":
        print("bitsandbytes is not installed: the 8-bit AdamW row is skipped")
    text_width = 32 if tiny else 4096
    text = {"prompt_embeds": torch.randn(1, 512, text_width, device=device, dtype=dtype),
            "pooled_prompt_embeds": torch.randn(1, 32 if tiny else 768, device=device, dtype=dtype),
            "text_ids": torch.zeros(512, 3, device=device, dtype=dtype)}
    for plan in flux_plans(device):
        for optimizer in optimizers if plan.name == "16gb" else ["adamw"]:
            with torch.device("meta"):
                transformer = FluxTransformer2DModel(guidance_embeds=True, **(TINY_DIFFUSERS if tiny else {}))
            transformer = transformer.to(dtype).to_empty(device=device)  # random bf16 weights made on the GPU
            with torch.no_grad():
                for name, p in transformer.named_parameters():
                    p.normal_(1.0 if "norm" in name and p.ndim == 1 else 0.0, 0.02)
            transformer.requires_grad_(False)
            adapter = DiffusersFlux(transformer, None, text, device)
            job = core.EraserJob(rank=32, grad_accum=1, resolution=resolution, optimizer=optimizer,
                                 mixed_precision="bf16" if device.type == "cuda" else "no")
            try:
                seconds, peak, run = time_trainer(adapter, job, plan, resolution, steps)
                report("gpu cli (diffusers FLUX)", plan=plan.name, optimizer=optimizer, s_per_step=round(seconds, 3),
                       peak_gib=round(peak, 1), estimate_gib=round(run.estimate.total / GIB, 1),
                       offloaded_layers=len(run.offloaded))
            except Exception as error:  # noqa: BLE001 - reported, then the next row
                failed("gpu cli (diffusers FLUX)", error, plan=plan.name, optimizer=optimizer)
            del adapter, transformer
            free_device()


def node_rows(device, tiny, resolution, steps):
    """5. The node's adapter (ComfyUI's FLUX as UNETLoader would give it) per memory plan."""
    from comfy import model_management, model_patcher, supported_models

    from erasekit.nodes.train_flux import ComfyFlux

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = supported_models.Flux(dict(TINY_COMFY if tiny else FLUX_DEV_COMFY))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=device)
    with torch.no_grad():  # random weights made on the device, then parked in CPU memory like a loaded UNET
        for name, p in base.diffusion_model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and ("norm" in name or name.endswith(".scale")) else 0.0, 0.02)
    base.diffusion_model.to("cpu")
    base.device = torch.device("cpu")  # where ComfyUI's loader finds it, as after UNETLoader
    free_device()
    model = model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))
    width, pooled = (32, 32) if tiny else (4096, 768)
    positive = [[torch.randn(1, 512, width), {"pooled_output": torch.randn(1, pooled)}]]
    for plan in flux_plans(device):
        card = plan.budget_gib if device.type == "cuda" else None
        job = core.EraserJob(rank=32, grad_accum=1, resolution=resolution,
                             mixed_precision="bf16" if device.type == "cuda" else "no")
        with card_of(card, device) as ballast:
            adapter = ComfyFlux(model, None, positive, device)
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    seconds, peak, run = time_trainer(adapter, job, plan, resolution, steps, ballast=ballast)
                report("gpu node (ComfyUI FLUX)", plan=plan.name, card_gib=card, s_per_step=round(seconds, 3),
                       peak_gib=round(peak, 1), estimate_gib=round(run.estimate.total / GIB, 1))
            except Exception as error:  # noqa: BLE001 - reported, then the next row
                failed("gpu node (ComfyUI FLUX)", error, plan=plan.name, card_gib=card)
            del adapter
            model_management.unload_all_models()
    del model, base
    free_device()


def sd_rows(device, tiny, steps):
    """6. The SD-inpainting trainer, SmartEraser's recipe, SD1.5 shapes, batch 4."""
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: SD-inpainting rows skipped")
        return
    import numpy as np
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from erasekit.train import epsilon, sd_inpaint
    from erasekit.train.datasets import PairedCropDataset, collate

    size = 64 if tiny else 512
    tokenizer = tiny_module("sd_inpaint_train").tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size // 8, in_channels=9, out_channels=4, cross_attention_dim=768,
                                **(dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")) if tiny else {}))
    vae = AutoencoderKL(block_out_channels=(32,) * 4 if tiny else (128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1 if tiny else 2, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=256 if tiny else 3072,
                                        num_hidden_layers=1 if tiny else 12, num_attention_heads=12,
                                        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64 if tiny else 1024, intermediate_size=128 if tiny else 4096, num_hidden_layers=1 if tiny else 24,
        num_attention_heads=4 if tiny else 16, patch_size=14, image_size=224, projection_dim=768)).requires_grad_(False)
    rng = np.random.default_rng(0)
    triplets = []
    for _ in range(4):
        target = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), bool)
        mask[size // 4: size // 2, size // 3: 2 * size // 3] = True
        source = target.copy()
        source[mask] = 200
        triplets.append({"source": source, "mask": mask, "target": target})
    data = PairedCropDataset(triplets, size, seed=0)
    precisions = ["fp16", "bf16"] if device.type == "cuda" else ["no"]
    for precision in precisions:
        for train_text in (True, False):
            options = sd_inpaint.SDInpaintOptions(train_text_encoder=train_text)
            model = sd_inpaint.SDInpaintModel(unet, vae, text, tokenizer, epsilon.scaled_linear_alphas_cumprod(), options,
                                              vision, sd_inpaint.new_projector(768, 0)).to(device)
            params = sd_inpaint.trainable_parameters(model, options)
            free_device()
            clock = StepClock()
            config = loop.LoopConfig(steps=steps + 1, batch_size=4, learning_rate=sd_inpaint.LEARNING_RATE,
                                     mixed_precision=precision)
            try:
                loop.train(sd_inpaint.step_fn, params, data, config, model=model, accelerator=loop.SingleProcess(device),
                           collate_fn=collate, progress=lambda s, t, loss: clock.progress(s, t, "steps"), device=device)
                seconds = median_step(clock.stamps, 1)
                peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
                report("gpu sd-inpaint (SD1.5, 512 px, batch 4)", precision=precision, text_encoder_trained=train_text,
                       trainable_m=round(sum(p.numel() for p in params.values()) / 1e6), s_per_step=round(seconds, 3),
                       peak_gib=round(peak, 1))
            except Exception as error:  # noqa: BLE001 - reported, then the next row
                failed("gpu sd-inpaint (SD1.5, 512 px, batch 4)", error, precision=precision,
                       text_encoder_trained=train_text)
            del model, params
            free_device()
    del unet, vae, text, vision
    free_device()


CUDNN_PROBE = """
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    torch.nn.functional.scaled_dot_product_attention(q, k, v).float().square().mean().backward()
torch.cuda.synchronize()
print("ok")
"""


def cudnn_probe():
    """7. cuDNN SDPA forward + backward at FLUX.1-dev's 1024 px attention shape, alone in a subprocess."""
    run = subprocess.run([sys.executable, "-c", CUDNN_PROBE], capture_output=True, text=True, timeout=300)
    last = (run.stdout + run.stderr).strip().splitlines()[-1:] or [""]
    report("cudnn attention backward probe", works=run.returncode == 0 and last[0] == "ok",
           returncode=run.returncode, last_line=last[0][:200])


def gpu_rows(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    tiny = device.type == "cpu"
    resolution = 64 if tiny else 1024
    steps = 2 if tiny else args.gpu_steps
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name}, {props.total_memory / GIB:.0f} GiB, torch {torch.__version__}")
    else:
        print("dry run on CPU: tiny FLUX and tiny SD, fp32, no peak memory")
    started = time.perf_counter()
    for section in ("cli", "node", "sd"):
        try:
            if section == "cli":
                cli_rows(device, tiny, resolution, steps)
            elif section == "node" and args.comfyui:
                runtime.parse_comfy_args(runtime.find_comfyui(args.comfyui), cpu=device.type == "cpu")
                node_rows(device, tiny, resolution, steps)
            elif section == "node":
                print("--comfyui not given: node trainer rows skipped")
            else:
                sd_rows(device, tiny, steps)
        except Exception as error:  # noqa: BLE001 - a section that cannot start (an import, a build) is reported
            failed(f"gpu {section}", error)
        free_device()
    if device.type == "cuda":
        cudnn_probe()
    print(f"GPU section: {time.perf_counter() - started:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="CPU: timed steps per loop")
    parser.add_argument("--resolution", type=int, default=64, help="CPU: crop size")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: alternating rounds; each loop's best is reported")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="CPU: torch threads (1 is steadier on a loaded machine)")
    parser.add_argument("--gpu-steps", type=int, default=3, help="GPU: timed steps per row (after one warm-up)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU rows")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU rows")
    parser.add_argument("--dry-run", action="store_true", help="run the GPU rows' code on CPU with tiny models")
    parser.add_argument("--comfyui", default=None, help="a ComfyUI folder: adds the node trainer's rows")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args()
    if not args.gpu_only and not args.dry_run:
        cpu_rows(args)
        estimate_rows()
    if not args.cpu_only and (torch.cuda.is_available() or args.dry_run):
        gpu_rows(args)
    elif not args.cpu_only:
        print("CUDA not available: GPU rows (FLUX.1-dev 1024 px, SD1.5 512 px) skipped; --dry-run runs their code on CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
