"""The scoring job of ``erasekit-eval``: results against references, per image and over the set.

References are a triplet dataset (``source/``, ``mask/``, ``target/``), RemovalBench's ``images/``, ``masks/``, ``gt/``,
or a plain folder of clean targets (with ``--masks``). Results are a folder of images named like the references
(what ``erasekit-run`` writes). PSNR / SSIM / PSNR inside and outside the dilated mask always; LPIPS, FID, CMMD and
ReMOVE when their weights are on this machine (see learned.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..dataset_tools.imageio import read_mask, read_rgb
from ..jobs import Host, MissingExtra, UsageError
from . import learned, report
from .folders import detect_layout, images_by_stem, layout_samples, pair_by_stem
from .metrics import pixel_metrics

DILATION = 16  # px: the OmniEraser example stitches 16 px beyond the mask; farther pixels should be untouched
OUTPUT = "erasekit-eval"


@dataclass
class EvalJob:
    results: Path
    reference: Path
    masks: Path | None = None
    out: Path | None = None  # default: RESULTS/erasekit-eval
    dilation: int = DILATION
    lpips_weights: Path | None = None
    lpips_net: str = "alex"
    fid_weights: Path | None = None
    clip: Path | None = None  # CMMD's CLIP folder
    sam: Path | None = None  # ReMOVE's segment-anything checkpoint
    device: str = "cpu"
    worst_by: str = "psnr"


@dataclass
class EvalReport:
    rows: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    markdown: str = ""

    @property
    def ok(self):
        return self.counts.get("scored", 0) > 0 and not self.counts.get("missing") and not self.counts.get("failed")


def reference_samples(job):
    """The reference samples (photo, mask, clean target) of ``job.reference``; ``--masks`` replaces its masks."""
    layout = detect_layout(job.reference)
    if layout.kind == "folder":
        samples = pair_by_stem(targets=layout.root, masks=job.masks)
    elif job.masks is not None:
        samples = pair_by_stem(images=layout.images, masks=job.masks, targets=layout.targets)
    else:
        samples = layout_samples(layout)
    samples = [s for s in samples if s.target is not None or s.mask is not None]
    if not samples:
        raise UsageError(f"{job.reference} holds no references: a triplet dataset, a folder with gt/ (and images/, "
                         "masks/), or a folder of clean images")
    return samples


def _optional(build, explicit, name, notes):
    """A learned metric, or None with a note when its weights or package are absent and nobody asked for it."""
    try:
        return build()
    except (learned.WeightsNotFound, MissingExtra) as error:
        if explicit:
            raise UsageError(str(error)) from None
        notes.append(f"{name} not computed: {error}")
        return None


def evaluate(job, host=None):
    """Score ``job.results`` against ``job.reference``; writes the CSV, Markdown and PNG; returns the report."""
    host = host or Host()
    if job.worst_by not in report.METRICS:
        raise UsageError(f"--worst-by {job.worst_by!r} is not one of {', '.join(report.METRICS)}")
    samples = reference_samples(job)
    results = images_by_stem(job.results)
    out = Path(job.out) if job.out else Path(job.results) / OUTPUT
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    has_targets = any(s.target is not None for s in samples)
    has_masks = any(s.mask is not None for s in samples)
    lpips = fid = clip = remove = None
    if has_targets:
        lpips = _optional(lambda: learned.Lpips(job.lpips_weights, job.lpips_net, job.device),
                          job.lpips_weights is not None, "LPIPS", notes)
        fid = _optional(lambda: learned.Fid(job.fid_weights, job.device), job.fid_weights is not None, "FID", notes)
        if job.clip is not None:
            clip = _optional(lambda: learned.ClipEmbedder(job.clip, job.device), True, "CMMD", notes)
        else:
            notes.append(f"CMMD not computed: give --clip FOLDER (CLIP ViT-L/14-336, {learned.CLIP_URL})")
    else:
        notes.append("no clean targets in the reference: PSNR, SSIM, LPIPS, FID and CMMD need them")
    if job.sam is not None:
        remove = _optional(lambda: learned.Remove(job.sam, job.device), True, "ReMOVE", notes)
    elif has_masks:
        notes.append(f"ReMOVE not computed: give --sam CHECKPOINT (segment-anything, {learned.SAM_URL})")
    if not has_masks:
        notes.append("no masks: PSNR inside / outside the mask and ReMOVE need them (--masks DIR)")

    rows, embeddings = [], ([], [])
    counts = {"scored": 0, "missing": 0, "failed": 0}
    host.progress(0, len(samples), "images")
    for index, sample in enumerate(samples):
        host.check_interrupt()
        row = {"id": sample.id}
        rows.append(row)
        try:
            path = results.get(sample.id)
            if path is None:
                raise _Unscored("missing", "no result with this name")
            result, reason = read_rgb(path)
            if result is None:
                raise _Unscored("failed", f"result: {reason}")
            target = mask = None
            if sample.target is not None:
                target, reason = read_rgb(sample.target)
                if target is None:
                    raise _Unscored("failed", f"reference: {reason}")
                if target.shape != result.shape:
                    raise _Unscored("failed", f"the result is {result.shape[1]}×{result.shape[0]} but the reference "
                                              f"is {target.shape[1]}×{target.shape[0]}")
            if sample.mask is not None:
                mask, reason = read_mask(sample.mask)
                if mask is None:
                    raise _Unscored("failed", f"mask: {reason}")
                if mask.shape != result.shape[:2]:
                    raise _Unscored("failed", f"the mask is {mask.shape[1]}×{mask.shape[0]} but the result is "
                                              f"{result.shape[1]}×{result.shape[0]}")
            if target is not None:
                row.update(pixel_metrics(result, target, mask, job.dilation))
                if lpips is not None:
                    row["lpips"] = lpips(result, target)
                if fid is not None:
                    fid.add(target, real=True)
                    fid.add(result, real=False)
                if clip is not None:
                    embeddings[0].append(clip(target))
                    embeddings[1].append(clip(result))
            if remove is not None and mask is not None:
                row["remove"] = remove(result, mask)
            counts["scored"] += 1
        except _Unscored as unscored:
            counts[unscored.kind] += 1
            row["note"] = unscored.reason
            host.log(f"{sample.id}: {unscored.reason}")
        host.progress(index + 1, len(samples), "images")

    keys = [k for k in report.METRICS if any(isinstance(r.get(k), float) for r in rows)]
    dataset = {}
    if fid is not None:
        dataset["fid"] = fid.compute()
        if math.isnan(dataset["fid"]):
            notes.append("FID needs at least two scored images")
    if clip is not None:
        dataset["cmmd"] = learned.mmd(embeddings[0], embeddings[1]) if embeddings[0] else math.nan
    summary = report.summarize(rows, keys)
    markdown = report.summary_markdown(summary, dataset, counts, notes)
    files = {"csv": out / "per_image.csv", "markdown": out / "summary.md", "png": out / "report.png"}
    report.write_atomic(files["csv"], report.per_image_csv(rows, keys).encode("utf-8"))
    report.write_atomic(files["markdown"], (f"# erasekit-eval: {job.results} against {job.reference}\n\n"
                                            + markdown).encode("utf-8"))
    by_id = {s.id: s for s in samples}
    worst_key = job.worst_by if job.worst_by in keys else (keys[0] if keys else job.worst_by)
    worst = report.worst_rows(rows, worst_key) if keys else []
    report.save_png(report.render_report(rows, keys, worst, lambda r: _images_of(by_id[r["id"]], results), worst_key),
                    files["png"])
    return EvalReport(rows, keys, summary, dataset, notes, counts, files, markdown)


def _images_of(sample, results):
    def load(path, reader):
        return None if path is None else reader(path)[0]

    return {"photo": load(sample.image, read_rgb), "mask": load(sample.mask, read_mask),
            "result": load(results.get(sample.id), read_rgb), "reference": load(sample.target, read_rgb)}


class _Unscored(Exception):
    def __init__(self, kind, reason):
        super().__init__(reason)
        self.kind, self.reason = kind, reason
