"""Video4Removal mining (dataset_tools/video.py, video_cli.py) on the real clips in ../shared/data/video."""
import json
import os
import signal

import cv2
import numpy as np
import pytest

from erasekit.dataset_tools import video_decode as D
from erasekit.dataset_tools import video_mining as V
from erasekit.dataset_tools import video_cli
from erasekit.dataset_tools.video_isolation import VideoWorkerPool
from erasekit.dataset_tools.video_mining import VideoFinished, VideoProgress, VideoTask
from erasekit.dataset_tools.triplets import TripletDataset
from erasekit.erasers import masks as mask_ops

# Cars cover 4-14 % of road_cars' picture: the paper's 0.15 (close-up footage) would keep only two frames.
ROAD = V.PairingConfig(foreground_ratio=0.04)


@pytest.fixture(scope="module")
def busy_video(shared_video):
    return shared_video("highway_busy.avi")


@pytest.fixture(scope="module")
def road_pairs(road_video):
    """The whole video, one pass (the full-length path)."""
    return V.run_mining(road_video, ROAD)


def empty_road(road_video):
    """Frame 0 of road_cars shows the road without any car (checked by eye)."""
    return next(D.iter_frames(road_video))[1][..., ::-1].astype(np.float32)


def mse(a, b, where):
    return float(((a.astype(np.float32) - b.astype(np.float32))[where] ** 2).mean())


def test_road_cars_gives_pairs_with_a_car_in_the_mask_and_empty_road_in_the_target(road_video, road_pairs):
    pairs, report = road_pairs
    assert report.status == "ok" and report.reason == ""
    assert report.frames == 374
    assert len(pairs) >= 5, report.counts
    road = empty_road(road_video)
    for pair in pairs:
        mask = pair.mask
        assert 0.01 < mask.mean() < 0.3
        outside = ~mask_ops.resize_to_area(mask, 1.5)
        # the car is in the source inside the mask: very different from the empty road there
        assert mse(pair.source, road, mask) > 20 * mse(pair.source, pair.target, outside)
        assert mse(pair.source, pair.target, mask) > 1000
        # the target shows road where the car was: close to the empty road, and flat like it
        assert mse(pair.target, road, mask) < 25
        assert pair.target[mask].std() < 15 < pair.source[mask].std()
        # the pair is the same view under the same light (the car's shadow, darker in the source, is its own)
        shadow = (pair.source.astype(int) < pair.target.astype(int)).all(axis=2)
        assert mse(pair.source, pair.target, outside & ~shadow) < ROAD.lighting_mse
        assert pair.stats["mask_source"] == "mog"


def test_every_pair_is_within_the_window_and_the_lighting_threshold(road_pairs):
    pairs, report = road_pairs
    window = ROAD.window_seconds * report.fps
    for pair in pairs:
        assert abs(pair.frame - pair.background_frame) <= window
        assert pair.stats["mse_outside"] <= ROAD.lighting_mse
        assert pair.frame != pair.background_frame
    # pairs are at least the sample gap apart (no near-duplicates)
    frames = [p.frame for p in pairs]
    assert min(np.diff(frames)) >= ROAD.sample_gap_seconds * report.fps


def test_paper_threshold_keeps_only_large_objects(road_video):
    pairs, report = V.run_mining(road_video, V.PairingConfig())
    assert report.counts["foreground"] < V.run_mining(road_video, ROAD)[1].counts["foreground"]
    for pair in pairs:
        assert pair.stats["foreground_ratio"] > 0.15


@pytest.mark.parametrize("ratio", [0.15, 0.04])
def test_busy_highway_gives_no_pairs_and_says_why(busy_video, ratio):
    pairs, report = V.run_mining(busy_video, V.PairingConfig(foreground_ratio=ratio))
    assert report.status == "ok"
    assert len(pairs) <= 1
    if not pairs:
        assert report.reason.startswith("no pairs: ")
        assert any(words in report.reason for words in V.REASON_WORDS.values()) or "never empty" in report.reason
    rejected = sum(v for k, v in report.counts.items() if k.startswith("rejected_"))
    assert rejected >= 1  # it found busy frames and refused to pair them


def test_memory_is_bounded_by_the_bank_and_the_pending_queue(road_video):
    config = V.PairingConfig(foreground_ratio=0.04, bank_size=4, max_pending=3, window_seconds=10.0, analysis_fps=30)
    capture, fps, _, width, height = D.open_video(road_video)
    capture.release()
    miner = V.PairMiner(fps, width, height, config)
    largest_bank = largest_pending = pairs = 0
    for index, frame in D.iter_frames(road_video, step=miner.step):
        pairs += len(miner.push(index, frame))
        largest_bank = max(largest_bank, len(miner.bank))
        largest_pending = max(largest_pending, len(miner.pending))
    pairs += len(miner.finish())
    assert pairs >= 1
    assert largest_bank <= config.bank_size + 2
    assert largest_pending <= config.max_pending + 1


def test_motion_blurred_frames_are_rejected():
    """A sharp textured block crossing a static textured scene; some of its frames are motion-blurred."""
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (3, 3), 0)
    block = np.kron(rng.integers(0, 2, (8, 8, 1)) * 200 + 30, np.ones((10, 10, 3))).astype(np.uint8)  # 80×80
    blurred_frames = {34, 40, 46}
    miner = V.PairMiner(10, 160, 120, V.PairingConfig(sample_gap_seconds=0.1, window_seconds=5, analysis_fps=10))
    pairs = []
    for index in range(90):
        frame = background.copy()
        if 30 <= index < 50:
            x = (index - 30) * 4
            patch = block
            if index in blurred_frames:
                patch = cv2.blur(block, (25, 1))
            frame[20:100, x:x + 80] = patch
        pairs += miner.push(index, frame)
    pairs += miner.finish()
    assert miner.counts["rejected_blur"] == len(blurred_frames)
    paired = {p.frame for p in pairs}
    assert paired and not paired & blurred_frames
    for pair in pairs:
        assert 30 <= pair.frame < 50 and not 30 <= pair.background_frame < 50


def test_moving_camera_is_skipped_with_a_reason(road_video, tmp_path, write_video):
    frames = [f for _, f in D.iter_frames(road_video, stop=90)]
    panned = [cv2.resize(f[20:340, i:i + 560], (320, 182)) for i, f in enumerate(frames)]  # 1 px per frame
    path = write_video(tmp_path / "pan.avi", panned, 30)
    pairs, report = V.run_mining(path, ROAD)
    assert report.status == "skipped"
    assert "camera moves" in report.reason
    assert pairs == []


def test_static_clip_is_not_mistaken_for_a_moving_camera(road_video):
    _, report = V.run_mining(road_video, ROAD, stop=120)
    assert report.status == "ok"


def test_unopenable_and_truncated_files_are_skipped_with_a_reason(road_video, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    pairs, report = V.run_mining(junk)
    assert pairs == [] and report.status == "skipped"
    assert "cannot open" in report.reason or "no decodable frame" in report.reason
    truncated = tmp_path / "truncated.avi"
    data = road_video.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    pairs, report = V.run_mining(truncated, ROAD)
    assert report.status in ("ok", "skipped")
    assert "truncated" in report.reason or "cannot open" in report.reason
    missing = V.run_mining(tmp_path / "absent.avi")[1]
    assert missing.status == "skipped" and "does not exist" in missing.reason


def test_mask_augmentation_uses_the_mask_core():
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    mask[45:50, 45:60] = True
    rng = np.random.default_rng(1)
    dilated, info = V.augment_mask(mask, "dilate", rng)
    assert info["mode"] == "dilate" and dilated.sum() == round(mask.sum() * info["area_ratio"]) and (dilated >= mask).all()
    eroded, info = V.augment_mask(mask, "erode", rng)
    assert eroded.sum() == round(mask.sum() * info["area_ratio"]) and (eroded <= mask).all()
    boxes, info = V.augment_mask(np.pad(np.eye(10, dtype=bool), 5), "bbox", rng)
    assert boxes.sum() == 100
    assert V.augment_mask(mask, "none", rng)[0] is mask
    with pytest.raises(ValueError, match="mask_augment"):
        V.PairingConfig(mask_augment="blur")
    with pytest.raises(ValueError, match="background_ratio"):
        V.PairingConfig(background_ratio=0.5)


def test_a_crashing_child_fails_only_its_video(road_video, tmp_path):
    """Kill the child mid-video (as a decoder segfault would); the next video is still mined."""
    with VideoWorkerPool(ROAD, workers=1) as pool:
        reports = {}
        killed = False
        for event in pool.run([VideoTask(0, str(road_video)), VideoTask(1, str(road_video), 0, 150)]):
            if isinstance(event, VideoProgress) and event.job == 0 and not killed:
                os.kill(pool._workers[0].process.pid, signal.SIGKILL)
                killed = True
            elif isinstance(event, VideoFinished):
                reports[event.job] = event.report
    assert reports[0].status == "crashed" and "killed (likely out of memory)" in reports[0].reason
    assert reports[1].status == "ok" and reports[1].pairs >= 1


def test_cli_writes_resumes_and_shards(road_video, tmp_path, capsys):
    junk = tmp_path / "videos" / "broken.avi"
    junk.parent.mkdir()
    junk.write_bytes(b"\x00" * 4096)
    out = tmp_path / "dataset"
    args = [str(road_video), str(junk.parent), "-o", str(out), "--foreground-ratio", "0.04", "--max-frames", "160"]
    assert video_cli.main(args + ["--workers", "2"]) == 1  # broken.avi was skipped: exit 1, the rest is written
    dataset = TripletDataset(out)
    assert len(dataset) >= 3 and dataset.validate() == len(dataset)
    record = dataset.records[0]
    assert record["origin"]["kind"] == "video" and record["mask_source"] == "mog"
    assert record["params"]["foreground_ratio"] == 0.04
    summary = json.loads((out / "video-summary.json").read_text())
    by_name = {os.path.basename(v["video"]): v for v in summary["videos"]}
    assert by_name["broken.avi"]["status"] == "skipped" and by_name["broken.avi"]["reason"]
    assert by_name["road_cars.avi"]["written"] == len(dataset)
    # without --resume a filled folder is refused; with it nothing is redone
    assert video_cli.main(args) == 2
    assert "resume" in capsys.readouterr().err
    assert video_cli.main(args + ["--resume"]) == 1
    assert len(TripletDataset(out)) == len(dataset)
    # two shards fill one folder and read like one run
    sharded = tmp_path / "sharded"
    base = [str(road_video), str(junk), "-o", str(sharded), "--foreground-ratio", "0.04", "--max-frames", "160"]
    assert video_cli.main(base + ["--shard", "0/2"]) == 0  # road_cars.avi
    assert video_cli.main(base + ["--shard", "1/2"]) == 1  # broken.avi only: skipped, nothing written
    assert [r["id"] for r in TripletDataset(sharded).records] == [r["id"] for r in dataset.records]
    assert (sharded / "video-summary-shard-1-of-2.json").is_file()


def test_workers_run_when_the_pack_is_imported_under_another_name_and_leave_the_host_alone(road_video, tmp_path):
    """ComfyUI imports the pack under a path-like module name no child can import, with main.py as __main__: the
    workers must still run, from a copy of the pack outside any sys.path entry, and the host interpreter's
    sys.path, sys.modules and __main__ must be exactly as they were (checked in a fresh interpreter)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(V.__file__).resolve().parents[1]
    pack = tmp_path / "custom_nodes" / "ComfyUI-EraseKit"
    shutil.copytree(root, pack, ignore=shutil.ignore_patterns("tests", "workflows", "benchmarks", "*.egg-info",
                                                              "__pycache__", ".git"))
    script = f"""
import importlib, importlib.util, sys
name = {str(pack).replace('.', '_x_')!r}
spec = importlib.util.spec_from_file_location(name, {str(pack / '__init__.py')!r},
                                              submodule_search_locations=[{str(pack)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
isolation = importlib.import_module(name + ".dataset_tools.video_isolation")
mining = importlib.import_module(name + ".dataset_tools.video_mining")
path_before, modules_before, main_before = list(sys.path), set(sys.modules), sys.modules["__main__"]
with isolation.VideoWorkerPool(mining.PairingConfig(foreground_ratio=0.04), workers=2) as pool:
    events = list(pool.run([mining.VideoTask(0, {str(road_video)!r}, 0, 120), mining.VideoTask(1, {str(road_video)!r}, 0, 60)]))
assert sys.path == path_before, (path_before, sys.path)
assert not [m for m in set(sys.modules) - modules_before if "erasekit" in m.lower()], set(sys.modules) - modules_before
assert sys.modules["__main__"] is main_before
assert "erasekit" not in sys.modules
finished = [e for e in events if isinstance(e, mining.VideoFinished)]
assert sorted(e.report.status for e in finished) == ["ok", "ok"], finished
print("pairs", sum(isinstance(e, mining.PairMined) for e in events))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) >= 1
