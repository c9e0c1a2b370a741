"""Syn4Removal synthesis as one job: the settings of a run and the one function that runs it, for every host.

``run_synth_job(SynthJob, host)`` collects instances (COCO files, image + mask folders, SAM proposals), scores
them with CLIP when a model is given, filters them, and pastes them onto the backgrounds into a triplet dataset
(``synth.py`` holds the algorithm). The ``erasekit-synth`` command and the *Build Removal Dataset (Syn4Removal
paste)* node both call it, so the same settings give the same dataset, byte for byte.

The scored instance table is cached as ``<output>/instances.json`` under a key of its sources and models (a
resumed or sharded run does not score a million instances again); the run summary is written as
``summary.json`` (``summary-shard-i-of-N.json`` for a shard), also when an error stops the run.

The recipe (seed, crop size, blend, filters, models: ``SynthJob.settings``) is the dataset's (``dataset.json``):
a folder that holds samples is continued only with ``resume`` and the same recipe, or with ``append`` (each new
sample then records its recipe). The settings are checked before any instance is collected, and a run that stops
on an error before writing a sample leaves no output folder behind.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..jobs import Host, Skips, UsageError, check_input, check_output_folder, fingerprint
from . import instances as inst
from . import synth
from .scale import backend as scale_backend
from .shards import SHARD_SIZE, check_output_format, open_writer, read_json, write_output_json, write_shard_stats
from .sources import check_source, is_url
from .triplets import parse_shard, remove_unused_output, shard_file_name

INSTANCE_CACHE = "instances.json"


@dataclass
class SynthJob:
    """A synthesis run: what the ``erasekit-synth`` flags and the dataset node's inputs set (same names)."""

    backgrounds: str  # folder of background photos (searched recursively)
    output: str  # the triplet dataset folder to create or resume
    instances: list = field(default_factory=list)  # folders of image + mask pairs (sub-folders are classes)
    coco: list = field(default_factory=list)  # COCO instance annotation files (polygons or RLE)
    coco_images: list = field(default_factory=list)  # the image folder of each COCO file, in the same order
    background_annotations: str | None = None  # COCO file of the backgrounds: small objects are obstacles
    sam_model: str | None = None  # SAM / SAM 2 weights proposing instance masks on ``sam_images``
    sam_images: list = field(default_factory=list)  # folders of photos for SAM proposals
    sam_points: int = 16  # SAM point grid per side
    sam_score: float = 0.7  # minimum predicted IoU of a SAM proposal
    class_name: str = "object"  # class of instances in a folder without class sub-folders
    num_samples: int | None = None  # samples to make; None = one per background
    size: int = 512  # crop size of the samples (official 512)
    min_side: int | None = None  # skip backgrounds whose short side is smaller; None = size
    blend: str = "matting"  # matting | feather | hard (official: matting)
    feather_px: float = 3.0  # width of the feathered edge for blend="feather"
    clip_model: str | None = None  # local transformers CLIP folder; without it the CLIP filter is off
    clip_filter: bool = True  # filter by CLIP score (when a CLIP model is given)
    area_filter: bool = True  # keep instances covering 5-95 % of their image
    class_filter: bool = True  # keep classes with at least ``min_class_instances`` instances
    min_class_instances: int = inst.MIN_CLASS_INSTANCES
    min_area: float = inst.MIN_AREA
    max_area: float = inst.MAX_AREA
    seed: int = 0  # sample i depends only on the seed and i
    workers: int = 1  # processes making samples
    shard: str | None = None  # "i/N": only samples with index % N == i, into the shard's own manifest
    resume: bool = False  # continue a folder that holds samples made with the same recipe
    append: bool = False  # add samples made with another recipe to a folder that holds samples (recorded per sample)
    device: str = "cpu"  # torch device of CLIP scoring and SAM (on Ray: a GPU actor pool where the cluster has GPUs)
    format: str = "folder"  # folder (source/ mask/ target/ + manifest) | webdataset (tar shards + parquet indices)
    shard_size: int = SHARD_SIZE  # samples per WebDataset shard
    ray: str | None = None  # run on Ray: "local" (a Ray on this machine) or a cluster address; None: this machine

    @property
    def use_clip(self):
        return bool(self.clip_model) and self.clip_filter

    def check(self):
        """UsageError for settings or inputs that cannot run, before any work (files or folders made)."""
        if self.shard is not None:
            try:
                parse_shard(self.shard)
            except ValueError as error:
                raise UsageError(str(error)) from None
        if self.workers < 1:
            raise UsageError(f"workers must be >= 1, got {self.workers}")
        check_output_format(self)
        if self.sam_images and is_url(str(self.output)):
            raise UsageError("SAM proposals are saved next to the dataset: give a local output folder with "
                             "--sam-images (or make the instances first, then write to the URL)")
        if self.num_samples is not None and self.num_samples < 1:
            raise UsageError(f"num_samples must be >= 1 (or unset: one per background), got {self.num_samples}")
        if len(self.coco) != len(self.coco_images):
            raise UsageError(f"{len(self.coco)} COCO annotation files but {len(self.coco_images)} image folders: "
                             "give one image folder per file")
        if self.sam_images and not self.sam_model:
            raise UsageError("SAM images need a SAM model (a SAM or SAM 2 transformers folder or checkpoint)")
        if not self.coco and not self.instances and not self.sam_images:
            raise UsageError("no instance source: give COCO annotations with their images, instance folders "
                             "(image + mask pairs), or a SAM model with SAM images")
        check_source(self.backgrounds, "background folder")
        for kind, paths in (("instance folder", self.instances), ("COCO image folder", self.coco_images),
                            ("SAM image folder", self.sam_images)):
            for path in paths:
                check_input(path, kind)
        for path in self.coco:
            check_input(path, "COCO annotation file", kind="file")
        if self.background_annotations:
            check_input(self.background_annotations, "background annotation file", kind="file")
        for kind, path in (("CLIP model", self.clip_model), ("SAM model", self.sam_model)):
            if path:
                check_input(path, kind, kind="any")
        if not is_url(str(self.output)):
            check_output_folder(self.output)
        try:
            synth.SynthConfig(size=self.size, min_side=self.min_side, blend=self.blend, feather_px=self.feather_px)
        except ValueError as error:
            raise UsageError(str(error)) from None

    def filters(self):
        """The official instance filters as this job switches and sets them."""
        return {"use_clip": self.use_clip, "use_area": self.area_filter, "use_class_count": self.class_filter,
                "min_area": self.min_area, "max_area": self.max_area, "min_class_instances": self.min_class_instances}

    def settings(self):
        """The dataset's recipe: what decides sample i besides the input files (a resumed run must match it).
        Models are named by their file or folder name, so a moved model folder is the same model."""
        config = synth.SynthConfig(size=self.size, min_side=self.min_side, blend=self.blend, feather_px=self.feather_px)
        return {"job": "syn4removal", "seed": self.seed, "config": config.to_json(), "filters": self.filters(),
                "class_name": self.class_name, "clip_model": self.clip_model and Path(self.clip_model).name,
                "sam": {"model": Path(self.sam_model).name, "points": self.sam_points, "score": self.sam_score}
                if self.sam_images else None}


def collect_instances(job, skips, host):
    """Every instance of the job's sources (COCO files, folders, SAM proposals saved under the output); files
    left out are named in ``skips`` (a ``jobs.Skips``)."""
    found = []
    for coco_file, images in zip(job.coco, job.coco_images):
        found += inst.coco_instances(coco_file, images, skips)
    for folder in job.instances:
        found += inst.folder_instances(folder, job.class_name, skips)
    if job.sam_images:
        from .segmenters import load_sam

        sam = load_sam(job.sam_model, job.device)
        for k, folder in enumerate(job.sam_images):
            found += inst.sam_instances(folder, sam, Path(job.output) / "sam_masks" / str(k), job.class_name,
                                        job.sam_points, job.sam_score, skips,
                                        lambda done, total: host.progress(done, total, "SAM images"),
                                        host.check_interrupt)
    return found


def instance_key(job):
    """What the instance table depends on: its sources and scoring models (contents by size and time)."""
    return {
        "coco": fingerprint(*job.coco, *job.coco_images), "instances": fingerprint(*job.instances),
        "class_name": job.class_name,
        "sam": [fingerprint(job.sam_model, *job.sam_images), job.sam_points, job.sam_score] if job.sam_images else None,
        "clip": fingerprint(job.clip_model) if job.use_clip else None,
    }


def cached_instances(job, host):
    """Collect (and CLIP-score) the instances, or reuse ``<output>/instances.json`` from an earlier run with the
    same sources and models. Returns (instances, ``Skips`` of the files left out, save) where ``save()`` stores the
    table (called once a plan is made: a run that cannot make one leaves no table behind)."""
    key = instance_key(job)
    if job.resume or job.append:
        try:
            data = read_json(job.output, INSTANCE_CACHE)
            if data is not None and data.get("key") == key:
                return [inst.Instance(**i) for i in data["instances"]], Skips(data["skips"]), lambda: None
        except (ValueError, TypeError, KeyError):
            pass  # a damaged or older cache is rebuilt
    skips = Skips()
    instances = collect_instances(job, skips, host)
    if job.use_clip and instances:
        progress = lambda done, total: host.progress(done, total, "CLIP scores")  # noqa: E731
        if job.ray is not None:  # an actor pool holds the model (on GPUs where the cluster has them)
            from . import scale

            instances, clip_skips = scale.score_instances(instances, job.clip_model, job.workers,
                                                          host.check_interrupt, progress)
            skips.update(clip_skips)
        else:
            from .clip_score import ClipScorer

            scorer = ClipScorer.from_folder(job.clip_model, job.device)
            instances = inst.score_instances(instances, scorer, skips=skips, check_interrupt=host.check_interrupt,
                                             progress=progress)

    def save():
        write_output_json(job.output, INSTANCE_CACHE,
                          {"key": key, "skips": skips.as_dict(), "instances": [i.to_json() for i in instances]})

    return instances, skips, save


def write_summary(job, summary):
    write_output_json(job.output, shard_file_name("summary", job.shard or None, ".json"), summary)


def run_synth_job(job, host=None):
    """Make the job's samples in ``job.output``; returns the summary (also written as ``summary*.json``):
    planned, existing, written, redrawn, failed samples and skipped files (each by reason with the first names),
    instances, classes, filters, the settings id; ``stopped`` when an error stopped the run.

    UsageError before any work for settings or inputs that cannot run, including a folder made with another
    recipe (unless ``append``). Nothing usable among the instance files (all left out) raises ValueError naming
    them. An error before the first sample leaves no output folder behind."""
    host = host or Host()
    job.check()
    shard = parse_shard(job.shard) if job.shard else None
    summary, started = {}, time.perf_counter()
    writer, created = open_writer(job, job.settings(), shard)
    close = getattr(writer, "close", lambda: None)
    try:
        with scale_backend(job.ray, job.workers):
            instances, skips, save_instances = cached_instances(job, host)
            backgrounds, obstacles, background_skips = synth.collect_backgrounds(job.backgrounds,
                                                                                 job.background_annotations)
            skips.update(background_skips)
            if not instances and skips:
                raise ValueError("no usable instance: every instance file was left out ("
                                 + "; ".join(skips.lines()) + "); fix or replace those files")
            config = synth.SynthConfig(size=job.size, min_side=job.min_side, blend=job.blend,
                                       feather_px=job.feather_px)
            try:
                plan = synth.build_plan(backgrounds, obstacles, instances, config, job.seed, job.num_samples,
                                        job.filters(), job.backgrounds)
            except ValueError as error:  # nothing survives the filters, no backgrounds: the settings cannot make samples
                raise UsageError(str(error)) from None
            save_instances()
            summary.update(settings_id=writer.settings_id)
            progress = lambda done, total: host.progress(done, total, "samples")  # noqa: E731
            results = None  # the single-machine path's own workers
            if job.ray is not None:
                from . import scale

                collect = scale.shard_results if job.format == "webdataset" else scale.sample_results
                results = functools.partial(collect, workers=job.workers, check_interrupt=host.check_interrupt)
            if job.format == "webdataset":
                synth.run_synthesis_shards(plan, writer, job.shard_size, job.workers, job.shard, progress,
                                           host.check_interrupt, summary, results)
            else:
                synth.run_synthesis(plan, writer, job.workers, job.shard, job.resume, progress,
                                    host.check_interrupt, summary, results)
    except BaseException:
        close()
        if created and not len(writer):
            remove_unused_output(job.output)
            raise
        if summary:
            try:
                write_summary(job, summary)
            except OSError:
                pass  # the disk that refused the samples refuses the summary too: the error says so
        raise
    finally:
        close()
    files = Skips(summary["skipped"])
    files.update(skips)
    summary.update(skipped=files.as_dict(), instances=len(plan.instances), classes=len(plan.class_stats),
                   filters=plan.filters)
    write_summary(job, summary)
    if job.format == "webdataset":  # _stats.json: this run's counts, skips and failures by reason, throughput
        write_shard_stats(job, writer, shard, summary["written"], summary["existing"], summary["skipped"],
                          summary["failed"], summary["shards"], summary["bytes"], time.perf_counter() - started,
                          planned=summary["planned"])
    return summary


def failed_samples(summary):
    """How many planned samples a run could not make (not written, not there before)."""
    return summary["planned"] - summary["written"] - summary["existing"]
