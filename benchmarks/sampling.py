"""End-to-end sampling through ComfyUI: seconds per step and peak memory, the table of issue 16, in one run.

Rows (each: one warm-up sample that loads and patches the model, then a timed sample; peaks over the timed one,
weights included):
- ``flux`` (table group ``full``, the whole GPU): plain FLUX / OmniEraser (LoRA + 48-channel condition) /
  OmniEraser + self-rectifying attention, each with weights
  - ``fp8`` (UNETLoader weight_dtype fp8_e4m3fn) and ``bf16``;
  - ``fp8_fast``: fp8_e4m3fn_fast, the per-model form of ``--fast fp8_matrix_mult`` (``comfy.ops.fp8_ops``, linears
    through ``torch._scaled_mm``). ComfyUI 0.3.64's ``fp8_ops`` takes that path only in eval mode and leaves a loaded
    diffusion model in training mode, so in ComfyUI itself the option changes nothing for FLUX; these rows call
    ``eval()`` on the model to measure the fast path, and ``_scaled_mm/step`` shows it ran.
- ``caps`` (table groups ``cap12``, ``cap8``), one process: fp8 plain / OmniEraser / merged OmniEraser (img_in 256
  wide, no patches: what 'Save OmniEraser Merged FLUX' writes; random values like the rest) with the allocator capped
  (``torch.cuda.set_per_process_memory_fraction``) and ComfyUI's reserve = total - cap + 2 GiB (what
  ``--reserve-vram`` sets), so ComfyUI plans partial loading. ``patches/step`` counts ``comfy.lora.calculate_weight``
  calls per step: LoRA weights recomputed because they stayed offloaded.
- ``sdxl``: SDXL plain vs + SRA (CFG 5, so cond and uncond batched).
- ``attention``: ``benchmarks/attention.py`` on the same device (one attention, plain vs SRA), with all heads in one
  dense call and with the heads in 8 groups (``--head-groups``).
Groups run in separate processes (ComfyUI's memory plan and the allocator cap are per process). Weights are random,
of full size (FLUX.1-dev: 19 + 38 blocks, 11.9 B parameters; SDXL's UNet, 2.6 B), generated on the device (speed and
memory do not depend on the values); T5/CLIP outputs and the OmniEraser condition latents are random tensors of the
real shapes; no VAE runs (it is not part of a step). Sampling runs under ``torch.inference_mode()``, as ComfyUI's
executor runs every node.

On CUDA: 1024x1024, 28 steps (``--cap-steps`` 8 under the caps, where every step streams the offloaded weights the
same way), FLUX cfg 1. Estimated 6-8 minutes on an H100/H200, mostly loading 12 B-parameter models five times; to
stay under a 10-minute limit per command run ``--groups flux`` and ``--groups caps,sdxl,attention`` separately. On a CPU the same table runs as a
dry run: a FLUX with one double and one single block at 256x256 with 32 text tokens (computed in float32; fp8/bf16 are
the storage), a tiny SD1.5-layout UNet in place of SDXL, a 1-step warm-up + 2 steps, no allocator caps (CUDA only;
the cap rows still run), fp8_fast with ``--supports-fp8-compute`` (``_scaled_mm`` has a CPU kernel).

Usage:
  python benchmarks/sampling.py [--comfyui PATH] [--groups flux,caps,sdxl,attention] [--steps N] [--cap-steps N]
                                [--size PX] [--json rows.jsonl] [--sra-strategy row_groups|gathered_keys]
On the GPU machine, from the folder ``../shared/bench/stage_gpu.sh`` builds (ComfyUI/ beside erasekit/):
  python erasekit/benchmarks/sampling.py --comfyui ComfyUI
``--comfyui`` defaults to $COMFYUI_PATH, then a ComfyUI/ folder beside this checkout, then ~/ComfyUI.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("flux", "caps", "sdxl", "attention")
CAPS = {"cap12": 12.0, "cap8": 8.0}
SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
                 use_temporal_resblock=False)
# CPU dry run: an SD1.5-layout UNet (SDXL's pooled-text embedding needs SDXL's full width), attention at 3 levels.
TINY_SD_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                    adm_in_channels=None, in_channels=4, model_channels=32, num_res_blocks=[1, 1, 1],
                    channel_mult=[1, 2, 2], transformer_depth=[1, 1, 0], transformer_depth_middle=1,
                    transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=False,
                    context_dim=32, num_heads=4, use_temporal_resblock=False, use_temporal_attention=False)
DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pack import import_checkout, import_file  # noqa: E402  (this checkout as ``erasekit``, whatever else is installed)


def log(message):
    print(message, flush=True)


def find_comfyui(path):
    """``--comfyui``, else $COMFYUI_PATH, else a ComfyUI/ folder beside this checkout, else ~/ComfyUI."""
    from erasekit.headless import runtime

    beside = ROOT.parent / "ComfyUI"
    if path is None and not os.environ.get("COMFYUI_PATH") and runtime.is_comfyui(beside):
        path = beside
    try:
        return str(runtime.find_comfyui(path))
    except runtime.UsageError as error:
        sys.exit(str(error))


# ---------------------------------------------------------------------------------------------------- driver


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: see the docstring)")
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 28 on CUDA, 2 on CPU)")
    parser.add_argument("--cap-steps", type=int, default=None, help="timed steps under caps (default 8 on CUDA)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024 on CUDA, 256 on CPU)")
    parser.add_argument("--json", default="", help="append every row as a JSON line to this file")
    parser.add_argument("--sra-strategy", default=None, help="force an SRA strategy (row_groups, gathered_keys)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.steps = args.steps or (28 if cuda else 2)
    args.cap_steps = args.cap_steps or (8 if cuda else args.steps)
    args.size = args.size or (1024 if cuda else 256)
    import_checkout()
    args.comfyui = find_comfyui(args.comfyui)
    if args.worker:
        return worker(args, cuda)
    log(f"EraseKit sampling table: {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU dry run'}, torch "
        f"{torch.__version__}, ComfyUI {args.comfyui}, {args.size}x{args.size}, {args.steps} timed steps "
        f"({args.cap_steps} under caps), 1 warm-up sample first")
    if not cuda:
        log("CPU: FLUX with 1 double + 1 single block (full width), 32 text tokens, a tiny SD1.5-layout UNet instead "
            "of SDXL, float32 compute, no allocator caps; figures show the code runs, not GPU speed.")
    rows, started = [], time.perf_counter()
    for group in args.groups.split(","):
        if group == "attention":
            attention_benchmark(cuda)
            continue
        rows += run_group(group, args)
    log(f"\nall groups in {time.perf_counter() - started:.0f} s")
    print_table(rows, cuda)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def run_group(group, args):
    """One group in a fresh process; returns its rows (printed by the worker as ``ROW {json}`` lines)."""
    command = [sys.executable, __file__, "--worker", group, "--comfyui", args.comfyui, "--steps", str(args.steps),
               "--cap-steps", str(args.cap_steps), "--size", str(args.size)]
    if args.sra_strategy:
        command += ["--sra-strategy", args.sra_strategy]
    log(f"\n== {group}")
    rows = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in process.stdout:
        if line.startswith("ROW "):  # the worker also prints each row readably
            rows.append(json.loads(line[4:]))
        elif " it/s]" not in line and "s/it]" not in line:  # progress bars
            print(line, end="", flush=True)
    if process.wait() != 0:
        log(f"   group {group} exited with {process.returncode}")
    return rows


def attention_benchmark(cuda):
    script = ROOT / "benchmarks" / "attention.py"
    device = ["--device", "cuda"] if cuda else ["--repeats", "3", "--strategy", "gathered_keys"]
    for extra in ([], ["--head-groups", "8"]):
        log(f"\n== attention ({' '.join(device + extra)})")
        subprocess.run([sys.executable, str(script)] + device + extra, check=False)


def print_table(rows, cuda):
    """The table with each row's ratio against its baseline in the same run."""
    def find(group, config, dtype):
        return next((r for r in rows if r["group"] == group and r["config"] == config and r["dtype"] == dtype
                     and "s_per_step" in r), None)

    baselines = {"oe": "plain", "oe_sra": "oe", "merged": "plain", "sra": "plain"}
    log("\n| group | run | dtype | s/step | x baseline | peak alloc GiB | peak reserved GiB | patches/step | "
        "_scaled_mm/step |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            log(f"| {r['group']} | {r['config']} | {r['dtype']} | error: {r['error'][:120]} | | | | | |")
            continue
        ratios = []
        base = find(r["group"], baselines.get(r["config"], ""), r["dtype"])
        if base:
            ratios.append(f"{r['s_per_step'] / base['s_per_step']:.3f} vs {base['config']}"
                          + (f" (memory {r['peak_alloc_gib'] / base['peak_alloc_gib']:.3f})" if cuda else ""))
        other = find("full", r["config"], "fp8") if r["dtype"] == "fp8_fast" or r["group"] in CAPS else None
        if other:  # fp8 matmul vs plain fp8; a cap vs the whole GPU
            ratios.append(f"{r['s_per_step'] / other['s_per_step']:.3f} vs full fp8")
        ratio = "; ".join(ratios)
        mem = (f"{r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f}" if cuda else "n/a | n/a")
        log(f"| {r['group']} | {r['config']} | {r['dtype']} | {r['s_per_step']:.4f} | {ratio} | {mem} | "
            f"{r['patch_calls_per_step']:.0f} | {r['scaled_mm_per_step']:.0f} |")
    log("targets: oe_sra <= 1.10x oe (fp8, bf16), peak <= 1.02x; sdxl sra <= 1.10x plain; under caps oe (and merged) "
        "<= 1.10x plain")


# ---------------------------------------------------------------------------------------------------- worker


def import_pack():
    """This checkout's modules (as the ``erasekit`` package, whatever its folder is called or what else is installed)."""
    import_checkout()
    import erasekit.erasers.attention as sra_core
    import erasekit.nodes.attention as nodes_sra
    import erasekit.nodes.omnieraser as nodes_oe
    import erasekit.nodes.omnieraser_merge as nodes_merge
    return sra_core, nodes_sra, nodes_oe, nodes_merge


def bench_helpers():
    """``benchmarks/omnieraser.py``: the random full-size weights and the OmniEraser LoRA layout."""
    return import_file(ROOT / "benchmarks" / "omnieraser.py", "erasekit_bench_omnieraser")


class Counters:
    """Counts LoRA weight recomputations (``comfy.lora.calculate_weight``) and fp8 matmuls (``torch._scaled_mm``)."""

    def __init__(self):
        import comfy.lora
        self.patches = 0
        self.scaled_mm = 0
        calculate_weight, scaled_mm = comfy.lora.calculate_weight, torch._scaled_mm

        def counting_calculate_weight(*a, **k):
            self.patches += 1
            return calculate_weight(*a, **k)

        def counting_scaled_mm(*a, **k):
            self.scaled_mm += 1
            return scaled_mm(*a, **k)

        comfy.lora.calculate_weight = counting_calculate_weight
        torch._scaled_mm = counting_scaled_mm

    def reset(self):
        self.patches = self.scaled_mm = 0


def sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def timed_sample(model, positive, negative, latent, cfg, warmup_steps, steps, cuda, counters):
    """Warm-up sample (loads and patches the model), then the timed one; returns the row's measurements."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(n):
        return comfy.sample.sample(model, noise, n, cfg, "euler", "simple", positive, negative, latent, denoise=1.0,
                                   disable_pbar=True)

    sample(warmup_steps)
    sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    counters.reset()
    start = time.perf_counter()
    out = sample(steps)
    sync(cuda)
    seconds = time.perf_counter() - start
    row = dict(steps=steps, sample_s=round(seconds, 3), s_per_step=seconds / steps,
               patch_calls_per_step=counters.patches / steps, scaled_mm_per_step=counters.scaled_mm / steps,
               finite=bool(torch.isfinite(out).all()))
    if cuda:
        import comfy.model_management as mm
        loaded = mm.loaded_models()
        row.update(peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   loaded_gib=round(loaded[0].loaded_size() / 2**30, 2) if loaded else None)
    return row


def worker(args, cuda):
    group = args.worker
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0
    # fp8_fast rows: on CPU ComfyUI must be told the device computes in fp8 (_scaled_mm has a CPU kernel)
    from erasekit.headless import runtime
    runtime.parse_comfy_args(args.comfyui, [] if cuda or group != "flux" else ["--supports-fp8-compute"], cpu=not cuda)
    import comfy.model_management as mm
    import comfy.sd

    sra_core, nodes_sra, nodes_oe, nodes_merge = import_pack()
    if args.sra_strategy:
        sra_core.STRATEGY_BY_DEVICE_TYPE = {mm.get_torch_device().type: args.sra_strategy}
    counters = Counters()
    device = "cuda" if cuda else "cpu"
    log(f"   {group}: device {mm.get_torch_device()}, SRA strategy {sra_core.strategy_for(mm.get_torch_device())}")

    def attempt(label, config, dtype, fn):
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                row = dict(group=label, config=config, dtype=dtype, **fn())
        except Exception as error:  # keep going: every row is worth having
            import traceback
            traceback.print_exc()
            row = dict(group=label, config=config, dtype=dtype, error=repr(error)[:300])
        print("ROW " + json.dumps(row), flush=True)
        log(f"   {({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})}")
        mm.unload_all_models()
        mm.soft_empty_cache()

    size = args.size
    latent = torch.zeros(1, 16 if group != "sdxl" else 4, size // 8, size // 8)
    mask = torch.zeros(1, size, size)
    mask[:, int(size * .3):int(size * .68), int(size * .35):int(size * .63)] = 1  # about 11 % of the image

    if group == "sdxl":
        started = time.perf_counter()
        base = build_sdxl(cuda, device)
        log(f"   built {'SDXL' if cuda else 'a tiny SD1.5-layout'} UNet "
            f"({sum(p.numel() for p in base.model.parameters()) / 1e9:.3f} B params) in {time.perf_counter() - started:.1f} s")
        g = torch.Generator().manual_seed(2)
        context_dim = base.model.model_config.unet_config["context_dim"]
        positive, negative = ([[torch.randn(1, 77, context_dim, generator=g),
                                {"pooled_output": torch.randn(1, 1280, generator=g)} if cuda else {}]] for _ in range(2))
        for config in ("plain", "sra"):
            def row(config=config):
                model = base if config == "plain" else nodes_sra.SelfRectifyingAttention(mask, nodes_sra.UNET).apply_to(base)
                return timed_sample(model, positive, negative, latent, 5.0, 1, args.steps, cuda, counters)
            attempt("sdxl", config, "default", row)
        return 0

    depth, single = (19, 38) if cuda else (1, 1)
    started = time.perf_counter()
    bench = bench_helpers()
    sd = {k: v.cpu() for k, v in bench.flux_state_dict(depth, single, torch.bfloat16, device=device).items()}
    lora = bench.lora_state_dict(nodes_oe.core, depth, single, 32, widened=True)
    log(f"   built FLUX weights ({sum(v.numel() for v in sd.values()) / 1e9:.2f} B params, {depth}+{single} blocks) "
        f"in {time.perf_counter() - started:.1f} s")
    if cuda:
        torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(3)
    text = 512 if cuda else 32  # T5's 512 tokens; 32 on CPU, where every token costs 2 x 0.55 G multiply-adds
    context, pooled = torch.randn(1, text, 4096, generator=g), torch.randn(1, 768, generator=g)
    condition = {"background": torch.randn(latent.shape, generator=g), "foreground": torch.randn(latent.shape, generator=g),
                 "mask": (mask >= 0.5).float()}

    def load(dtype, weights=sd):
        """The FLUX as UNETLoader loads it: weight_dtype fp8_e4m3fn, fp8_e4m3fn_fast (fp8 matmul, the per-model form of
        --fast fp8_matrix_mult), or the file's bf16."""
        options = {"dtype": DTYPES[dtype.replace("_fast", "")]}
        if dtype.endswith("_fast"):
            options["fp8_optimizations"] = True
        model = comfy.sd.load_diffusion_model_state_dict(dict(weights), model_options=options)
        if dtype.endswith("_fast"):
            model.model.diffusion_model.eval()  # fp8_ops uses _scaled_mm only in eval mode (see the docstring)
        return model

    def flux_rows(label, dtype, configs, steps, base, merged=None):
        for config in configs:
            def row(config=config):
                extra = {"pooled_output": pooled, "guidance": 3.5}
                model = merged if config == "merged" else base
                if config in ("oe", "oe_sra"):
                    model, mapping = nodes_oe.apply_omnieraser_lora(base, lora, 1.0)
                    assert not mapping.unmatched
                if config != "plain":
                    extra[nodes_oe.CONDITION_KEY] = condition
                if config == "oe_sra":
                    model = nodes_sra.SelfRectifyingAttention(mask, nodes_sra.FLUX).apply_to(model)
                cond = [[context, extra]]
                return timed_sample(model, cond, cond, latent, 1.0, 2 if cuda else 1, steps, cuda, counters)
            attempt(label, config, dtype, row)

    if group == "flux":
        for dtype in ("fp8", "bf16", "fp8_fast"):
            started = time.perf_counter()
            base = load(dtype)
            log(f"   loaded the {dtype} model in {time.perf_counter() - started:.1f} s")
            flux_rows("full", dtype, ("plain", "oe", "oe_sra"), args.steps, base)
            del base
        return 0

    # caps: one process, the allocator cap and ComfyUI's reserve set per cap (mm.EXTRA_RESERVED_VRAM is what
    # --reserve-vram sets; ComfyUI reads it at every load)
    started = time.perf_counter()
    base = load("fp8")
    widened = dict(sd)  # a merged OmniEraser FLUX: img_in 256 wide, no patches (values do not matter here)
    widened["img_in.weight"] = torch.nn.functional.pad(sd["img_in.weight"], (0, 192))
    merged = nodes_merge.omnieraser_merged_model(load("fp8", widened))
    log(f"   loaded the fp8 model and the merged one in {time.perf_counter() - started:.1f} s")
    for label, cap in CAPS.items():
        if cuda:
            reserve = total_gib - cap + 2  # ComfyUI needs 2 GiB of margin under a hard cap
            mm.EXTRA_RESERVED_VRAM = int(reserve * 2**30)
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total_gib))
            log(f"   {label}: allocator capped at {cap} GiB of {total_gib:.1f}, --reserve-vram {reserve:.2f}")
        flux_rows(label, "fp8", ("plain", "oe", "merged"), args.cap_steps, base, merged)
    return 0


def build_sdxl(cuda, device):
    """SDXL's UNet with random weights through ComfyUI's loader on CUDA; on CPU a tiny SD1.5-layout one."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    if cuda:
        import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
        import comfy.ops
        meta = openaimodel.UNetModel(**SDXL_UNET, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
        weights = {k: v.cpu() for k, v in bench_helpers().random_weights(meta, device).items()}
        return comfy.sd.load_diffusion_model_state_dict(weights)
    config = comfy.supported_models.SD15(dict(TINY_SD_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.3 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.05))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


if __name__ == "__main__":
    sys.exit(main())
