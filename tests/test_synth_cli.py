"""erasekit-synth end to end: SIGKILL + resume, shards and workers make the same samples as one clean run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from erasekit.dataset_tools import synth_cli
from erasekit.dataset_tools.triplets import TripletDataset



def _load_tiny_clip_builder():
    """The tiny-CLIP builder lives in test_synth.py (pytest's importlib mode has no sibling imports)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_erasekit_test_synth", Path(__file__).with_name("test_synth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_clip


build_tiny_clip = _load_tiny_clip_builder()


def _args(shared_data, out, *extra):
    images = shared_data / "images"
    return [
        "--backgrounds", str(images / "removal_pairs"),
        "--instances", str(images / "masked"), "--instances", str(images / "syn_triplets"),
        "--output", str(out), "--size", "256", "--blend", "hard", "--num-samples", "30", "--seed", "7",
        "--no-class-filter", "--no-progress", *extra,
    ]


def _cli(args):
    return [sys.executable, "-m", "erasekit.dataset_tools.synth_cli", *args]


def _contents(folder):
    """{id: (source bytes, mask bytes, target bytes, params)} of a finished dataset, validated."""
    dataset = TripletDataset(folder)
    assert dataset.validate() == len(dataset)
    result = {}
    for i, record in enumerate(dataset.iter_records()):
        item = dataset[i]
        result[record["id"]] = (item["source"].tobytes(), item["mask"].tobytes(), item["target"].tobytes(), record["params"])
    return result


def _assert_clean(folder):
    named = {r["id"] for r in TripletDataset(folder).iter_records()}
    for sub in ("source", "mask", "target"):
        assert {p.stem for p in (folder / sub).iterdir()} == named, f"{sub}/ holds files no manifest names"


@pytest.fixture(scope="module")
def reference(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert synth_cli.main(_args(shared_data, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 30 and summary["skipped"] == {} and summary["failed"] == {}
    assert summary["filters"]["clip"] is False
    return _contents(out)


def test_sigkill_then_resume_equals_an_uninterrupted_run(shared_data, tmp_path, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(_args(shared_data, out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not manifest.exists() or len(manifest.read_text().splitlines()) < 6):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = len(manifest.read_text().splitlines())
    assert 6 <= lines < 30, "the run was not killed halfway"
    halfway = TripletDataset(out)  # a killed folder is already a valid dataset
    assert halfway.validate() == len(halfway)
    done = subprocess.run(_cli(_args(shared_data, out, "--resume")), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["existing"] >= 6 and summary["existing"] + summary["written"] == 30
    _assert_clean(out)
    assert not list(out.glob("*/.tmp-*"))
    assert _contents(out) == reference


def test_shards_and_workers_make_the_same_samples(shared_data, tmp_path, reference):
    out = tmp_path / "sharded"
    assert synth_cli.main(_args(shared_data, out, "--shard", "0/2", "--workers", "2")) == 0
    assert synth_cli.main(_args(shared_data, out, "--shard", "1/2")) == 0
    assert (out / "manifest-shard-0-of-2.jsonl").exists() and (out / "summary-shard-1-of-2.json").exists()
    assert _contents(out) == reference


def test_clip_filter_runs_from_a_local_model_and_is_recorded(shared_data, tmp_path):
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "clip_run"
    assert synth_cli.main(_args(shared_data, out, "--clip-model", str(clip), "--num-samples", "4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["filters"]["clip"] is True and summary["filters"]["class_count"] is False
    assert 1 <= summary["instances"] <= 5
    records = list(TripletDataset(out).iter_records())
    assert records and all(r["filters"]["clip"] is True for r in records)
    scores = {i["id"]: i["score"] for i in json.loads((out / "instances.json").read_text())["instances"]}
    assert len(scores) == 5 and all(isinstance(v, float) for v in scores.values())


def test_resumed_runs_reuse_the_scored_instance_table(shared_data, tmp_path, monkeypatch):
    from erasekit.dataset_tools import clip_score

    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    assert synth_cli.main(_args(shared_data, out, "--clip-model", str(clip), "--num-samples", "2")) == 0
    calls = []
    original = clip_score.ClipScorer.from_folder
    monkeypatch.setattr(clip_score.ClipScorer, "from_folder", classmethod(lambda cls, *a: calls.append(a) or original(*a)))
    assert synth_cli.main(_args(shared_data, out, "--clip-model", str(clip), "--num-samples", "4", "--resume")) == 0
    assert calls == [] and len(TripletDataset(out)) == 4  # resumed: no CLIP model loaded again
    (clip / "config.json").touch()  # another model (newer file) → scored again
    assert synth_cli.main(_args(shared_data, out, "--clip-model", str(clip), "--num-samples", "4", "--resume")) == 0
    assert len(calls) == 1


def test_cli_errors_are_sentences(shared_data, tmp_path, capsys):
    images = shared_data / "images"
    assert synth_cli.main(["--backgrounds", str(images / "removal_pairs"), "--output", str(tmp_path)]) == 2
    assert "no instance source" in capsys.readouterr().err
    args = _args(shared_data, tmp_path / "x", "--shard", "2/2")
    assert synth_cli.main(args) == 2
    assert "out of range" in capsys.readouterr().err
    # the official class filter (≥ 6 instances per class) leaves nothing from 5 real instances
    args = [a for a in _args(shared_data, tmp_path / "y") if a != "--no-class-filter"]
    assert synth_cli.main(args) == 2
    assert "no instance passed the filters" in capsys.readouterr().err


def test_sam_proposals_are_an_instance_source(shared_data, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "_erasekit_tiny_segmenters_synth", Path(__file__).parent / "comfy" / "tiny" / "segmenters.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    sam = tiny.build_sam(tmp_path / "sam")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "dog_bench.png").write_bytes((shared_data / "images" / "masked" / "dog_bench.png").read_bytes())
    out = tmp_path / "sam_run"
    args = [
        "--backgrounds", str(shared_data / "images" / "removal_pairs"), "--sam-model", str(sam),
        "--sam-images", str(photos), "--sam-points", "3", "--sam-score=-1e9", "--output", str(out),
        "--size", "256", "--blend", "hard", "--num-samples", "3", "--no-class-filter", "--no-area-filter", "--no-progress",
    ]
    assert synth_cli.main(args) == 0
    masks = sorted((out / "sam_masks" / "0").glob("dog_bench-*_sam*.png"))  # the photo's content hash in the name
    assert masks and not list((out / "sam_masks" / "0").glob(".tmp-*"))
    records = list(TripletDataset(out).iter_records())
    assert len(records) == 3
    assert all(r["origin"]["instance"].startswith("sam-dog_bench-") for r in records)
    assert json.loads((out / "summary.json").read_text())["instances"] == len(masks)
