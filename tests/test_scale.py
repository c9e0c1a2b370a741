"""The Ray back-end (issue 21) on a local Ray with 2 CPUs, shared by the module: the same inputs and seed give the
single-machine path's samples (ids and bytes) in both formats; the model stages run in actor pools with the same
results; a task whose process dies is retried once, then recorded; killing a worker mid-run, or the driver and
then resuming, loses and duplicates nothing."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

from erasekit.dataset_tools import dataset_cli, scale, shards, synth_cli, video_cli  # noqa: E402
from erasekit.dataset_tools.triplets import TripletDataset  # noqa: E402
from erasekit.jobs import EXIT_FAILED, EXIT_OK, Host  # noqa: E402

HERE = Path(__file__).resolve().parent


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module: 2 CPUs, a small object store (the machine is shared)."""
    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def synth_args(shared_data, out, *extra, samples=20):
    images = shared_data / "images"
    return ["--backgrounds", str(images / "removal_pairs"), "--instances", str(images / "masked"),
            "--instances", str(images / "syn_triplets"), "--output", str(out), "--size", "96", "--blend", "hard",
            "--num-samples", str(samples), "--seed", "11", "--no-class-filter", "--no-progress", *extra]


def folder_files(folder):
    """{id: (source, mask, target PNG bytes, record)} of a triplet folder."""
    records = TripletDataset(folder).records
    return {r["id"]: (*[(Path(folder) / r[s]).read_bytes() for s in ("source", "mask", "target")], r) for r in records}


def samples(folder, but=None):
    """{id: (EncodedTriplet, record)} of a triplet folder or shard folder, leaving out the samples of video ``but``."""
    dataset = shards.open_triplets(str(folder))
    return {r["id"]: (dataset.encoded(i), r) for i, r in enumerate(dataset.records) if r.get("video") != but}


def shard_files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.suffix in (".tar", ".parquet")}


def worker_processes(kind):
    """PIDs of this test's Ray workers of ``kind`` tasks, busy ones first (the raylet we started is their parent)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            grandparent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(f"ray::MapWorker(FlatMap({kind}))") and grandparent == os.getpid():
            found.append((".submit" not in title, int(pid)))
    return [pid for _, pid in sorted(found)]  # busy ones first


def test_synthesis_on_ray_makes_the_single_machine_samples_in_both_formats(cluster, shared_data, tmp_path):
    for extra in ([], ["--format", "webdataset", "--shard-size", "4"]):
        here, there = tmp_path / f"local{len(extra)}", tmp_path / f"ray{len(extra)}"
        assert synth_cli.main(synth_args(shared_data, here, *extra)) == EXIT_OK
        assert synth_cli.main(synth_args(shared_data, there, *extra, "--ray", "--workers", "2")) == EXIT_OK
        if extra:
            assert shard_files(there) == shard_files(here) and len(shard_files(here)) == 10
            stats = json.loads((there / "_stats.json").read_text())
            assert stats["backend"] == "ray" and stats["written"] == 20 and stats["failed"] == {}
        else:
            assert folder_files(there) == folder_files(here) and len(folder_files(here)) == 20


def test_clip_scores_from_an_actor_pool_match_one_process(cluster, shared_data, tmp_path):
    clip = _load("_erasekit_test_synth_scale", HERE / "test_synth.py").build_tiny_clip(tmp_path / "clip")
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray"])):
        out = tmp_path / name
        assert synth_cli.main(synth_args(shared_data, out, "--clip-model", str(clip), *extra, samples=6)) == EXIT_OK
        table = json.loads((out / "instances.json").read_text())
        runs[name] = ({i["id"]: i["score"] for i in table["instances"]}, folder_files(out))
    assert runs["ray"] == runs["local"] and len(runs["local"][0]) == 5


def test_video_mining_on_ray_makes_the_single_machine_samples_in_both_formats(cluster, road_video, tmp_path):
    integrity = _load("_erasekit_test_video_integrity_scale", HERE / "test_video_integrity.py")
    crashing = integrity.write_bottom_up_avi(tmp_path / "bottom_up.avi", integrity.moving_block_frames())
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"\0" * 4096)
    videos = [str(road_video), str(crashing), str(broken)]
    base = ["--foreground-ratio", "0.05", "--max-frames", "140", "--sample-gap-seconds", "0.3"]
    for extra in ([], ["--format", "webdataset", "--shard-size", "3"]):
        here, there = tmp_path / f"local{len(extra)}", tmp_path / f"ray{len(extra)}"
        assert video_cli.main([*videos, "-o", str(here), *base, "--workers", "2", *extra]) == EXIT_FAILED  # broken
        assert video_cli.main([*videos, "-o", str(there), *base, "--ray", "--workers", "2", *extra]) == EXIT_FAILED
        # OpenCV aborts on bottom_up.avi when its corrupted heap is noticed, a moment that varies from run to run,
        # so whether a pair it mined before the abort was already sent (and kept) is a race on either back-end:
        # that video is compared by its report (status, decoder, the PyAV retry's pairs), the others sample by sample
        reports = [{Path(v["video"]).name: (v["status"], v["decoder"], v["pairs"])
                    + ((v["written"],) if Path(v["video"]).name != "bottom_up.avi" else ())
                    for v in json.loads((out / "video-summary.json").read_text())["videos"]} for out in (here, there)]
        assert reports[0] == reports[1] and reports[0]["broken.avi"][0] == "skipped"
        assert reports[0]["road_cars.avi"][2] >= 3 and reports[0]["bottom_up.avi"][2] >= 1
        assert samples(there, but="bottom_up.avi") == samples(here, but="bottom_up.avi")
        if extra:
            assert len(shards.ShardDataset(there)) == reports[0]["road_cars.avi"][2] + reports[0]["bottom_up.avi"][2]


def test_object_masks_from_a_masking_actor_pool_match_the_miners_own(cluster, road_video, tmp_path):
    tiny = _load("_erasekit_tiny_segmenters_scale", HERE / "comfy" / "tiny" / "segmenters.py")
    dino, sam = tiny.build_grounding_dino(tmp_path / "dino"), tiny.build_sam(tmp_path / "sam")
    video = str(road_video)
    base = ["--foreground-ratio", "0.04", "--max-frames", "100", "--grounding-dino", str(dino), "--sam-model", str(sam),
            "--prompt", "car"]
    results = []
    for name, extra in (("local", []), ("ray", ["--ray"])):
        video_cli.main([video, "-o", str(tmp_path / name), *base, *extra])
        [report] = json.loads((tmp_path / name / "video-summary.json").read_text())["videos"]
        results.append((report["status"], report["counts"], report["pairs"]))
    assert results[0] == results[1] and results[0][0] == "ok"
    counts, pairs = results[0][1], results[0][2]
    assert pairs or counts.get("rejected_segmenter") or counts.get("rejected_mask_misses_motion")  # it was asked


class Fragile(scale._Units):
    """A test worker: unit "once" kills its process the first time, "poison" every time."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def run(self, unit):
        marker = self.folder / f"{unit}.tried"
        tried = marker.exists()
        marker.write_text("x")
        if unit == "poison" or (unit == "once" and not tried):
            os.kill(os.getpid(), signal.SIGKILL)
        yield unit.upper()


def test_a_task_whose_process_dies_is_retried_once_then_recorded(cluster, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
    units = ["a", "once", "poison", "b"]
    results = dict(scale.stream(units, Fragile, (str(tmp_path),), workers=2))
    assert results == {0: "A", 1: "ONCE", 2: scale.TASK_DIED, 3: "B"}
    assert all((tmp_path / f"{u}.tried").exists() for u in units)


class KillOnce(Host):
    """A host that kills one busy Ray worker of ``kind`` once ``after`` units of work are done."""

    def __init__(self, kind, after):
        self.kind, self.after, self.killed = kind, after, []

    def progress(self, done, total, unit="items"):
        if not self.killed and unit == "samples" and done >= self.after:
            busy = worker_processes(self.kind)
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                self.killed.append(busy[0])


@pytest.mark.parametrize("output", ["webdataset", "folder"])
def test_killing_a_worker_mid_run_loses_and_duplicates_nothing(cluster, shared_data, tmp_path, output):
    from erasekit.dataset_tools.synth_cli import build_parser, job_from_args
    from erasekit.dataset_tools.synth_job import run_synth_job

    extra = ["--format", output, "--shard-size", "4"]
    assert synth_cli.main(synth_args(shared_data, tmp_path / "clean", *extra, samples=40)) == EXIT_OK
    args = build_parser().parse_args(synth_args(shared_data, tmp_path / "ray", *extra, "--ray", "--workers", "2",
                                                samples=40))
    host = KillOnce("SynthShards" if output == "webdataset" else "SynthSamples", after=8)
    summary = run_synth_job(job_from_args(args), host)
    assert host.killed, "no worker was killed mid-run"
    assert summary["written"] == 40 and summary["failed"] == {}
    if output == "webdataset":
        assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "clean")
    else:
        assert folder_files(tmp_path / "ray") == folder_files(tmp_path / "clean")


def test_a_killed_driver_resumes_from_the_finished_shards(cluster, shared_data, tmp_path):
    extra = ["--format", "webdataset", "--shard-size", "4"]
    assert synth_cli.main(synth_args(shared_data, tmp_path / "clean", *extra, samples=60)) == EXIT_OK
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "erasekit.dataset_tools.synth_cli",
               *synth_args(shared_data, out, *extra, "--ray", cluster, "--workers", "2", samples=60)]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = len(list(out.glob("*.parquet")))
    assert 3 <= finished < 15, "the driver was not killed mid-run"
    time.sleep(1.0)  # the cluster ends the dead driver's tasks
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["existing"] >= 12 and summary["existing"] + summary["written"] == 60
    assert shard_files(out) == shard_files(tmp_path / "clean")  # nothing lost, nothing twice
    assert not list(out.glob(".tmp-*"))
    assert dataset_cli.main(["check", str(out)]) == EXIT_OK
