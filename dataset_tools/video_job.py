"""Video4Removal as jobs: the settings of a run and the one function that runs it, for every host.

``run_video_job(VideoJob, host)`` mines videos into a triplet dataset; the ``erasekit-video`` command and the
*Build Removal Dataset from Videos* node both call it, so the same settings give the same dataset.
``preview_video_pairs(PairPreview, host)`` mines one video range and returns its first pairs without writing
(the *Mine Removal Pairs from Video* node). Mining runs in isolated processes (``video_isolation.py``); the
job consumes their typed events and hands each one to ``host.event`` as well.

The run summary (every video with its status, reason and counts, the settings, and the videos left out by
problem with their first names) is written next to the manifest as ``video-summary.json``
(``video-summary-shard-i-of-N.json`` for a shard) after every finished video, and once more when the run stops
for any reason (with ``stopped`` saying why, when an error stopped it); ``resume`` skips the videos a previous
summary lists as finished with the same settings, and the samples already written.

Videos are known by their content (``video_mining.video_id``): two different files of the same name and size are
two videos, and a second copy of the same file (under any name) is mined once, the other reported as a duplicate.
The pairing settings and the segmenter are the dataset's settings (``TripletWriter``): resuming with others is
refused unless ``append``.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..jobs import Host, Skips, UsageError, check_input, check_output_folder, content_hash, describe_os_error
from .scale import backend as scale_backend
from .shards import (SHARD_SIZE, VideoShards, check_output_format, open_writer, read_json, write_output_json,
                     write_shard_stats)
from .sources import is_url, join
from .triplets import encode_triplet, parse_shard, shard_file_name
from .video_decode import VIDEO_EXTENSIONS, find_videos
from .video_isolation import VideoWorkerPool
from .video_mining import PairingConfig, PairMined, VideoFinished, VideoProgress, VideoReport, VideoTask, video_id

SUMMARY = "video-summary"


def segmenter_spec(grounding_dino, sam_model, prompt, device="cpu"):
    """What the mining processes load for GroundingDINO + SAM object masks, or None for MOG masks.

    The three settings go together (the text prompt picks the objects SAM cuts out); paths must exist."""
    given = [bool(grounding_dino), bool(sam_model), bool((prompt or "").strip())]
    if not any(given):
        return None
    if not all(given):
        raise UsageError(
            "object masks need all three: a GroundingDINO model, a SAM model and a prompt (got grounding_dino="
            f"{grounding_dino!r}, sam_model={sam_model!r}, prompt={prompt!r}); give none of them for MOG masks")
    for path in (grounding_dino, sam_model):
        check_input(path, "model", kind="any")
    return {"grounding_dino": str(grounding_dino), "sam": str(sam_model), "text": prompt, "device": str(device)}


@dataclass
class VideoJob:
    """A mining run: what the ``erasekit-video`` flags and the dataset node's inputs set (same names)."""

    videos: list  # video files or folders of videos (searched recursively)
    output: str  # the triplet dataset folder
    pairing: PairingConfig = field(default_factory=PairingConfig)  # every number that decides the pairs
    max_frames: int | None = None  # mine only the first N frames of each video; None = whole videos
    workers: int = 1  # videos mined at once, each in its own process
    shard: str | None = None  # "i/N": every N-th video from i, into the shard's own manifest
    resume: bool = False  # continue a folder that holds samples made with these settings (skip what is done)
    append: bool = False  # add samples made with other settings to a folder that holds samples (recorded per sample)
    timeout: float = 600.0  # seconds without a message before a decoder counts as hung
    grounding_dino: str | None = None  # GroundingDINO transformers folder (object masks; with sam_model, prompt)
    sam_model: str | None = None  # SAM / SAM 2 transformers folder or checkpoint file
    prompt: str | None = None  # object classes GroundingDINO looks for, e.g. "car"
    device: str = "cpu"  # torch device of the segmenters (on Ray: a GPU actor pool where the cluster has GPUs)
    format: str = "folder"  # folder (source/ mask/ target/ + manifest) | webdataset (tar shards + parquet indices)
    shard_size: int = SHARD_SIZE  # pairs per WebDataset shard (a video's pairs go to its own shards)
    ray: str | None = None  # run on Ray: "local" (a Ray on this machine) or a cluster address; None: this machine

    def check(self):
        """UsageError for settings that cannot run; returns the segmenter spec (or None)."""
        if self.workers < 1:
            raise UsageError(f"workers must be >= 1, got {self.workers}")
        check_output_format(self)
        if self.max_frames is not None and self.max_frames < 1:
            raise UsageError(f"max_frames must be >= 1 (or unset for whole videos), got {self.max_frames}")
        if self.shard is not None:
            try:
                parse_shard(self.shard)
            except ValueError as error:
                raise UsageError(str(error)) from None
        return segmenter_spec(self.grounding_dino, self.sam_model, self.prompt, self.device)

    def settings(self, spec):
        """The dataset's settings: what decides the pairs of a video (a resumed run must match them)."""
        return {"job": "video4removal", **asdict(self.pairing),
                "segmenter": spec and {k: (Path(v).name if k in ("grounding_dino", "sam") else v)
                                       for k, v in spec.items() if k != "device"}}

    def params(self, spec):
        """The settings a finished video of the summary was mined with (the dataset's, and the frame range)."""
        return {**self.settings(spec), "max_frames": self.max_frames}


def summary_name(shard):
    return shard_file_name(SUMMARY, shard, ".json")


def summary_path(root, shard):
    return join(os.fspath(root), summary_name(shard))


def finished_videos(root, shard, params):
    """Videos a previous run with the same settings finished (ok or skipped for a reason), by content hash;
    crashed ones are tried again."""
    try:
        previous = read_json(root, summary_name(shard))
    except (OSError, ValueError):
        return {}
    if previous is None or previous.get("params") != params:
        return {}
    return {content_of(v["video_id"]): v for v in previous.get("videos", [])
            if v.get("status") in ("ok", "skipped") and v.get("video_id")}


def content_of(vid):
    """The content hash part of a video id (``stem-hash``)."""
    return vid.rsplit("-", 1)[-1]


def failed_videos(summary):
    """The videos of a summary that gave nothing by accident or for a reason: skipped or crashed."""
    return [v for v in summary["videos"] if v["status"] in ("skipped", "crashed")]


def skipped_videos(reports):
    """``Skips`` of the skipped and crashed videos: by problem, the first few file names."""
    skips = Skips()
    for report in reports:
        if report["status"] in ("skipped", "crashed"):
            skips.add(report.get("problem") or report["status"], Path(report["video"]).name)
    return skips


def identify(videos, host):
    """({video: video id}, reports of the videos not to mine: a copy of an earlier one, or a file that cannot be
    read) from the videos' content hashes."""
    ids, first, reports = {}, {}, {}
    for done, path in enumerate(videos, 1):
        host.check_interrupt()
        try:
            digest = content_hash(path)
        except OSError as error:
            reports[path] = VideoReport(video=str(path), status="skipped", problem="cannot be read",
                                        reason=f"{path} cannot be read: {describe_os_error(error)}").as_dict()
            continue
        if digest in first:
            reports[path] = VideoReport(video=str(path), status="duplicate", problem="duplicate",
                                        reason=f"the same content as {first[digest]}: mined once").as_dict()
        else:
            first[digest] = path
            ids[path] = video_id(path, digest)
        host.progress(done, len(videos), "videos identified")
    return ids, reports


def run_video_job(job, host=None):
    """Mine ``job.videos`` into ``job.output``; returns the summary (also written as ``video-summary*.json``).

    Raises UsageError before any work for settings or inputs that cannot run (an output that is a file, cannot
    be made or written, a damaged dataset, other settings than the dataset's without ``append``). Interruption
    (``host``) or a failed write stops the run with every finished sample kept and the summary written."""
    host = host or Host()
    spec = job.check()
    shard = parse_shard(job.shard) if job.shard is not None else None
    try:
        videos = find_videos(job.videos)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if not videos:
        raise UsageError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {', '.join(map(str, job.videos))}")
    if shard is not None:
        videos = videos[shard[0]::shard[1]]
    if not is_url(str(job.output)):
        check_output_folder(job.output)
    ids, unmined = identify(videos, host)
    writer, _ = open_writer(job, job.settings(spec), shard)

    params = job.params(spec)
    done_before = finished_videos(job.output, shard, params) if job.resume or job.append else {}
    reports = dict(unmined)
    for video in videos:
        if video in ids and content_of(ids[video]) in done_before:
            reports[video] = {**done_before[content_of(ids[video])], "video": str(video)}
    todo = [v for v in videos if v not in reports]
    tasks = [VideoTask(index, str(v), 0, job.max_frames, video_id=ids[v]) for index, v in enumerate(todo)]
    summary = {"params": params, "settings_id": writer.settings_id, "videos": [], "written": 0, "already_present": 0,
               "samples": 0, "skipped": {}}
    if job.format == "webdataset":
        summary.update(shards=0, bytes=0)
    written, fractions, sinks = Counter(), {}, {}
    started = time.perf_counter()

    def publish():
        summary["videos"] = [reports[v] for v in videos if v in reports]
        summary["samples"] = len(writer)
        summary["skipped"] = skipped_videos(summary["videos"]).as_dict()
        write_output_json(job.output, summary_name(shard), summary)

    def store(index, sample_id, record, encoded):
        """One pair into the dataset: the folder, or the shards of its video."""
        try:
            if job.format == "webdataset":
                if index not in sinks:
                    sinks[index] = VideoShards(writer.target(), tasks[index].video_id, job.shard_size)
                if not sinks[index].add(sample_id, encoded(), record):
                    summary["already_present"] += 1
                    return
            elif writer.has(sample_id):
                summary["already_present"] += 1
                return
            else:
                writer.write_encoded(sample_id, encoded(), record)
        except OSError as error:
            summary["stopped"] = f"could not write sample {sample_id}: {describe_os_error(error)}"
            raise
        summary["written"] += 1
        written[index] += 1

    def shards_done(index, results):
        """A video's shards are written (here, or by its Ray task): count them, and what was there before."""
        for result in results:
            writer.finish(result)
            summary["shards"] += 1
            summary["bytes"] += result["bytes"]
            if result.get("existing"):
                summary["already_present"] += result["samples"]
            elif index not in sinks:  # written by a Ray task: its pairs were not counted here
                summary["written"] += result["samples"]
                written[index] += result["samples"]

    def consume(event):
        if isinstance(event, VideoProgress):
            fractions[event.job] = event.done / max(1, event.total)
        elif isinstance(event, PairMined):
            store(event.job, event.sample_id, event.record,
                  lambda: encode_triplet(event.source, event.mask, event.target))
        elif isinstance(event, PairEncoded):
            store(event.job, event.sample_id, event.record, lambda: event.encoded)
        elif isinstance(event, ShardsWritten):
            shards_done(event.job, event.results)
        elif isinstance(event, VideoFinished):
            if job.format == "webdataset" and event.job in sinks:
                shards_done(event.job, sinks[event.job].finish())
                del sinks[event.job]
            report = event.report.as_dict()
            report["written"] = written.pop(event.job, 0)
            reports[todo[event.job]] = report
            fractions.pop(event.job, None)
            host.log(f"{Path(todo[event.job]).name}: {report['status']}, {report['pairs']} pairs, {report['written']} "
                     f"written" + (f" ({report['reason']})" if report["reason"] else ""))
            publish()
        finished = len(reports) + sum(fractions.values())
        host.progress(round(finished, 2), len(videos), "videos")

    try:
        host.progress(len(reports), len(videos), "videos")
        if tasks:
            with scale_backend(job.ray, job.workers):
                for event in mining_events(job, tasks, spec, writer):
                    host.check_interrupt()
                    host.event(event)
                    consume(event)
    finally:
        for sink in sinks.values():
            sink.abort()  # a stopped run: the video is mined again next time
        if hasattr(writer, "close"):
            writer.close()
        try:
            publish()  # whatever stops the run, the summary describes what was done
            if job.format == "webdataset":
                write_shard_stats(job, writer, shard, summary["written"], summary["already_present"],
                                  summary["skipped"], {}, summary["shards"], summary["bytes"],
                                  time.perf_counter() - started, videos=len(videos))
        except OSError:
            pass  # the disk that refused the samples refuses the summary too: the error says so
    return summary


@dataclass
class PairEncoded:
    """A pair of task ``job`` already PNG-encoded where it was mined (a Ray task), with its manifest record."""

    job: int
    sample_id: str
    encoded: object  # triplets.EncodedTriplet
    record: dict


@dataclass
class ShardsWritten:
    """The shards a Ray task wrote for the video of task ``job`` (``ShardFile.commit`` results)."""

    job: int
    results: list


def mining_events(job, tasks, spec, writer):
    """The typed events of mining ``tasks``: from isolated processes on this machine, or from Ray tasks (which
    send their pairs encoded, or write the video's shards themselves)."""
    if job.ray is None:
        with VideoWorkerPool(job.pairing, min(job.workers, len(tasks)), spec, job.timeout) as pool:
            yield from pool.run(tasks)
        return
    from . import scale

    target = writer.target() if job.format == "webdataset" else None
    for payload in scale.video_results(tasks, job.pairing, spec, job.timeout, job.workers, target, job.shard_size):
        if payload[0] == "pair":
            yield PairEncoded(*payload[1:])
        elif payload[0] == "finished":
            _, finished, results = payload
            if results:
                yield ShardsWritten(finished.job, results)
            yield finished
        else:  # "died"
            task = payload[1]
            yield VideoFinished(task.job, VideoReport(video=task.path, status="crashed", problem="task died",
                                                      reason=f"{Path(task.path).name}: {scale.TASK_DIED}",
                                                      video_id=task.video_id))


@dataclass
class PairPreview:
    """Mine one video range and keep its first pairs: what the *Mine Removal Pairs from Video* node sets."""

    video: str
    start_frame: int = 0
    end_frame: int | None = None  # frame to stop before; None = the end
    max_pairs: int = 8  # most pairs to return (the first found)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    grounding_dino: str | None = None
    sam_model: str | None = None
    prompt: str | None = None
    device: str = "cpu"


def preview_video_pairs(job, host=None):
    """(the first ``max_pairs`` ``PairMined`` events, the video's report dict); writes nothing. The video is
    mined in an isolated process, so a file that crashes the decoder raises ValueError with the reason."""
    host = host or Host()
    spec = segmenter_spec(job.grounding_dino, job.sam_model, job.prompt, job.device)
    if job.end_frame is not None and job.end_frame <= job.start_frame:
        raise UsageError(f"end_frame {job.end_frame} must be after start_frame {job.start_frame} (or unset: the end)")
    check_input(job.video, "video", kind="file")
    chosen, report = [], None
    with VideoWorkerPool(job.pairing, 1, spec) as pool:
        for event in pool.run([VideoTask(0, str(job.video), job.start_frame, job.end_frame)]):
            host.check_interrupt()
            host.event(event)
            if isinstance(event, VideoProgress):
                host.progress(event.done, event.total, "frames")
            elif isinstance(event, PairMined) and len(chosen) < job.max_pairs:
                chosen.append(event)
            elif isinstance(event, VideoFinished):
                report = event.report.as_dict()
    return chosen, report
