"""The folder job of ``erasekit-run``: one workflow over every photo/mask pair, through one ComfyUI executor.

Per item: check the photo and the mask (a bad file is a counted skip with its reason), stage them where ComfyUI's
LoadImage reads them, rebind the workflow's loaders and SaveImage nodes, execute, and move the saved image into
the output folder. One ``PromptExecutor`` serves the whole folder: its cache keeps the outputs of every node whose
inputs did not change (the model loaders, the text encoders), so models load once, not once per image.

Nothing is lost when the process dies: ComfyUI writes into a staging folder inside the output folder and each
result is renamed into place (``os.replace``) only when complete, the item's extra results first and its main
result ``<id>.png`` last, so ``<id>.png`` present means the item is done (what ``--resume`` checks).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..dataset_tools import imageio
from ..dataset_tools.imageio import IMAGE_EXTENSIONS, UNREADABLE, read_mask
from ..evaluation.folders import detect_layout, layout_samples, pair_by_stem
from ..evaluation.report import save_png  # through .<name>.partial, which a resumed run clears away
from ..jobs import Host, UsageError
from ..segment.text_masks import BOX_THRESHOLD, TEXT_THRESHOLD
from . import binding as B
from .runtime import PromptFailed
from .workflow import WorkflowError, apply_overrides, load_workflow, missing_models, parse_override, \
    workflow_to_prompt

STAGING = ".erasekit-run"  # inside the output folder: same file system, so results are renamed in atomically
LOCK = ".erasekit-run.lock"
LOG = "erasekit-run.jsonl"  # one record per item handled: status, reason, result files, seconds
MASKS = "masks"  # masks made from --prompt, kept beside the results
ITEMS = "erasekit-run"  # sub-folder of ComfyUI's temp and output folders (both in the staging area) per item

DONE, RESUMED, SKIPPED, FAILED = "done", "resumed", "skipped", "failed"


@dataclass
class RunJob:
    """Settings of one ``erasekit-run`` (the command's flags)."""

    workflow: Path
    out: Path
    images: Path
    masks: Path | None = None
    prompt: str | None = None  # masks from text instead of files
    overrides: list = field(default_factory=list)  # "[NODE.]INPUT=VALUE"
    resume: bool = False
    image_node: str | None = None
    mask_node: str | None = None
    box_threshold: float = BOX_THRESHOLD
    text_threshold: float = TEXT_THRESHOLD


@dataclass
class ItemResult:
    id: str
    status: str  # DONE, RESUMED, SKIPPED, FAILED
    reason: str = ""
    outputs: list = field(default_factory=list)
    seconds: float = 0.0
    cached_nodes: frozenset = frozenset()  # nodes ComfyUI did not run again for this item (kept from before)


@dataclass
class RunReport:
    items: list = field(default_factory=list)
    binding: B.Binding | None = None

    def count(self, status):
        return sum(1 for item in self.items if item.status == status)

    def reasons(self):
        """``{reason: count}`` over skipped and failed items."""
        return Counter(item.reason for item in self.items if item.status in (SKIPPED, FAILED))

    @property
    def ok(self):
        """Every item has its result and at least one exists."""
        return (self.count(SKIPPED) + self.count(FAILED) == 0) and (self.count(DONE) + self.count(RESUMED) > 0)

    def summary(self):
        text = (f"{self.count(DONE)} done, {self.count(RESUMED)} already done, {self.count(SKIPPED)} skipped, "
                f"{self.count(FAILED)} failed")
        reasons = self.reasons()
        if reasons:
            text += " (" + "; ".join(f"{n}× {reason}" for reason, n in reasons.most_common()) + ")"
        return text


# ------------------------------------------------------------------------------------------------ preparing
def prepare_prompt(runtime, job):
    """The workflow as an API prompt with the job's overrides, after checking its models are there."""
    workflow, prompt = load_workflow(job.workflow)
    if workflow is not None:
        missing = missing_models(workflow, runtime.find_model)
        if missing:
            raise UsageError("the workflow's models are missing from this ComfyUI's model folders: " + "; ".join(
                f"{name} in models/{folder}" + (f" (download: {url})" if url else "") for folder, name, url in missing))
        prompt = workflow_to_prompt(workflow, runtime.object_info)
    unknown = sorted({e["class_type"] for e in prompt.values()} - set(runtime.object_info))
    if unknown:
        raise UsageError(f"the workflow uses node types this ComfyUI does not have: {', '.join(unknown)} (install "
                         "their custom nodes and pass --custom-nodes)")
    return apply_overrides(prompt, [parse_override(text) for text in job.overrides])


def find_samples(job):
    """(samples, needs_mask) for the job's inputs: a triplet dataset, RemovalBench's images/ + masks/, or an
    image folder with ``--masks``; masks from ``--prompt`` replace mask files."""
    layout = detect_layout(job.images)
    if layout.images is None:
        raise UsageError(f"{job.images} holds no photos (a triplet dataset needs source/, RemovalBench's layout "
                         "images/)")
    if layout.kind == "folder" or job.masks is not None:
        samples = pair_by_stem(images=layout.images, masks=job.masks if job.masks is not None else layout.masks)
    else:
        samples = layout_samples(layout)
    samples = [s for s in samples if s.image is not None]
    if not samples:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {layout.images}")
    masks_given = job.masks is not None or layout.masks is not None
    return samples, bool(job.prompt) or masks_given


# ------------------------------------------------------------------------------------------------ inputs
def open_photo(path):
    """(PIL image as ComfyUI's LoadImage sees it: EXIF rotation applied, None) or (None, reason)."""
    image, reason = imageio._open_fully(path)[:2]
    if image is None:
        return None, reason
    with image:
        try:
            return ImageOps.exif_transpose(image), None
        except (OSError, ValueError, SyntaxError):
            return None, UNREADABLE


def mask_rgba(mask):
    """A bool mask as RGBA that every mask loader reads the same: RGB = mask (LoadImageMask red/green/blue,
    LoadImage → ImageToMask), alpha = inverted mask (LoadImageMask alpha, LoadImage's MASK output)."""
    value = mask.astype(np.uint8) * 255
    return Image.fromarray(np.dstack([value, value, value, 255 - value]), "RGBA")


class Folder:
    """The output folder while a run holds it: a lock (one run per folder), the staging area, the item log."""

    def __init__(self, out, resume):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UsageError(f"another erasekit-run is writing {self.out}") from None
        self.staging = self.out / STAGING
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left half-made
        self.items = self.staging / "temp" / ITEMS  # per-item inputs, as "erasekit-run/<n>/image.png [temp]"
        self.items.mkdir(parents=True)
        (self.staging / "output").mkdir()
        for stale in [*self.out.glob(".*.partial"), *(self.out / MASKS).glob(".*.partial")]:
            stale.unlink(missing_ok=True)
        self.resume = resume
        self._log = open(self.out / LOG, "a", encoding="utf-8")

    def result(self, item_id):
        return self.out / f"{item_id}.png"

    def log(self, result):
        record = {"id": result.id, "status": result.status, "reason": result.reason, "outputs": result.outputs,
                  "seconds": round(result.seconds, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self):
        self._log.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


# ------------------------------------------------------------------------------------------------ the loop
class FolderRunner:
    """Runs one prepared workflow over samples on one executor (models stay loaded between items)."""

    def __init__(self, runtime, prompt, binding, folder, masker=None, text=None, thresholds=(BOX_THRESHOLD, TEXT_THRESHOLD)):
        self.runtime = runtime
        self.prompt = prompt
        self.binding = binding
        self.folder = folder
        self.masker = masker
        self.text = text
        self.thresholds = thresholds
        self.executor = runtime.new_executor()
        self.output_nodes = None
        self.samples = []

    def stage(self, sample, sequence):
        """(image name, mask name) as LoadImage reads them (in ComfyUI's temp folder), or raises ``_Skip``."""
        photo, reason = open_photo(sample.image)
        if photo is None:
            raise _Skip(f"{reason}: {sample.image.name}")
        width, height = photo.size
        folder = self.folder.items / f"{sequence:06d}"
        folder.mkdir()
        if self.masker is not None:
            mask = self.masker(np.asarray(photo.convert("RGB")), self.text, *self.thresholds).union()
            if not mask.any():
                raise _Skip(f"nothing matched the prompt {self.text!r}")
            (self.folder.out / MASKS).mkdir(exist_ok=True)
            save_png(Image.fromarray(mask.astype(np.uint8) * 255, "L"), self.folder.out / MASKS / f"{sample.id}.png")
        elif self.binding.mask_node is not None:
            if sample.mask is None:
                raise _Skip("no mask with this name")
            mask, reason = read_mask(sample.mask)
            if mask is None:
                raise _Skip(f"{reason}: {sample.mask.name}")
            if mask.shape != (height, width):
                raise _Skip(f"mask size differs from the image (mask {mask.shape[1]}×{mask.shape[0]}, image "
                            f"{width}×{height})")
        else:
            mask = None
        name = f"{ITEMS}/{sequence:06d}"  # relative to ComfyUI's temp folder
        if self.binding.mask_kind == B.MASK_IN_ALPHA:
            composed = photo.convert("RGB")
            composed.putalpha(Image.fromarray(255 - mask.astype(np.uint8) * 255, "L"))
            composed.save(folder / "image.png")
            return f"{name}/image.png [temp]", None
        (folder / f"image{sample.image.suffix.lower()}").symlink_to(Path(sample.image).resolve())
        if mask is not None:
            mask_rgba(mask).save(folder / "mask.png")
        return f"{name}/image{sample.image.suffix.lower()} [temp]", f"{name}/mask.png [temp]"

    def process(self, sample, sequence):
        """One item start to end: kept when resuming and its result exists, else run, cleaned up and logged."""
        if self.folder.resume and self.folder.result(sample.id).exists():
            return ItemResult(sample.id, RESUMED)
        try:
            result = self.run_item(sample, sequence)
        finally:
            self.clean(sequence)
        self.folder.log(result)
        return result

    def run_item(self, sample, sequence):
        """Execute the workflow for one sample and move its results into place; returns the ``ItemResult``."""
        started = time.perf_counter()
        try:
            image_name, mask_name = self.stage(sample, sequence)
        except _Skip as skip:
            return ItemResult(sample.id, SKIPPED, str(skip), seconds=time.perf_counter() - started)
        prompt = B.bind(self.prompt, self.binding, image_name, mask_name, f"{ITEMS}/{sequence:06d}")
        if self.output_nodes is None:
            self.output_nodes = self.runtime.validate(prompt)  # a refused workflow stops the whole run
        try:
            execution = self.runtime.run(prompt, self.executor, self.output_nodes)
        except PromptFailed as error:
            reason = f"{error.node_type} failed: {first_line(error.exception_message) or first_line(str(error))}"
            return ItemResult(sample.id, FAILED, reason, seconds=time.perf_counter() - started)
        outputs = self.collect(sample.id, execution)
        if not outputs:
            return ItemResult(sample.id, FAILED, "the SaveImage nodes received no image",
                              seconds=time.perf_counter() - started)
        return ItemResult(sample.id, DONE, outputs=outputs, seconds=time.perf_counter() - started,
                          cached_nodes=frozenset(execution.cached_nodes))

    def collect(self, item_id, execution):
        """Rename the files the SaveImage nodes wrote into the output folder: extras first, ``<id>.png`` last."""
        moves = []
        for index, node_id in enumerate(self.binding.save_nodes):
            for k, path in enumerate(execution.saved_files(node_id)):
                name = f"{item_id}.png" if (index, k) == (0, 0) else f"{item_id}-{node_id}-{k}.png"
                moves.append((path, self.folder.out / name))
        for source, target in sorted(moves, key=lambda m: m[1].name == f"{item_id}.png"):
            os.replace(source, target)
        return [target.name for _, target in moves]

    def clean(self, sequence):
        """Drop the item's staged inputs and whatever its nodes left in the output and temp folders."""
        shutil.rmtree(self.folder.items / f"{sequence:06d}", ignore_errors=True)
        shutil.rmtree(self.folder.staging / "output" / ITEMS / f"{sequence:06d}", ignore_errors=True)
        for leftover in (self.folder.staging / "temp").iterdir():  # PreviewImage files
            if leftover.name != ITEMS:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def first_line(text):
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


class _Skip(Exception):
    """A sample that cannot run (bad file, size mismatch, nothing found); the message is the reason."""


@contextmanager
def open_run(runtime, job, text_masker=None):
    """A ``FolderRunner`` for ``job``, holding the output folder (lock, staging area, ComfyUI's output and temp
    folders pointed into it) until the block ends; ``runner.samples`` are the items, in order."""
    import folder_paths

    try:
        prompt = prepare_prompt(runtime, job)
    except WorkflowError as error:
        raise UsageError(str(error)) from None
    samples, needs_mask = find_samples(job)
    binding = B.find_binding(prompt, needs_mask, job.image_node, job.mask_node)
    if job.prompt and text_masker is None:
        raise UsageError("--prompt needs GroundingDINO and SAM 2 models (text_masker)")
    folder = Folder(job.out, job.resume)
    saved_dirs = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    try:
        done_before = [s.id for s in samples if folder.result(s.id).exists()]
        if done_before and not job.resume:
            raise UsageError(f"{folder.out} already holds results for {len(done_before)} of these images (e.g. "
                             f"{done_before[0]}.png): pass --resume to keep them and do the rest, or choose an "
                             "empty folder")
        folder_paths.set_output_directory(str(folder.staging / "output"))
        folder_paths.set_temp_directory(str(folder.staging / "temp"))
        runner = FolderRunner(runtime, prompt, binding, folder, text_masker, job.prompt,
                              (job.box_threshold, job.text_threshold))
        runner.samples = samples
        yield runner
    finally:
        folder_paths.set_output_directory(saved_dirs[0])
        folder_paths.set_temp_directory(saved_dirs[1])
        folder.close()


def run_folder(runtime, job, host=None, text_masker=None):
    """Run ``job`` on a started ComfyUI ``runtime``; returns the ``RunReport`` (per-item errors are in it).

    ``text_masker``: what ``--prompt`` uses to make masks (``segment.text_masks.TextMasker``); required with it."""
    host = host or Host()
    with open_run(runtime, job, text_masker) as runner:
        report = RunReport(binding=runner.binding)
        host.progress(0, len(runner.samples), "images")
        for sequence, sample in enumerate(runner.samples):
            host.check_interrupt()
            result = runner.process(sample, sequence)
            if result.status in (SKIPPED, FAILED):
                host.log(f"{sample.id}: {result.status}: {result.reason}")
            report.items.append(result)
            host.progress(sequence + 1, len(runner.samples), "images")
    return report
