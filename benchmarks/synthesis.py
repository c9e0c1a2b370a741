"""Syn4Removal synthesis speed: samples/s per worker at 512 px for each blending mode, and the 1 → 2 worker
speed-up (sample making + PNG writing, no model inference). CLIP scoring is timed separately, per instance,
on a randomly initialised CLIP of the real ViT-L/14 size (``--clip large``) or a tiny one (default).

    python benchmarks/synthesis.py [--samples 24] [--clip tiny|large|none]

Uses ../shared/data (instances from images/masked and images/syn_triplets, backgrounds from
images/removal_pairs, upscaled to 512 where their short side is smaller).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ERASEKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _plan(blend, samples, size):
    from erasekit.dataset_tools import instances as inst
    from erasekit.dataset_tools import synth

    images = DATA / "images"
    found = inst.folder_instances(images / "masked") + inst.folder_instances(images / "syn_triplets")
    backgrounds, obstacles, _ = synth.collect_backgrounds(images / "removal_pairs")
    config = synth.SynthConfig(size=size, min_side=256, blend=blend)
    return synth.build_plan(backgrounds, obstacles, found, config, seed=0, num_samples=samples,
                            filters={"use_class_count": False}), found


def _rate(plan, workers):
    from erasekit.dataset_tools import synth

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        summary = synth.run_synthesis(plan, folder, workers=workers)
        elapsed = time.perf_counter() - start
    assert summary["written"] == plan.num_samples, summary
    return plan.num_samples / elapsed


def _clip_model(kind):
    import torch
    from transformers import CLIPConfig, CLIPModel

    if kind == "large":  # openai/clip-vit-large-patch14's architecture, random weights (no download)
        config = CLIPConfig(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14),
            projection_dim=768,
        )
    else:
        layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
        config = CLIPConfig(text_config=layers, vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config)


class _CharTokenizer:
    """Stands in for CLIPTokenizer (whose vocabulary would need a download): fixed-length ids."""

    def __call__(self, texts, padding=True, return_tensors="pt"):
        import torch

        ids = torch.tensor([[49406] + [ord(c) % 400 + 1 for c in t][:20] + [49407] for t in texts])
        return _Batch(input_ids=ids, attention_mask=torch.ones_like(ids))


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def time_clip(kind, found, repeats=3):
    from erasekit.dataset_tools import instances as inst
    from erasekit.dataset_tools.clip_score import ClipScorer

    scorer = ClipScorer(_clip_model(kind), _CharTokenizer())
    loaded = [inst.load_instance(i) for i in found]
    images, masks = [l[0] for l in loaded], [l[1] for l in loaded]
    names = [i.class_name for i in found]
    scorer.score(images[:1], masks[:1], names[:1])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        scorer._text_cache.clear()
        scorer.score(images, masks, names, batch_size=len(images))
    return (time.perf_counter() - start) / (repeats * len(images))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=24, help="samples per measurement (matting uses a third)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--clip", choices=["none", "tiny", "large"], default="tiny")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"shared data not found at {DATA}")
    print(f"cpu cores available: {len(os.sched_getaffinity(0))}, size {args.size}")
    print(f"{'blend':8s} {'1 worker (samples/s)':>22s} {'2 workers (samples/s)':>22s} {'speed-up':>9s}")
    found = None
    for blend in ("hard", "feather", "matting"):
        count = max(4, args.samples // 3) if blend == "matting" else args.samples
        plan, found = _plan(blend, count, args.size)
        _rate(_plan(blend, 2, args.size)[0], 1)  # warm-up: numba compilation, file caches
        one = _rate(plan, 1)
        two = _rate(plan, 2)
        print(f"{blend:8s} {one:22.2f} {two:22.2f} {two / one:8.2f}x")
    if args.clip != "none":
        per = time_clip(args.clip, found)
        print(f"CLIP scoring ({args.clip} random CLIP, CPU, batch of {len(found)}): {per * 1000:.1f} ms per instance")


if __name__ == "__main__":
    main()
