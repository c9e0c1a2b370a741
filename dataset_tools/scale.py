"""Dataset jobs at cluster scale: their stages as Ray Data operations (``erasekit-synth`` / ``erasekit-video
--ray [ADDRESS]``; ``pip install erasekit[scale]``).

The Ray back-end runs the same functions as the single-machine path, so the same inputs and seed give the same
samples, ids and bytes; only who runs them changes:

- **paste synthesis per sample**: ``synth.make_encoded`` in CPU tasks. With ``--format webdataset`` a task makes
  the samples of one shard and writes the shard itself (``synth.write_shard``) to the output, local or any fsspec
  URL, so no sample crosses the network twice; with the folder format the tasks stream the samples back to the
  driver, which writes the folder (one manifest, one writer).
- **video decode + MOG analysis + pairing per video**: ``video_mining.mine_task`` in CPU tasks, each inside the
  single-machine path's crash isolation (``VideoWorkerPool``: a decoder abort costs one process, the video is
  tried once more with PyAV). With shards the task writes the video's shards (``shards.VideoShards``).
- **CLIP scoring** (``instances.score_instances``) and **GroundingDINO + SAM 2 masking** (``segmenters``) run in
  actor pools that hold the models once: one actor per GPU with ``num_gpus=1`` where the cluster has GPUs, else
  CPU actors. The mining tasks ask the masking pool for each mask (``VideoWorkerPool(segment=...)``).

Units of work are small and independent: a chunk of samples, a shard, a video, a chunk of instances; each is one
Ray Data block. A task whose process dies (a crash, the out-of-memory killer, a lost node) is retried once; when it
dies again its unit is recorded as failed with that reason and the run goes on. Output shards are written whole
and are the same bytes whoever writes them, so a retried task, a killed driver run again with ``--resume``, or
another machine never duplicates or loses a sample.

Scaling out needs nothing else: start Ray on every machine (``ray start --head`` on one, ``ray start
--address=HEAD:6379`` on the others), install EraseKit on each (or let Ray ship it: ``runtime_env``), give every
machine the inputs at the same path or URL, write shards to a URL (``s3://...``) or a shared folder, and pass
``--ray HEAD:6379 --workers <total CPUs>``.
"""
from __future__ import annotations

import contextlib
import itertools
import pickle
import warnings

from ..jobs import Skips, require

FEATURE = "--ray (dataset jobs on a Ray cluster)"
BLOCK_BYTES = 32 << 20  # output blocks a task streams back: small enough to keep a worker's memory flat
SAMPLES_PER_TASK = 64  # samples a folder-format task makes: seconds of work, as Ray Data hands out work every 0.1 s
INSTANCES_PER_TASK = 64  # a multiple of score_instances' batch of 8: the same batches as one process scores
TASK_DIED = "its Ray task died twice (a crash, out of memory or a lost node)"


def ray_module():
    """``ray`` with Ray Data, or MissingExtra naming ``pip install 'erasekit[scale]'``."""
    require("ray.data", "scale", FEATURE, package="ray")
    return require("ray", "scale", FEATURE)


@contextlib.contextmanager
def session(address, workers):
    """Ray for one job: a connection made already (a test, a notebook) is used as it is; ``"local"`` (or empty)
    starts a Ray on this machine with ``workers`` CPUs; anything else is a cluster address (``HOST:6379``,
    ``ray://HOST:10001``, ``auto``). What this function starts or connects, it ends."""
    ray = ray_module()
    if ray.is_initialized():
        yield ray
        return
    if not address or address == "local":
        ray.init(address="local", num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def backend(address, workers):
    """The context a job runs in: a Ray ``session`` when ``address`` is given (``--ray``), else nothing."""
    return session(address, workers) if address is not None else contextlib.nullcontext()


def cluster_gpus():
    """How many GPUs the cluster has (0 without a GPU: model actors then run on CPUs)."""
    return int(ray_module().cluster_resources().get("GPU", 0))


def _configure(ray):
    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = -1  # a unit whose task died twice is recorded as failed; the run goes on
    context.target_max_block_size = BLOCK_BYTES
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False  # the driver accepts units in any order


class _Units:
    """A Ray Data worker (``flat_map`` callable class, one per actor): ``run(unit)`` yields payloads, streamed
    back as rows; a last row marks the unit done."""

    def __call__(self, row):
        for payload in self.run(pickle.loads(row["unit"])):
            yield {"index": row["index"], "last": False, "payload": pickle.dumps(payload)}
        yield {"index": row["index"], "last": True, "payload": b""}


def stream(units, worker, args, workers, check_interrupt=None, num_gpus=0, num_cpus=1):
    """Run ``worker(*args).run(unit)`` for every unit on Ray Data with ``workers`` actors, one block per unit; yield
    ``(unit index, payload)`` as they arrive (in any order), then ``(unit index, TASK_DIED)`` for each unit whose
    task died twice. An actor whose process dies is restarted and its task tried once more."""
    ray = ray_module()
    if not units:
        return
    _configure(ray)
    items = [{"index": i, "unit": pickle.dumps(unit)} for i, unit in enumerate(units)]
    with warnings.catch_warnings():
        # Ray 2.60-2.63 take the retry limit only as a generic remote argument (deprecated for 2.64)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
            # one task per actor at a time: a crash then costs only its own unit a try
            worker, fn_constructor_args=args, compute=ray.data.ActorPoolStrategy(
                size=max(1, min(workers, len(units))), max_tasks_in_flight_per_actor=1),
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=1)
    finished = set()
    for row in dataset.iter_rows():
        if check_interrupt:
            check_interrupt()
        if row["last"]:
            finished.add(row["index"])
        else:
            yield row["index"], pickle.loads(row["payload"])
    for index in range(len(units)):
        if index not in finished:
            yield index, TASK_DIED


# --- synthesis -----------------------------------------------------------------------------------------------------

class SynthSamples(_Units):
    """Paste synthesis per sample (``synth.make_encoded``) for the folder format: samples stream to the driver."""

    def __init__(self, plan):
        self.plan = plan

    def run(self, indices):
        from . import synth

        for index in indices:
            yield synth.make_encoded(self.plan, index)


class SynthShards(_Units):
    """One shard's samples made and written by the task (``synth.write_shard``)."""

    def __init__(self, plan):
        self.plan = plan

    def run(self, unit):
        from . import synth

        yield synth.write_shard(self.plan, *unit)


def sample_results(plan, indices, workers, check_interrupt=None):
    """``synth.run_synthesis``'s ``results`` on Ray: ``make_encoded`` tuples, in any order; a sample whose task
    died twice comes back failed with that reason."""
    from .synth import sample_id

    chunks = [list(indices[i:i + SAMPLES_PER_TASK]) for i in range(0, len(indices), SAMPLES_PER_TASK)]
    seen = set()
    for unit, result in stream(chunks, SynthSamples, (plan,), workers, check_interrupt):
        if result is TASK_DIED:
            yield from ((sample_id(i), None, None, [(TASK_DIED, None)]) for i in chunks[unit] if i not in seen)
            continue
        seen.add(int(result[0]))
        yield result


def shard_results(plan, units, workers, check_interrupt=None):
    """``synth.run_synthesis_shards``'s ``results`` on Ray: ``write_shard`` summaries; a shard whose task died
    twice comes back with every sample failed."""
    from .synth import sample_id, shard_indices

    for unit, result in stream(units, SynthShards, (plan,), workers, check_interrupt):
        if result is TASK_DIED:
            shard, size, _ = units[unit]
            indices = shard_indices(plan, shard, size)
            result = {"planned": len(indices), "redrawn": 0, "skipped": [],
                      "failed": [(TASK_DIED, sample_id(i)) for i in indices]}
        yield result


# --- CLIP scoring: an actor pool --------------------------------------------------------------------------------------

def _actor_device():
    return "cuda" if ray_module().get_gpu_ids() else "cpu"


class ClipChunks(_Units):
    """CLIP scores of a chunk of instances (``instances.score_instances``), with the model loaded once per actor."""

    def __init__(self, clip_model):
        from .clip_score import ClipScorer

        self.scorer = ClipScorer.from_folder(clip_model, _actor_device())

    def run(self, instances):
        from . import instances as inst

        skips = Skips()
        readable = inst.score_instances(instances, self.scorer, skips=skips)
        yield {i.id: i.score for i in readable}, skips.as_dict()


def score_instances(instances, clip_model, workers, check_interrupt=None, progress=None):
    """``instances.score_instances`` on Ray: (the readable instances with their scores, in order; ``Skips`` of the
    unreadable ones). Chunks are multiples of its batch of 8, so every batch holds the instances it holds in one
    process: the same scores."""
    gpus = cluster_gpus()
    chunks = [instances[i:i + INSTANCES_PER_TASK] for i in range(0, len(instances), INSTANCES_PER_TASK)]
    results, done = {}, 0
    for unit, result in stream(chunks, ClipChunks, (clip_model,), gpus or workers, check_interrupt,
                               num_gpus=1 if gpus else 0):
        results[unit] = result
        done += len(chunks[unit])
        if progress:
            progress(done, len(instances))
    readable, skips = [], Skips()
    for unit, chunk in enumerate(chunks):
        if results[unit] is TASK_DIED:
            for instance in chunk:
                skips.add(TASK_DIED, instance.id)
            continue
        scores, chunk_skips = results[unit]
        skips.update(Skips(chunk_skips))
        for instance in chunk:
            if instance.id in scores:
                instance.score = scores[instance.id]
                readable.append(instance)
    return readable, skips


# --- video mining ---------------------------------------------------------------------------------------------------

class SegmenterService:
    """GroundingDINO + SAM / SAM 2 (``segmenters.load_text_segmenter``) held by one actor; mining tasks ask it for
    each object mask."""

    def __init__(self, spec):
        from .segmenters import load_text_segmenter

        self.segmenter = load_text_segmenter(**{**spec, "device": _actor_device()})

    def name(self):
        return self.segmenter.name

    def segment(self, image, zone):
        return self.segmenter(image, zone)


def segmenter_services(spec, workers):
    """The masking actor pool: one actor per GPU (``num_gpus=1``), or CPU actors (one per two mining workers).
    They take no CPU slot of their own: a mining task waits while its mask is computed."""
    ray = ray_module()
    gpus = cluster_gpus()
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0, max_restarts=-1, max_task_retries=1)(SegmenterService)
    return [actor.remote(spec) for _ in range(gpus or max(1, workers // 2))]


class _RoundRobin:
    """``segment(image, zone)`` spread over the masking actors."""

    def __init__(self, services):
        self.services = itertools.cycle(services)

    def __call__(self, image, zone):
        return ray_module().get(next(self.services).segment.remote(image, zone))


class VideoUnits(_Units):
    """Video mining per video in this actor's isolated mining process (``VideoWorkerPool`` of one).

    Folder format: yields ``("pair", task index, sample id, EncodedTriplet, record)`` per pair; shards: writes the video's
    shards (``shards.VideoShards``). Last comes ``("finished", VideoFinished, shard results or None)``."""

    def __init__(self, config, segmenter_spec, timeout, services, target, shard_size):
        from .video_isolation import VideoWorkerPool

        segment, name = None, "segmenter"
        if services:
            segment, name = _RoundRobin(services), ray_module().get(services[0].name.remote())
        self.pool = VideoWorkerPool(config, 1, None if services else segmenter_spec, timeout, segment=segment,
                                    segment_name=name).start()
        self.target, self.shard_size = target, shard_size

    def run(self, task):
        from .shards import VideoShards
        from .triplets import encode_triplet
        from .video_mining import PairMined, VideoFinished

        sink = VideoShards(self.target, task.video_id, self.shard_size) if self.target else None
        try:
            for event in self.pool.run([task]):
                if isinstance(event, PairMined):
                    encoded = encode_triplet(event.source, event.mask, event.target)
                    if sink is None:
                        yield "pair", task.job, event.sample_id, encoded, event.record
                    else:
                        sink.add(event.sample_id, encoded, event.record)
                elif isinstance(event, VideoFinished):
                    yield "finished", event, sink.finish() if sink is not None else None
        except BaseException:
            if sink is not None:
                sink.abort()
            raise


def video_results(tasks, config, segmenter_spec, timeout, workers, target=None, shard_size=None,
                  check_interrupt=None):
    """Mine ``tasks`` (``VideoTask``) on Ray: yields the ``VideoUnits`` payloads; a video whose task died twice
    comes back as ``("died", task)``."""
    services = segmenter_services(segmenter_spec, workers) if segmenter_spec else None
    for unit, result in stream(tasks, VideoUnits, (config, segmenter_spec, timeout, services, target, shard_size),
                               workers, check_interrupt):
        yield ("died", tasks[unit]) if result is TASK_DIED else result


def add_arguments(parser):
    """The output-format and Ray flags ``erasekit-synth`` and ``erasekit-video`` share."""
    from .shards import FORMATS, SHARD_SIZE

    group = parser.add_argument_group("output format and cluster scale")
    group.add_argument("--format", choices=FORMATS, default="folder",
                       help="folder: source/ mask/ target/ + manifest.jsonl; webdataset: tar shards with a parquet "
                            "index each and _stats.json (--output may then be any fsspec URL, e.g. s3://bucket/data)")
    group.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per WebDataset shard")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray Data: alone, a Ray on this machine with --workers CPUs; with an address "
                            "(HOST:6379, ray://HOST:10001, auto), an existing cluster, --workers tasks at once "
                            "(pip install 'erasekit[scale]')")
