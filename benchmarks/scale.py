"""The Ray back-end against the single-machine path, in one run (issue 21): samples/s of Syn4Removal synthesis and
of Video4Removal mining with 1 and 2 workers on each, and the write throughput of WebDataset shards against the
same samples written as a triplet folder.

    python benchmarks/scale.py [--samples 2000] [--shard-size 100] [--rounds 4] [--repeats 1] [--no-pin-cpus]

Targets: Ray within 15 % of the single-machine path at the same worker count; >= 1.7x from 1 to 2 workers where
the machine is quiet (the load average is printed: other processes on the machine take cores from both paths).

n workers run on n CPUs (``os.sched_setaffinity``, inherited by every process a run starts: pool workers, Ray's
raylet, GCS and workers). Without that, one worker on a 2-CPU machine already uses both (OpenCV's thread pool, the
video decoder's threads), and 1 against 2 workers would measure threads, not scaling. Ray's own processes count
against the same CPUs: they are part of what Ray costs.

Ray runs with as many CPUs as workers and its workers at the single-machine path's priority
(``RAY_worker_niceness=0``; Ray's default 15 makes them yield to every other process, which on a shared machine
measures the neighbours, not Ray). ``ray.init`` is timed apart (a cluster runs before a job starts); the actors'
start-up (a process each, imports, the plan) is part of the job, a fixed cost of a few seconds, so the jobs are
long enough for throughput to dominate, with units of seconds (shards of 100: Ray Data hands out work about every
0.1 s; ``erasekit-synth``'s shards hold 1000). Both paths write the same output format (``--format``, WebDataset
shards by default: what a cluster writes) from the same inputs: backgrounds and instances of ../shared/data for
synthesis; for mining, ../shared/data's videos and tests/data's, each also mirrored and played backwards
(``--variants``: distinct content, so no clip is a copy of another).
"""
import argparse
import contextlib
import os
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _pack import link_checkout

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ERASEKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def make_clips(folder, variants, rounds):
    """Distinct static-camera clips from the shared videos: each video as it is, mirrored, played backwards, or
    both (the first ``variants`` of these four per video), so no two clips share content (a copy is mined once);
    each clip plays its video forwards then backwards ``rounds`` times (long clips: a task's start-up is paid once)."""
    import cv2

    sources = [DATA / "video" / "road_cars.avi", DATA / "video" / "highway_busy.avi",
               ROOT / "tests" / "data" / "video03.avi"]
    clips = []
    for source in (s for s in sources if s.is_file()):
        capture = cv2.VideoCapture(str(source))
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        capture.release()
        for k, (mirror, backwards) in enumerate([(False, False), (True, False), (False, True), (True, True)][:variants]):
            path = folder / f"{source.stem}-{k}.avi"
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, frames[0].shape[1::-1])
            for frame in ((frames[::-1] + frames) if backwards else (frames + frames[::-1])) * rounds:
                writer.write(cv2.flip(frame, 1) if mirror else frame)
            writer.release()
            clips.append(path)
    return clips


def synth_job(output, args, workers, ray):
    from erasekit.dataset_tools.synth_job import SynthJob

    images = DATA / "images"
    return SynthJob(backgrounds=str(images / "removal_pairs"), output=str(output),
                    instances=[str(images / "masked"), str(images / "syn_triplets")], num_samples=args.samples,
                    size=args.size, min_side=256, blend=args.blend, class_filter=False, seed=0, workers=workers,
                    format=args.format, shard_size=args.shard_size, ray=ray)


def video_job(output, clips, args, workers, ray):
    from erasekit.dataset_tools.video_job import VideoJob
    from erasekit.dataset_tools.video_mining import PairingConfig

    return VideoJob(videos=[str(c) for c in clips], output=str(output), pairing=PairingConfig(foreground_ratio=0.04),
                    workers=workers, format=args.format, shard_size=args.shard_size, ray=ray)


@contextlib.contextmanager
def on_cpus(count):
    """This process and every process it starts meanwhile (pool workers, Ray's raylet and workers) on ``count``
    CPUs: a worker is one CPU on both paths, whatever threads OpenCV starts (its pthreads pool sizes itself to the
    CPUs a process may use), so 1 worker against 2 measures scaling, not how many cores one worker's threads reach."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < count:
        raise SystemExit(f"{count} workers need {count} CPUs; this process may use {len(allowed)}")
    os.sched_setaffinity(0, allowed[:count])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def measure(args):
    """``--measure OPERATION WORKERS BACKEND``, run in a fresh process: prints the JSON of one timed job."""
    operation, workers, backend = args.measure[0], int(args.measure[1]), args.measure[2]
    workdir = Path(args.workdir)
    link_checkout(workdir / "checkout")
    if operation == "synth":
        from erasekit.dataset_tools.synth_job import run_synth_job as run

        make_job = lambda out, ray: synth_job(out, args, workers, ray)  # noqa: E731
    else:
        from erasekit.dataset_tools.video_job import run_video_job as run

        clips = sorted(workdir.glob("*.avi"))
        make_job = lambda out, ray: video_job(out, clips, args, workers, ray)  # noqa: E731
    startup = None
    if backend == "ray":
        import ray

        started = time.perf_counter()
        os.environ["RAY_worker_niceness"] = "0"
        ray.init(num_cpus=workers, object_store_memory=300 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - started
    output = workdir / f"{operation}-{backend}-{workers}"
    shutil.rmtree(output, ignore_errors=True)  # a repeat starts afresh (a run would resume the last one's shards)
    job = make_job(output, "local" if backend == "ray" else None)
    start = time.perf_counter()
    summary = run(job)
    print(json.dumps({"seconds": time.perf_counter() - start, "samples": summary["written"], "startup": startup}))


def compare(operation, args, workdir):
    """Rows (path, workers, seconds, samples) of one operation on both back-ends and both counts, each job in a
    fresh process (nothing one run loaded or cached, files or forked memory, helps the next)."""
    rows = []
    for workers in (1, 2):
        for backend in ("single", "ray"):
            command = [sys.executable, __file__, *args.passed, "--workdir", str(workdir),
                       "--measure", operation, str(workers), backend]
            results = []
            for _ in range(args.repeats):
                with on_cpus(workers) if args.pin_cpus else contextlib.nullcontext():
                    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
                results.append(json.loads(output.strip().splitlines()[-1]))
            result = min(results, key=lambda r: r["seconds"])  # the least disturbed run, as timeit reports
            path = "single machine" if backend == "single" else f"Ray (start-up {result['startup']:.1f} s apart)"
            rows.append((path, workers, result["seconds"], result["samples"]))
    return rows


def shard_write_throughput(folder, workdir, shard_size):
    """(folder seconds, shard seconds, samples, bytes): the samples of ``folder`` (either format) written again both
    ways, each timed until its data is on disk (``os.sync``): else the second would pay for the first's writeback."""
    from erasekit.dataset_tools.shards import ShardFile, open_triplets, synth_shard_name
    from erasekit.dataset_tools.triplets import TripletWriter

    dataset = open_triplets(folder)  # either format
    samples = [(r["id"], dataset.encoded(i), r) for i, r in enumerate(dataset.records)]
    size = sum(len(e.source) + len(e.mask) + len(e.target) for _, e, _ in samples)

    def write_folder():
        with TripletWriter(workdir / "write-folder") as writer:
            for sid, encoded, record in samples:
                writer.write_encoded(sid, encoded, record)

    def write_shards():
        (workdir / "write-shards").mkdir()
        for first in range(0, len(samples), shard_size):
            shard = ShardFile(workdir / "write-shards", synth_shard_name(first // shard_size))
            for sid, encoded, record in samples[first:first + shard_size]:
                shard.add(sid, encoded, record)
            shard.commit()

    seconds = []
    for write in (write_folder, write_shards):
        os.sync()
        start = time.perf_counter()
        write()
        os.sync()
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1], len(samples), size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="synthesis samples per run")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--blend", default="feather", help="matting is the official blend and the slowest")
    parser.add_argument("--variants", type=int, default=4, choices=(1, 2, 3, 4), help="clips made of each video")
    parser.add_argument("--rounds", type=int, default=4, help="forwards-and-backwards plays of its video per clip")
    parser.add_argument("--format", default="webdataset", choices=("webdataset", "folder"))
    parser.add_argument("--shard-size", type=int, default=100,
                        help="samples per shard, synthesis's unit of work (erasekit-synth's default is 1000)")
    parser.add_argument("--no-pin-cpus", dest="pin_cpus", action="store_false",
                        help="let every run use all CPUs (by default n workers run on n CPUs)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row; the fastest is reported")
    parser.add_argument("--operations", nargs="+", default=["synth", "video"], choices=("synth", "video"))
    parser.add_argument("--measure", nargs=3, metavar=("OPERATION", "WORKERS", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    args.passed = [a for a in sys.argv[1:] if a != "--no-pin-cpus"]
    workdir = Path(tempfile.mkdtemp(prefix="erasekit-scale-"))
    try:
        link_checkout(workdir / "checkout")  # Ray's workers import this checkout too
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
        make_clips(workdir, args.variants, args.rounds)
        names = {"synth": "synthesis", "video": "video mining"}
        tables = {names[operation]: compare(operation, args, workdir) for operation in args.operations}
        for name, rows in tables.items():
            print(f"\n{name} ({args.format}):")
            print(f"  {'path':36s} {'workers':>7s} {'seconds':>8s} {'samples':>7s} {'samples/s':>9s}")
            rates = {}
            for path, workers, seconds, count in rows:
                rates[(path.split(' ')[0], workers)] = count / seconds
                print(f"  {path:36s} {workers:7d} {seconds:8.2f} {count:7d} {count / seconds:9.2f}")
            for workers in (1, 2):
                print(f"  Ray / single machine at {workers} worker(s): "
                      f"{rates[('Ray', workers)] / rates[('single', workers)]:.2f} (target >= 0.85)")
            for path in ("single", "Ray"):
                print(f"  {path}: 2 workers / 1 worker = {rates[(path, 2)] / rates[(path, 1)]:.2f} "
                      "(target >= 1.7 on a quiet machine)")
        if "synth" in args.operations:
            folder_seconds, shard_seconds, count, size = shard_write_throughput(workdir / "synth-single-1", workdir, 32)
            print(f"\nwriting the same {count} samples ({size / 1e6:.1f} MB of PNGs):")
            print(f"  triplet folder: {count / folder_seconds:8.1f} samples/s {size / folder_seconds / 1e6:7.1f} MB/s")
            print(f"  shards of 32:   {count / shard_seconds:8.1f} samples/s {size / shard_seconds / 1e6:7.1f} MB/s "
                  f"({folder_seconds / shard_seconds:.1f}x)")
        print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
