"""OmniEraser on ComfyUI's FLUX: LoRA apply time against core LoraLoader, and (on CUDA) memory and speed per image.

1. LoRA apply time, as a ratio (target ≤ 1.2x). Both sides start from the same ComfyUI FLUX ModelPatcher (random
   weights at ComfyUI's fixed width; depth from --depth/--single, default 1 + 1 on CPU) and a LoRA state dict of
   the same rank on the same modules, in the official diffusers/PEFT format:
   - EraseKit: ``apply_omnieraser_lora`` (key mapping, patches incl. the img_in widening 64 → 256) + patching the
     weights (``patch_model``, what loading the model for sampling does);
   - core: ``comfy.sd.load_lora_for_models`` (what LoraLoader runs) with a standard FLUX LoRA (x_embedder 64 wide)
     + ``patch_model``.
   Median of interleaved repeats after a warm-up; each repeat unpatches first.
2. CUDA only (skipped with a line saying so otherwise): peak VRAM and seconds per 1024x1024 image, 28 euler
   steps, FLUX guidance 3.5, CFG 1, for bf16 and fp8 (e4m3fn) weights of the full FLUX.1-dev (19 + 38 blocks,
   random weights: speed and memory do not depend on the values), with the OmniEraser LoRA (rank 32) and the
   48-channel condition; T5/CLIP outputs are random tensors of the real shapes (512 x 4096, 768), the VAE is the
   full FLUX VAE (encode x2 + decode counted). Weights are built on the GPU; everything runs under
   ``torch.inference_mode()``, as ComfyUI's executor runs nodes (outside it ComfyUI's fp8 LoRA patching fails with
   "clamp(): functions with out=... arguments don't support automatic differentiation").
   Seconds per step and memory for plain / OmniEraser / + SRA, fp8 / bf16 and small-card caps:
   ``benchmarks/sampling.py``.

Usage: python benchmarks/omnieraser.py [--repeats 5] [--rank 32] [--depth 1 --single 1] [--skip-cuda] [--comfyui PATH]
Needs a ComfyUI checkout (--comfyui, else COMFYUI_PATH, else ~/ComfyUI).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pack import import_checkout, import_file  # noqa: E402

import_checkout()  # this checkout, whatever else is installed
from erasekit.headless import runtime  # noqa: E402


def tiny_flux():
    """tests/comfy/tiny/flux.py (ComfyUI's FLUX.1-dev parameters), imported by path."""
    return import_file(ROOT / "tests" / "comfy" / "tiny" / "flux.py", "erasekit_bench_tiny_flux")


FLUX_DEV_PARAMS = tiny_flux().FLUX_DEV_PARAMS
HIDDEN = FLUX_DEV_PARAMS["hidden_size"]


def start_comfy(comfyui, cpu):
    try:
        comfy_path = runtime.find_comfyui(comfyui)
    except runtime.UsageError as error:
        sys.exit(str(error))
    runtime.parse_comfy_args(comfy_path, cpu=cpu)


def pack_modules():
    from erasekit.erasers import omnieraser as core
    from erasekit.nodes import omnieraser as nodes_oe
    return core, nodes_oe


def flux_state_dict(depth, single, dtype, device="cpu", seed=0):
    """Random ComfyUI-named FLUX weights (shapes from ComfyUI's own model on the meta device)."""
    import comfy.ldm.flux.model
    import comfy.ops

    meta = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, device="meta",
                                     **dict(FLUX_DEV_PARAMS, depth=depth, depth_single_blocks=single))
    return random_weights(meta, device, seed)


def random_weights(meta_module, device="cpu", seed=0):
    """Random bf16 weights of a module's shapes (built on the meta device), generated on ``device``: uniform with
    about 1/sqrt(fan_in) spread, 0.02 for 1-D tensors, 1 for norm scales (speed and memory do not depend on them)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, value in meta_module.state_dict().items():
        tensor = torch.empty(value.shape, dtype=torch.bfloat16, device=device)
        bound = (3 / value.shape[-1]) ** 0.5 if value.ndim > 1 else 0.02
        out[key] = tensor.uniform_(-bound, bound, generator=generator) if not key.endswith(".scale") else tensor.fill_(1)
    return out


def lora_state_dict(core, depth, single, rank, widened, seed=1):
    """A LoRA in the official diffusers/PEFT format on every official target of a full-width FLUX."""
    generator = torch.Generator().manual_seed(seed)
    mlp = 4 * HIDDEN
    shapes = {"x_embedder": (HIDDEN, 64 * (4 if widened else 1))}
    for i in range(depth):
        for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"):
            shapes[f"transformer_blocks.{i}.{name}"] = (HIDDEN, HIDDEN)
        for stream in ("ff", "ff_context"):
            shapes[f"transformer_blocks.{i}.{stream}.net.0.proj"] = (mlp, HIDDEN)
            shapes[f"transformer_blocks.{i}.{stream}.net.2"] = (HIDDEN, mlp)
    for i in range(single):
        for name in ("attn.to_q", "attn.to_k", "attn.to_v"):
            shapes[f"single_transformer_blocks.{i}.{name}"] = (HIDDEN, HIDDEN)
    assert all(any(m == t or m.endswith("." + t) for t in core.LORA_TARGETS) for m in shapes)
    out = {}
    for module, (rows, cols) in shapes.items():
        out[f"transformer.{module}.lora_A.weight"] = (torch.randn(rank, cols, generator=generator) / cols ** 0.5).to(torch.bfloat16)
        out[f"transformer.{module}.lora_B.weight"] = (torch.randn(rows, rank, generator=generator) * 0.01).to(torch.bfloat16)
    return out


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def lora_apply_ratio(args, core, nodes_oe):
    import comfy.model_management
    import comfy.sd

    sd = flux_state_dict(args.depth, args.single, torch.bfloat16)
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    del sd
    ours_lora = lora_state_dict(core, args.depth, args.single, args.rank, widened=True)
    core_lora = lora_state_dict(core, args.depth, args.single, args.rank, widened=False)

    def run_ours():
        patched, mapping = nodes_oe.apply_omnieraser_lora(model, ours_lora, 1.0)
        assert not mapping.unmatched
        patched.patch_model(device_to=comfy.model_management.get_torch_device())
        patched.unpatch_model(device_to=patched.offload_device)

    def run_core():
        patched, _ = comfy.sd.load_lora_for_models(model, None, core_lora, 1.0, 0.0)
        patched.patch_model(device_to=comfy.model_management.get_torch_device())
        patched.unpatch_model(device_to=patched.offload_device)

    run_ours(), run_core()  # warm-up
    ours, base = [], []
    for _ in range(args.repeats):
        ours.append(timed(run_ours))
        base.append(timed(run_core))
    ours_s, core_s = statistics.median(ours), statistics.median(base)
    patched_weights = len(nodes_oe.comfy_patches(core.map_lora(ours_lora), ours_lora))
    print(f"LoRA apply (FLUX {args.depth}+{args.single} blocks at width {HIDDEN}, rank {args.rank}, "
          f"{len(ours_lora) // 2} LoRA modules → {patched_weights} ComfyUI patches, {args.repeats} repeats):")
    print(f"  EraseKit OmniEraser loader: {ours_s * 1000:.1f} ms   core LoraLoader: {core_s * 1000:.1f} ms   "
          f"ratio {ours_s / core_s:.3f}x (target <= 1.2x)")


def cuda_figures(args, core, nodes_oe):
    if not torch.cuda.is_available():
        print("CUDA part skipped: no CUDA device (peak VRAM and s/image at 1024x1024 need a GPU).")
        return
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import comfy.utils

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfy" / "tiny"))
    import flux as tiny_flux  # the FLUX VAE layout (random weights)

    size, steps = 1024, 28
    vae_path = Path(os.environ.get("TMPDIR", "/tmp")) / "erasekit_bench_ae.safetensors"
    tiny_flux.build_vae(vae_path)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))
    image = torch.rand(1, size, size, 3)
    mask = torch.zeros(1, size, size)
    mask[:, 300:700, 350:650] = 1
    lora = lora_state_dict(core, 19, 38, 32, widened=True)
    for label, dtype in (("bf16", torch.bfloat16), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        sd = {k: v.cpu() for k, v in flux_state_dict(19, 38, torch.bfloat16, device="cuda").items()}
        torch.cuda.empty_cache()
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
            del sd
            model, _ = nodes_oe.apply_omnieraser_lora(model, lora, 1.0)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            condition = nodes_oe.omnieraser_condition(vae, image, mask)
            context, pooled = torch.randn(1, 512, 4096), torch.randn(1, 768)
            cond = [[context, {"pooled_output": pooled, "guidance": 3.5, nodes_oe.CONDITION_KEY: condition}]]
            latent = torch.zeros(1, 16, size // 8, size // 8)
            noise = comfy.sample.prepare_noise(latent, 0)
            samples = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0)
            vae.decode(samples)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"CUDA {torch.cuda.get_device_name()}: {label} weights, {size}x{size}, {steps} steps: "
              f"{seconds:.1f} s/image, peak VRAM {peak:.2f} GiB (goal < 16 GiB with fp8)")
        del model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--depth", type=int, default=1, help="double blocks of the FLUX for the apply-time ratio")
    parser.add_argument("--single", type=int, default=1, help="single blocks of the FLUX for the apply-time ratio")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_PATH, else ~/ComfyUI)")
    args = parser.parse_args()
    start_comfy(args.comfyui, cpu=not torch.cuda.is_available())
    core, nodes_oe = pack_modules()
    lora_apply_ratio(args, core, nodes_oe)
    if not args.skip_cuda:
        cuda_figures(args, core, nodes_oe)


if __name__ == "__main__":
    main()
