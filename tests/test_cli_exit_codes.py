"""Every erasekit-* command of the dataset and mask tools exits the same way (jobs.py): 0 done, 1 failed items or
an error, 2 bad arguments, 130 interrupted with the finished work kept."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from erasekit.dataset_tools import synth, synth_cli, video_cli
from erasekit.dataset_tools.triplets import TripletDataset
from erasekit.erasers import masks, masks_cli, smarteraser_convert
from erasekit.jobs import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


def _mask_folder(path, broken=False):
    path.mkdir()
    square = np.zeros((48, 48), np.uint8)
    square[12:36, 12:36] = 255
    for name in ("a", "b", "c"):
        Image.fromarray(square).save(path / f"{name}.png")
    if broken:
        (path / "broken.png").write_bytes(b"not a png")
    return path


def test_masks_exit_codes(tmp_path, monkeypatch, capsys):
    good = _mask_folder(tmp_path / "good")
    assert masks_cli.main([str(good), str(tmp_path / "out")]) == EXIT_OK
    assert masks_cli.main([str(_mask_folder(tmp_path / "bad", broken=True)), str(tmp_path / "out2")]) == EXIT_FAILED
    assert masks_cli.main([str(tmp_path / "absent"), str(tmp_path / "out3")]) == EXIT_USAGE
    (tmp_path / "file").write_text("x")
    assert masks_cli.main([str(good), str(tmp_path / "file")]) == EXIT_USAGE
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        masks_cli.main([str(good), str(tmp_path / "out4"), "--variants", "0"])
    assert exit_info.value.code == EXIT_USAGE

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(masks, "irregularize", interrupted)
    assert masks_cli.main([str(good), str(tmp_path / "out5")]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def _synth_args(shared_data, out, *extra):
    images = shared_data / "images"
    return ["--backgrounds", str(images / "removal_pairs"), "--instances", str(images / "masked"),
            "--output", str(out), "--size", "128", "--blend", "hard", "--num-samples", "4", "--no-class-filter",
            "--no-progress", *extra]


def test_synth_exit_codes(shared_data, tmp_path, monkeypatch, capsys):
    assert synth_cli.main(_synth_args(shared_data, tmp_path / "ok")) == EXIT_OK
    capsys.readouterr()
    # a background that is not an image: the samples drawn on it are drawn again with another, the file is named
    backgrounds = tmp_path / "backgrounds"
    shutil.copytree(shared_data / "images" / "removal_pairs", backgrounds)
    (backgrounds / "000_broken.jpg").write_bytes(b"not a jpeg")
    args = _synth_args(shared_data, tmp_path / "redrawn")
    args[1] = str(backgrounds)
    assert synth_cli.main(args) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"]["unreadable image"]["first"] == ["000_broken.jpg"] and summary["written"] == 4
    # only bad backgrounds: no sample can be made
    junk = tmp_path / "junk"
    junk.mkdir()
    for index in range(3):
        (junk / f"{index}.jpg").write_bytes(b"not a jpeg %d" % index)
    args[1], args[args.index("--output") + 1] = str(junk), str(tmp_path / "failed")
    assert synth_cli.main(args) == EXIT_FAILED
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 0 and summary["failed"]["unreadable image"]["count"] == 4
    assert synth_cli.main(["--backgrounds", str(backgrounds), "--output", str(tmp_path / "x")]) == EXIT_USAGE
    assert synth_cli.main(_synth_args(shared_data, tmp_path / "y", "--shard", "3/2")) == EXIT_USAGE
    with pytest.raises(SystemExit) as exit_info:
        synth_cli.main(["--output", str(tmp_path / "z")])
    assert exit_info.value.code == EXIT_USAGE

    calls = []

    def interrupt_third(plan, index):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(plan, index)

    original = synth.make_sample
    monkeypatch.setattr(synth, "make_sample", interrupt_third)
    out = tmp_path / "interrupted"
    assert synth_cli.main(_synth_args(shared_data, out)) == EXIT_INTERRUPTED
    assert len(TripletDataset(out)) == 2  # the samples made before Ctrl-C are kept


def test_video_exit_codes(road_video, tmp_path, capsys):
    road = road_video
    common = ["--foreground-ratio", "0.04", "--max-frames", "120"]
    assert video_cli.main([str(road), "-o", str(tmp_path / "ok"), *common]) == EXIT_OK
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"\0" * 4096)
    assert video_cli.main([str(broken), "-o", str(tmp_path / "failed"), *common]) == EXIT_FAILED
    assert video_cli.main([str(road), "-o", str(tmp_path / "x"), "--shard", "2/2"]) == EXIT_USAGE
    with pytest.raises(SystemExit) as exit_info:
        video_cli.main([str(road), "-o", str(tmp_path / "x"), "--mask-augment", "blur"])
    assert exit_info.value.code == EXIT_USAGE
    assert video_cli.main([str(road), "-o", str(tmp_path / "x"), "--max-frames", "0"]) == EXIT_USAGE
    assert video_cli.main([str(tmp_path / "absent.avi"), "-o", str(tmp_path / "x")]) == EXIT_USAGE
    assert video_cli.main([str(road), "-o", str(tmp_path / "x"), "--prompt", "car"]) == EXIT_USAGE
    assert "need all three" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_video_ctrl_c_exits_130_with_the_summary_written_and_no_worker_left(road_video, tmp_path):
    """A real Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while videos are being mined."""
    road = road_video
    videos = tmp_path / "videos"
    videos.mkdir()
    data = road.read_bytes()
    for index in range(24):  # 24 different files (a trailing byte each): copies of one file are mined once
        (videos / f"clip{index:02d}.avi").write_bytes(data + bytes([index]))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "erasekit.dataset_tools.video_cli", str(videos), "-o", str(out),
               "--foreground-ratio", "0.04"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    summary = out / "video-summary.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (summary.is_file() and json.loads(summary.read_text())["videos"]):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "interrupted" in stderr
    finished = json.loads(summary.read_text())["videos"]
    assert 1 <= len(finished) < 24 and all(v["status"] == "ok" for v in finished)
    dataset = TripletDataset(out)  # the finished videos' samples, and those of the video in flight, are kept
    assert dataset.validate() >= sum(v["written"] for v in finished) >= 1
    left = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"worker processes survived the interrupted run: {left}"


def test_convert_smarteraser_exit_codes(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    assert smarteraser_convert.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == EXIT_USAGE
    assert "no unet weights" in capsys.readouterr().err
    assert smarteraser_convert.main([str(tmp_path / "absent"), str(tmp_path / "out")]) == EXIT_USAGE
    unet = tmp_path / "broken" / "unet"
    unet.mkdir(parents=True)
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{tru")
    assert smarteraser_convert.main([str(tmp_path / "broken"), str(tmp_path / "out")]) == EXIT_FAILED
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(smarteraser_convert, "convert", interrupted)
    assert smarteraser_convert.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == EXIT_INTERRUPTED
