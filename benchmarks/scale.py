"""The Ray back-end against the single-machine path, in one run (issue 21): samples/s of Syn4Removal synthesis and
of Video4Removal mining with 1 and 2 workers on each, and the write throughput of WebDataset shards against the
same samples written as a triplet folder.

    python benchmarks/scale.py [--samples 800] [--size 512] [--variants 4] [--rounds 2] [--format webdataset]

Targets: Ray within 15 % of the single-machine path at the same worker count; >= 1.7x from 1 to 2 workers where
the machine is quiet (the load average is printed: other processes on the machine take cores from both paths).

Ray runs on this machine with as many CPUs as workers and its workers at the single-machine path's priority
(``RAY_worker_niceness=0``; Ray's default 15 makes them yield to every other process, which on a shared machine
measures the neighbours, not Ray). Ray's start-up is timed apart (a cluster runs before a job starts); the actors'
start-up (a process each, imports, the plan) is part of the job, a fixed cost of a few seconds. Both paths write the same output format
(``--format``, WebDataset shards by default: what a cluster writes) from the same inputs: backgrounds and instances
of ../shared/data for synthesis; for mining, ../shared/data's videos and tests/data's, each also mirrored and played
backwards (``--variants``: distinct content, so no clip is a copy of another).
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

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


def timed(run, job):
    start = time.perf_counter()
    summary = run(job)
    return time.perf_counter() - start, summary


def compare(name, make_job, run, count, workdir):
    """Rows (path, workers, seconds, samples, samples/s) of one operation on both back-ends and both counts."""
    import ray

    rows = []
    for workers in (1, 2):
        seconds, summary = timed(run, make_job(workdir / f"{name}-local-{workers}", workers, None))
        rows.append(("single machine", workers, seconds, count(summary)))
        started = time.perf_counter()
        os.environ["RAY_worker_niceness"] = "0"
        ray.init(num_cpus=workers, object_store_memory=300 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - started
        try:
            seconds, summary = timed(run, make_job(workdir / f"{name}-ray-{workers}", workers, "local"))
        finally:
            ray.shutdown()
        rows.append((f"Ray (start-up {startup:.1f} s apart)", workers, seconds, count(summary)))
    return rows


def shard_write_throughput(folder, workdir, shard_size):
    """(folder seconds, shard seconds, samples, bytes): the samples of ``folder`` written again both ways."""
    from erasekit.dataset_tools.shards import ShardFile, synth_shard_name
    from erasekit.dataset_tools.triplets import EncodedTriplet, TripletDataset, TripletWriter

    dataset = TripletDataset(folder)
    samples = [(r["id"], EncodedTriplet(*[(Path(folder) / r[k]).read_bytes() for k in ("source", "mask", "target")],
                                        r["width"], r["height"]), r) for r in dataset.records]
    size = sum(len(e.source) + len(e.mask) + len(e.target) for _, e, _ in samples)
    start = time.perf_counter()
    with TripletWriter(workdir / "write-folder") as writer:
        for sid, encoded, record in samples:
            writer.write_encoded(sid, encoded, record)
    folder_seconds = time.perf_counter() - start
    (workdir / "write-shards").mkdir()
    start = time.perf_counter()
    for first in range(0, len(samples), shard_size):
        shard = ShardFile(workdir / "write-shards", synth_shard_name(first // shard_size))
        for sid, encoded, record in samples[first:first + shard_size]:
            shard.add(sid, encoded, record)
        shard.commit()
    return folder_seconds, time.perf_counter() - start, len(samples), size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=800, help="synthesis samples per run")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--blend", default="feather", help="matting is the official blend and the slowest")
    parser.add_argument("--variants", type=int, default=4, choices=(1, 2, 3, 4), help="clips made of each video")
    parser.add_argument("--rounds", type=int, default=2, help="forwards-and-backwards plays of its video per clip")
    parser.add_argument("--format", default="webdataset", choices=("webdataset", "folder"))
    parser.add_argument("--shard-size", type=int, default=8, help="samples per shard (units of work for synthesis)")
    args = parser.parse_args()
    from erasekit.dataset_tools.synth_job import run_synth_job
    from erasekit.dataset_tools.video_job import run_video_job

    workdir = Path(tempfile.mkdtemp(prefix="erasekit-scale-"))
    try:
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
        clips = make_clips(workdir, args.variants, args.rounds)
        tables = {
            "synthesis": compare("synth", lambda out, w, ray: synth_job(out, args, w, ray), run_synth_job,
                                 lambda s: s["written"], workdir),
            "video mining": compare("video", lambda out, w, ray: video_job(out, clips, args, w, ray), run_video_job,
                                    lambda s: s["written"], workdir),
        }
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
        reference = workdir / "synth-local-1"
        if args.format == "webdataset":
            from erasekit.dataset_tools.shards import shards_to_folder

            shards_to_folder(reference, workdir / "reference-folder")
            reference = workdir / "reference-folder"
        folder_seconds, shard_seconds, count, size = shard_write_throughput(reference, workdir, 32)
        print(f"\nwriting the same {count} samples ({size / 1e6:.1f} MB of PNGs):")
        print(f"  triplet folder: {count / folder_seconds:8.1f} samples/s {size / folder_seconds / 1e6:7.1f} MB/s")
        print(f"  shards of 32:   {count / shard_seconds:8.1f} samples/s {size / shard_seconds / 1e6:7.1f} MB/s "
              f"({folder_seconds / shard_seconds:.1f}x)")
        print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
