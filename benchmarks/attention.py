"""Self-rectifying attention vs plain attention: time and peak memory as ratios, measured in one run.

Cases (what a 512x512 image gives):
- SD1.5, top UNet level: 64x64 = 4096 tokens, 8 heads x 40, batch 2 (cond + uncond).
- FLUX: 512 text + 32x32 = 1024 image tokens, 24 heads x 128, batch 1.
The mask is the real dog_bench mask from ../shared/data (binarised, any-coverage to each token grid), or a
centred ellipse when the data is absent; its token coverage is printed, since it sets how the queries split
between the plain and the masked calls.

The strategy is the one the node picks for the device (``core.strategy_for``; ``--strategy`` forces one, e.g. to
dry-run the CUDA form on CPU):
- ``row_groups`` (CPU): every query is computed once. The outside queries go through the plain back-end in groups
  of at most ``QUERY_CHUNK`` (768) rows, the inside queries through one SDPA call per group with a boolean key
  row, so the extra time is the gathers of non-contiguous groups, the scatter into the output, and the CPU kernel's
  lower efficiency for small query sets (SDPA's CPU kernel runs fewer than 768 queries in 32- or 64-row blocks,
  12-25 % slower per query than its 256-row blocks). The extra memory is one group's gathered queries and output.
- ``gathered_keys`` (CUDA, other accelerators): the plain back-end once over all queries, then one dense SDPA call
  (no mask: flash-eligible) of the inside queries over the gathered outside keys/values, scattered over their rows.
  Extra FLOPs f(1-f) of the plain call's for a masked fraction f; extra memory the gathered keys and values (about
  2(1-f) of one input), or 1/n of that in ``--head-groups`` n dense calls. The token indices are computed once before timing,
  as the node computes them once per token grid for a whole sampling run.

Both variants run exactly what the ComfyUI patch runs: plain = ComfyUI's attention_pytorch (view, SDPA,
transpose back); patched = the core function with attention_pytorch's steps as its back-end
(``skip_output_reshape`` for row groups, the plain step itself as the gathered form's full call).

Time: the fastest of interleaved repeats after a warm-up (the run least disturbed by other processes on a
shared machine), as wall clock and as process CPU time; the median wall time is printed too.
Peak memory, of one step including the creation of its inputs (live in both variants):
- CUDA: ``torch.cuda.max_memory_allocated`` over the step.
- CPU: torch's profiler records every tensor allocation and free of the step (``profile_memory``);
  ``export_memory_timeline`` replays them into bytes alive over time and the maximum is the peak. This counts
  exactly the tensors torch allocates (SDPA's workspaces included), not allocator caching or resident-set noise.

Usage: python benchmarks/attention.py [--repeats 7] [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                                     [--strategy row_groups|gathered_keys] [--head-groups N]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pack import import_checkout  # noqa: E402

import_checkout()
from erasekit.erasers import attention as core  # noqa: E402  (this checkout's, whatever else is installed)

SHARED_MASK = Path(os.environ.get("ERASEKIT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "images" / "masked" / "dog_bench_mask.png"
# heads_first: FLUX hands attention [B, H, L, D] tensors (skip_reshape=True); UNets hand [B, L, H*D].
CASES = {
    "sd15_512": dict(batch=2, heads=8, dim=40, text=0, grid=(64, 64), latent=(64, 64), heads_first=False),
    "flux_512": dict(batch=1, heads=24, dim=128, text=512, grid=(32, 32), latent=(64, 64), heads_first=True),
}


def load_mask():
    """``[1,512,512]`` float mask and where it came from."""
    if SHARED_MASK.is_file():
        import numpy as np
        from PIL import Image
        m = np.asarray(Image.open(SHARED_MASK).convert("L").resize((512, 512)), dtype=np.float32) / 255.0
        return torch.from_numpy(m)[None], str(SHARED_MASK.name)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 512), torch.linspace(-1, 1, 512), indexing="ij")
    return ((yy / 0.55) ** 2 + (xx / 0.35) ** 2 <= 1).float()[None], "synthetic ellipse"


def blocked_for(case, mask):
    latent = core.latent_mask(mask, *case["latent"])
    grid = core.grid_mask(latent, *case["grid"])
    length = case["text"] + case["grid"][0] * case["grid"][1]
    return core.blocked_tokens(grid, length, case["text"])


def make_inputs(case, device, dtype, seed=0):
    length = case["text"] + case["grid"][0] * case["grid"][1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    if case["heads_first"]:
        shape = (case["batch"], case["heads"], length, case["dim"])
    else:
        shape = (case["batch"], length, case["heads"] * case["dim"])
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]


def _heads(q, k, v, heads):
    if q.ndim == 4:  # already [B, H, L, D]
        return q, k, v
    return tuple(core.split_heads(t, heads) for t in (q, k, v))


def plain_step(q, k, v, heads):
    """ComfyUI's attention_pytorch: [B, L, H*D] (or, skip_reshape, [B, H, L, D]) in, [B, L, H*D] out."""
    qh, kh, vh = _heads(q, k, v, heads)
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(qh.shape[0], qh.shape[2], -1)


class Patched:
    """The SRA step by one strategy; ``prepare`` does, before timing, what the node does once per token grid."""

    def __init__(self, strategy, head_groups=1):
        self.strategy = strategy
        self.head_groups = head_groups

    def prepare(self, blocked):
        return core.token_split(blocked) if self.strategy == core.GATHERED_KEYS else blocked

    def __call__(self, q, k, v, heads, prepared):
        qh, kh, vh = _heads(q, k, v, heads)
        if self.strategy == core.GATHERED_KEYS:
            return core.rectified_attention_gathered(qh, kh, vh, prepared, full=lambda: plain_step(q, k, v, heads),
                                                     head_groups=self.head_groups)
        # the default plain back-end, SDPA on each group of query rows, is attention_pytorch with skip_output_reshape
        return core.self_rectifying_attention(qh, kh, vh, prepared)


def run_variant(case, variant, prepared, device, dtype, patched):
    q, k, v = make_inputs(case, device, dtype)
    if variant == "plain":
        return plain_step(q, k, v, case["heads"])
    return patched(q, k, v, case["heads"], prepared)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_both(case, prepared, device, dtype, repeats, patched):
    q, k, v = make_inputs(case, device, dtype)
    steps = {"plain": lambda: plain_step(q, k, v, case["heads"]), "sra": lambda: patched(q, k, v, case["heads"], prepared)}
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    with torch.inference_mode():
        for fn in steps.values():
            fn()
        for _ in range(repeats):
            for name, fn in steps.items():
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync(device)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    # The minimum is the run least disturbed by other processes; the median is printed alongside.
    return ({name: min(t) for name, t in wall.items()}, {name: min(t) for name, t in cpu.items()},
            {name: statistics.median(t) for name, t in wall.items()})


def peak_memory(case, variant, prepared, device, dtype, patched):
    """Peak bytes of live tensors over one step, the step's inputs included (see the module docstring)."""
    with torch.inference_mode():
        run_variant(case, variant, prepared, device, dtype, patched)  # warm-up: lazily initialised kernels
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run_variant(case, variant, prepared, device, dtype, patched)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            out = run_variant(case, variant, prepared, device, dtype, patched)
            del out
    with tempfile.TemporaryDirectory() as tmp:
        timeline = os.path.join(tmp, "memory.json")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof.export_memory_timeline(timeline, device="cpu")
        with open(timeline) as f:
            _, sizes = json.load(f)
    return max(sum(by_category) for by_category in sizes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--strategy", choices=[core.ROW_GROUPS, core.GATHERED_KEYS], default=None,
                        help="default: the one the node picks for the device")
    parser.add_argument("--head-groups", type=int, default=None,
                        help="gathered form: dense calls per attention, each over a share of the heads "
                        "(default: core.GATHER_HEAD_GROUPS)")
    args = parser.parse_args()
    dtype_name = args.dtype or ("float16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    strategy = args.strategy or core.strategy_for(args.device)
    patched = Patched(strategy, args.head_groups or core.GATHER_HEAD_GROUPS)
    mask, source = load_mask()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {args.device} ({device_name}), {dtype_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, mask: {source}, {args.repeats} timed repeats")
    print(f"SRA strategy {strategy}" + (f", heads in {patched.head_groups} dense calls" if strategy == core.GATHERED_KEYS else ""))
    print("time: fastest of the interleaved repeats (wall clock and process CPU time); median wall in brackets")
    print(f"{'case':10} {'tokens':>6} {'masked':>7} {'plain ms':>16} {'SRA ms':>16} {'time x':>7} {'cpu x':>6} "
          f"{'plain MiB':>9} {'SRA MiB':>8} {'memory x':>8}")
    for name, case in CASES.items():
        blocked = blocked_for(case, mask)
        coverage = blocked.float().mean().item()
        prepared = patched.prepare(blocked.to(args.device))
        wall, cpu, median = time_both(case, prepared, args.device, dtype, args.repeats, patched)
        peaks = {v: peak_memory(case, v, prepared, args.device, dtype, patched) for v in ("plain", "sra")}
        print(f"{name:10} {blocked.shape[1]:6d} {coverage:7.1%} "
              f"{wall['plain'] * 1e3:7.1f} [{median['plain'] * 1e3:6.1f}] {wall['sra'] * 1e3:7.1f} [{median['sra'] * 1e3:6.1f}] "
              f"{wall['sra'] / wall['plain']:7.3f} {cpu['sra'] / cpu['plain']:6.3f} "
              f"{peaks['plain'] / 2**20:9.1f} {peaks['sra'] / 2**20:8.1f} {peaks['sra'] / peaks['plain']:8.3f}")
    print("targets: time x <= 1.15, memory x <= 1.10")


if __name__ == "__main__":
    main()
