"""Video4Removal datasets you can trust: videos are told apart by content, a run's settings are part of the dataset,
a damaged manifest stops the run, a decoder crash falls back to PyAV, and every failure is named (issue 19)."""
import json
import os
import signal
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest

from erasekit.dataset_tools import video_cli
from erasekit.dataset_tools import video_decode as D
from erasekit.dataset_tools import video_mining as V
from erasekit.dataset_tools.triplets import TripletDataset
from erasekit.dataset_tools.video_isolation import VideoWorkerPool
from erasekit.dataset_tools.video_mining import PairMined, VideoFinished, VideoTask
from erasekit.jobs import EXIT_FAILED, EXIT_OK, EXIT_USAGE

ROAD = ["--foreground-ratio", "0.04"]


@pytest.fixture(scope="module")
def two_cameras(road_video, write_video, tmp_path_factory):
    """cam1/clip.avi and cam2/clip.avi: the same name and byte size, different pictures (the second camera sees
    the road mirrored), and cars at the same frame numbers, so name-and-size ids made their samples collide."""
    root = tmp_path_factory.mktemp("cameras")
    frames = [frame for _, frame in D.iter_frames(road_video, stop=180)]
    for camera in ("cam1", "cam2"):
        (root / camera).mkdir()
    first = write_video(root / "cam1" / "clip.avi", frames)
    second = write_video(root / "cam2" / "clip.avi", [f[:, ::-1].copy() for f in frames])
    sizes = [first.stat().st_size, second.stat().st_size]
    with open(first if sizes[0] < sizes[1] else second, "ab") as handle:
        handle.write(b"\0" * abs(sizes[0] - sizes[1]))  # trailing bytes after the AVI: decoders ignore them
    assert first.stat().st_size == second.stat().st_size and first.read_bytes() != second.read_bytes()
    return root


def test_two_videos_with_the_same_name_and_size_are_both_mined(two_cameras, tmp_path):
    out = tmp_path / "dataset"
    assert video_cli.main([str(two_cameras), "-o", str(out), *ROAD]) == EXIT_OK
    summary = json.loads((out / "video-summary.json").read_text())
    assert len(summary["videos"]) == 2
    for video in summary["videos"]:
        assert video["status"] == "ok" and video["pairs"] >= 3 and video["written"] == video["pairs"], video
    assert summary["already_present"] == 0
    dataset = TripletDataset(out)
    assert len(dataset) == sum(v["pairs"] for v in summary["videos"])
    assert len({r["origin"]["video_id"] for r in dataset.records}) == 2


def test_video_id_is_the_content(tmp_path):
    small = tmp_path / "a" / "clip.avi"
    small.parent.mkdir()
    small.write_bytes(b"x" * 1000)
    copy = tmp_path / "b" / "renamed.avi"
    copy.parent.mkdir()
    copy.write_bytes(b"x" * 1000)
    other = tmp_path / "c" / "clip.avi"
    other.parent.mkdir()
    other.write_bytes(b"x" * 999 + b"y")
    assert V.video_id(small).split("-")[-1] == V.video_id(copy).split("-")[-1]  # same bytes, same content hash
    assert V.video_id(small) != V.video_id(other)
    # a large file: its first and last MiB and its size decide
    big = bytearray(os.urandom(3 << 20))
    (tmp_path / "big1.avi").write_bytes(bytes(big))
    big[-1] ^= 1
    (tmp_path / "big2.avi").write_bytes(bytes(big))
    assert V.video_id(tmp_path / "big1.avi") != V.video_id(tmp_path / "big2.avi")


def test_a_corrupt_manifest_line_stops_the_resumed_run_and_names_the_repair(road_video, tmp_path, capsys):
    out = tmp_path / "dataset"
    args = [str(road_video), "-o", str(out), *ROAD, "--max-frames", "160"]
    assert video_cli.main(args) == EXIT_OK
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    victim = json.loads(lines[1])["id"]
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"  # damaged in the middle, not a torn last line
    manifest.write_text("".join(lines))
    capsys.readouterr()
    assert video_cli.main(args + ["--resume"]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "line 2" in error and f"erasekit-dataset repair {out}" in error
    for sub in ("source", "mask", "target"):  # nothing was deleted
        assert (out / sub / f"{victim}.png").is_file()
    with pytest.raises(ValueError, match="line 2"):
        TripletDataset(out)


def test_resuming_with_other_settings_is_refused_unless_appending(road_video, tmp_path, capsys):
    out = tmp_path / "dataset"
    base = [str(road_video), "-o", str(out), "--max-frames", "160"]
    assert video_cli.main(base + ROAD) == EXIT_OK
    first = TripletDataset(out).records
    info = json.loads((out / "dataset.json").read_text())
    assert [run["settings"]["foreground_ratio"] for run in info["runs"]] == [0.04]
    capsys.readouterr()
    assert video_cli.main(base + ["--resume", "--foreground-ratio", "0.03"]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "foreground_ratio" in error and "0.04" in error and "0.03" in error and "--append" in error
    assert len(TripletDataset(out)) == len(first)
    summary = json.loads((out / "video-summary.json").read_text())
    assert summary["params"]["foreground_ratio"] == 0.04  # the summary still describes the samples there
    # the same settings resume; other settings are added only on request, and every new sample says how it was made
    assert video_cli.main(base + ROAD + ["--resume"]) == EXIT_OK
    assert video_cli.main(base + ["--append", "--foreground-ratio", "0.03"]) in (EXIT_OK, EXIT_FAILED)
    records = TripletDataset(out).records
    runs = json.loads((out / "dataset.json").read_text())["runs"]
    assert [run["settings"]["foreground_ratio"] for run in runs] == [0.04, 0.03]
    added = [r for r in records if r["id"] not in {f["id"] for f in first}]
    assert added and all(r["settings"]["foreground_ratio"] == 0.03 for r in added)
    assert all(r["settings_id"] == runs[1]["settings_id"] for r in added)
    assert all(r["settings_id"] == runs[0]["settings_id"] for r in records if r not in added)


def test_a_worker_killed_by_sigkill_is_reported_as_killed_with_its_pairs(road_video):
    with VideoWorkerPool(V.PairingConfig(foreground_ratio=0.04), workers=1) as pool:
        mined, report = 0, None
        for event in pool.run([VideoTask(0, str(road_video))]):
            if isinstance(event, PairMined):
                mined += 1
                if mined == 2:
                    os.kill(pool._workers[0].process.pid, signal.SIGKILL)
            elif isinstance(event, VideoFinished):
                report = event.report
    assert report.status == "crashed"
    assert "killed (likely out of memory)" in report.reason and "crashes the decoder" not in report.reason
    assert report.pairs == mined == 2


def write_bottom_up_avi(path, frames, fps=10):
    """An uncompressed AVI whose frames are stored bottom-up (a positive BITMAPINFOHEADER height), as old Windows
    tools write them (bgslibrary's dataset/demo.avi is one): OpenCV 5's FFmpeg reader corrupts its heap on it and
    aborts, PyAV decodes it."""
    av = pytest.importorskip("av")
    out = av.open(str(path), "w")
    stream = out.add_stream("rawvideo", rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "bgr24"
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    data = bytearray(path.read_bytes())
    at = data.index(b"strf") + 8  # BITMAPINFOHEADER: biSize, biWidth, biHeight
    struct.pack_into("<i", data, at + 8, abs(struct.unpack_from("<i", data, at + 8)[0]))
    path.write_bytes(bytes(data))
    return path


def moving_block_frames(count=100, start=30, stop=60):
    """A textured static scene crossed by a textured block during frames [start, stop)."""
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (5, 5), 0)
    block = np.kron(rng.integers(0, 2, (6, 6, 1)) * 200 + 30, np.ones((8, 8, 3))).astype(np.uint8)
    frames = []
    for index in range(count):
        frame = background.copy()
        if start <= index < stop:
            x = (index - start) * 3
            frame[30:78, x:x + 48] = block
        frames.append(frame)
    return frames


def test_a_video_that_crashes_opencv_is_decoded_with_pyav(tmp_path):
    video = write_bottom_up_avi(tmp_path / "bottom_up.avi", moving_block_frames())
    probe = subprocess.run([sys.executable, "-c", "import cv2, sys\ncapture = cv2.VideoCapture(sys.argv[1])\n"
                            "while capture.read()[0]:\n    pass\n", str(video)], capture_output=True, timeout=60)
    if probe.returncode >= 0:
        pytest.skip("this OpenCV decodes bottom-up uncompressed AVI files without crashing: nothing to fall back from")
    out = tmp_path / "dataset"
    assert video_cli.main([str(video), "-o", str(out), "--foreground-ratio", "0.05",
                           "--sample-gap-seconds", "0.3"]) == EXIT_OK
    summary = json.loads((out / "video-summary.json").read_text())
    [report] = summary["videos"]
    assert report["status"] == "ok" and report["decoder"] == "pyav" and report["frames"] == 100
    assert "OpenCV" in report["fallback"] and report["pairs"] >= 1
    records = TripletDataset(out).records
    assert records and all(r["decoder"] == "pyav" for r in records)


def test_pyav_frames_match_opencv_frames(road_video):
    opencv = [frame for _, frame in D.iter_frames(road_video, start=5, stop=40, step=7)]
    pyav = [frame for _, frame in D.iter_frames(road_video, start=5, stop=40, step=7, decoder="pyav")]
    assert len(opencv) == len(pyav) == 5
    for a, b in zip(opencv, pyav):
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


@pytest.mark.parametrize("kind", ["file", "missing parent", "unwritable"])
def test_the_output_path_is_checked_before_any_work(road_video, unusable_output, capsys, kind):
    out = unusable_output(kind)
    assert video_cli.main([str(road_video), "-o", str(out), *ROAD, "--max-frames", "60"]) == EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error and str(out) in error
    assert {"file": "is a file", "missing parent": "does not exist", "unwritable": "not writable"}[kind] in error


def test_a_write_failure_mid_run_stops_cleanly_with_the_summary_written(road_video, tmp_path, monkeypatch, capsys):
    from erasekit.dataset_tools import triplets

    calls = []
    original = triplets.TripletWriter.write_encoded  # what the mining job writes with

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(triplets.TripletWriter, "write_encoded", full_disk)
    out = tmp_path / "dataset"
    assert video_cli.main([str(road_video), "-o", str(out), *ROAD]) == EXIT_FAILED
    error = capsys.readouterr().err
    assert "Traceback" not in error and "No space left on device" in error
    summary = json.loads((out / "video-summary.json").read_text())
    assert "No space left on device" in summary["stopped"]
    assert summary["written"] == 2 and len(TripletDataset(out)) == 2


def test_skip_reasons_name_the_first_files(road_video, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(7):
        (videos / f"junk{index}.avi").write_bytes(bytes([index]) * 4096)  # different bytes: no duplicates
    os.link(road_video, videos / "road.avi")
    out = tmp_path / "dataset"
    assert video_cli.main([str(videos), "-o", str(out), *ROAD, "--max-frames", "100"]) == EXIT_FAILED
    summary = json.loads((out / "video-summary.json").read_text())
    [(reason, skipped)] = summary["skipped"].items()
    assert skipped["count"] == 7 and skipped["first"][:3] == ["junk0.avi", "junk1.avi", "junk2.avi"]
    assert len(skipped["first"]) < 7  # the first few, not a list as long as the dataset
    console = capsys.readouterr().err
    assert "junk0.avi, junk1.avi, junk2.avi" in console


def test_identical_videos_are_mined_once(road_video, tmp_path):
    videos = tmp_path / "videos"
    (videos / "a").mkdir(parents=True)
    (videos / "b").mkdir()
    os.symlink(road_video, videos / "a" / "road.avi")
    (videos / "b" / "copy.avi").write_bytes(road_video.read_bytes())
    out = tmp_path / "dataset"
    assert video_cli.main([str(videos), "-o", str(out), *ROAD, "--max-frames", "120"]) == EXIT_OK
    summary = json.loads((out / "video-summary.json").read_text())
    statuses = sorted((v["status"], v["reason"][:25]) for v in summary["videos"])
    assert [s for s, _ in statuses] == ["duplicate", "ok"], statuses
