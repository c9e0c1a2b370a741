"""Triplet datasets you can trust (issue 19): a damaged manifest stops a run with the line and the repair command,
``erasekit-dataset check`` / ``repair`` validate and mend a folder without deleting anything, a run's settings are
part of the dataset, synthesis resumes only when asked and replaces samples lost to bad files, and every command
checks its output path and names the files it skipped."""
import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from erasekit.dataset_tools import synth_cli
from erasekit.dataset_tools.triplets import TripletDataset, TripletWriter
from erasekit.erasers import masks_cli, smarteraser_convert
from erasekit.jobs import EXIT_FAILED, EXIT_OK, EXIT_USAGE

ORIGIN = {"kind": "image", "image": "x.png", "instance": "i"}


def sample(seed, size=(24, 32)):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = rng.random(size) > 0.6
    source = np.where(mask[..., None], 255 - target, target).astype(np.uint8)
    return source, mask, target


def small_dataset(root, count=4):
    with TripletWriter(root) as writer:
        for index in range(count):
            writer.write(f"s{index}", *sample(index), {"origin": ORIGIN})
    return root


def files_of(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


# --- manifest integrity ------------------------------------------------------------------------------------------

def test_a_corrupt_line_in_the_middle_stops_the_writer_and_the_reader(tmp_path):
    root = small_dataset(tmp_path / "ds")
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    lines[1] = "{not json\n"
    manifest.write_text("".join(lines))
    before = files_of(root)
    with pytest.raises(ValueError, match=r"line 2 .*erasekit-dataset repair"):
        TripletWriter(root, resume=True)
    with pytest.raises(ValueError, match="line 2"):
        TripletDataset(root)
    assert files_of(root) == before and manifest.read_text() == "".join(lines)  # nothing touched


def test_a_torn_last_line_is_a_killed_append_and_is_tolerated(tmp_path):
    root = small_dataset(tmp_path / "ds")
    with open(root / "manifest.jsonl", "a") as handle:
        handle.write('{"id": "s9", "sou')
    assert len(TripletDataset(root)) == 4
    with TripletWriter(root, resume=True) as writer:
        writer.write("s4", *sample(4), {"origin": ORIGIN})
    assert [r["id"] for r in TripletDataset(root).records] == ["s0", "s1", "s2", "s3", "s4"]


def test_resume_never_deletes_sample_files(tmp_path):
    root = small_dataset(tmp_path / "ds")
    cv2.imwrite(str(root / "source" / "orphan.png"), np.zeros((4, 4, 3), np.uint8))  # killed before its line
    (root / "manifest.jsonl").rename(root / "lost.jsonl")  # a manifest the user moved away
    (root / "manifest.jsonl").write_text("")
    before = files_of(root)
    with TripletWriter(root, resume=True) as writer:
        writer.write("s7", *sample(7), {"origin": ORIGIN})
    assert set(before) <= set(files_of(root)), "a resumed writer deleted sample files"


def test_a_record_whose_files_are_gone_stops_the_resumed_run(tmp_path):
    root = small_dataset(tmp_path / "ds")
    (root / "target" / "s2.png").unlink()
    with pytest.raises(ValueError, match=r"line 3 .*target/s2.png.*erasekit-dataset repair"):
        TripletWriter(root, resume=True)
    assert (root / "source" / "s2.png").is_file()


# --- check and repair --------------------------------------------------------------------------------------------

def test_check_and_repair_mend_a_damaged_folder_without_deleting_anything(tmp_path, capsys):
    from erasekit.dataset_tools import dataset_cli

    root = small_dataset(tmp_path / "ds", 6)
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"  # s1: record lost, its three files complete
    manifest.write_text("".join(lines))
    (root / "target" / "s3.png").unlink()  # s3: a record whose target is gone
    (root / "mask" / "s4.png").write_bytes(b"not a png")  # s4: a damaged file
    cv2.imwrite(str(root / "source" / "stray.png"), np.zeros((4, 4, 3), np.uint8))  # an orphan without partners
    pngs_before = {p.name + p.parent.name for p in root.rglob("*.png")}

    assert dataset_cli.main(["check", str(root)]) == EXIT_FAILED
    report = capsys.readouterr().out
    for words in ("manifest.jsonl line 2", "target/s3.png", "mask/s4.png", "source/stray.png", "repair"):
        assert words in report, words

    assert dataset_cli.main(["repair", str(root)]) == EXIT_OK
    capsys.readouterr()
    dataset = TripletDataset(root)
    assert [r["id"] for r in dataset.records] == ["s0", "s1", "s2", "s5"]
    assert dataset.validate() == 4
    rebuilt = next(r for r in dataset.records if r["id"] == "s1")
    assert rebuilt["origin"]["kind"] == "recovered" and (rebuilt["width"], rebuilt["height"]) == (32, 24)
    recovered = [p for p in root.rglob("*.png") if "recovered" in p.parts]
    assert {p.name for p in recovered} >= {"s3.png", "s4.png", "stray.png"}  # moved aside, never deleted
    assert pngs_before <= {p.name + p.parent.name for p in root.rglob("*.png")} | {"s3.pngtarget"}
    kept_lines = "".join(p.read_text() for p in root.rglob("*.jsonl") if "recovered" in p.parts)
    assert lines[1].strip() in kept_lines and '"s3"' in kept_lines  # the damaged and rejected lines are kept
    assert dataset_cli.main(["check", str(root)]) == EXIT_OK
    assert dataset_cli.main(["check", str(tmp_path / "absent")]) == EXIT_USAGE


def test_repair_rebuilds_a_lost_manifest_from_the_files(tmp_path):
    from erasekit.dataset_tools import dataset_cli

    root = small_dataset(tmp_path / "ds")
    (root / "manifest.jsonl").unlink()
    assert dataset_cli.main(["repair", str(root)]) == EXIT_OK
    assert [r["id"] for r in TripletDataset(root).records] == ["s0", "s1", "s2", "s3"]


# --- synthesis: settings, resume, redraws, names -----------------------------------------------------------------

def synth_args(shared_data, out, *extra, samples=4):
    images = shared_data / "images"
    return ["--backgrounds", str(images / "removal_pairs"), "--instances", str(images / "masked"),
            "--output", str(out), "--size", "128", "--blend", "hard", "--num-samples", str(samples),
            "--no-class-filter", "--no-progress", *extra]


def test_synthesis_resumes_only_when_asked_and_never_mixes_settings(shared_data, tmp_path, capsys):
    out = tmp_path / "syn"
    assert synth_cli.main(synth_args(shared_data, out, "--seed", "0")) == EXIT_OK
    first = {r["id"]: r for r in TripletDataset(out).records}
    capsys.readouterr()
    # the reproduction: more samples at another seed
    assert synth_cli.main(synth_args(shared_data, out, "--seed", "5", samples=6)) == EXIT_USAGE
    assert "--resume" in capsys.readouterr().err
    assert synth_cli.main(synth_args(shared_data, out, "--seed", "5", "--resume", samples=6)) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "seed" in error and "0" in error and "5" in error and "--append" in error
    assert len(TripletDataset(out)) == 4
    # the same settings resume (and extend); other settings only with --append, recorded per sample
    assert synth_cli.main(synth_args(shared_data, out, "--seed", "0", "--resume", samples=5)) == EXIT_OK
    assert synth_cli.main(synth_args(shared_data, out, "--seed", "5", "--append", samples=6)) == EXIT_OK
    records = {r["id"]: r for r in TripletDataset(out).records}
    runs = json.loads((out / "dataset.json").read_text())["runs"]
    assert [run["settings"]["seed"] for run in runs] == [0, 5]
    assert all(records[i]["settings_id"] == runs[0]["settings_id"] for i in first) and "settings" not in records["00000004"]
    assert records["00000005"]["settings"]["seed"] == 5 and records["00000005"]["params"]["seed"] == 5


def broken_backgrounds(shared_data, tmp_path):
    folder = tmp_path / "backgrounds"
    shutil.copytree(shared_data / "images" / "removal_pairs", folder)
    (folder / "000_broken.jpg").write_bytes(b"not a jpeg")
    (folder / "001_cut.jpg").write_bytes((folder / "unwant_person.jpg").read_bytes()[:3000])
    return folder


def test_samples_lost_to_bad_files_are_drawn_again(shared_data, tmp_path, capsys):
    args = synth_args(shared_data, tmp_path / "syn", samples=16)
    args[1] = str(broken_backgrounds(shared_data, tmp_path))
    assert synth_cli.main(args) == EXIT_OK  # 16 asked, 16 written: the bad files only cost other draws
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 16 and len(TripletDataset(tmp_path / "syn")) == 16 and summary["redrawn"] >= 2
    skipped = summary["skipped"]
    assert skipped["unreadable image"] == {"count": 1, "first": ["000_broken.jpg"]}
    assert skipped["truncated image"] == {"count": 1, "first": ["001_cut.jpg"]}


def test_instance_masks_of_the_wrong_size_are_refused_when_collected(shared_data, tmp_path, capsys):
    instances = tmp_path / "instances"
    instances.mkdir()
    photo = Image.open(shared_data / "images" / "masked" / "dog_bench.png").convert("RGB")
    for index in range(10):
        photo.save(instances / f"obj{index}.png")
        mask = Image.new("L", (40, 30), 0)  # not the photo's size
        mask.paste(255, (10, 8, 30, 22))
        mask.save(instances / f"obj{index}_mask.png")
    out = tmp_path / "syn"
    args = synth_args(shared_data, out, samples=10)
    args[3] = str(instances)
    assert synth_cli.main(args) == EXIT_FAILED
    error = capsys.readouterr().err
    assert "mask size differs from image" in error and "obj0_mask.png" in error and "(10)" in error
    assert not out.exists()  # an error exit leaves nothing behind


def test_instances_are_told_apart_by_content(shared_data, tmp_path):
    from erasekit.dataset_tools import instances as inst

    masked = shared_data / "images" / "masked"
    folders = []
    for name, source in (("a", "room"), ("b", "dog_bench")):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copyfile(masked / f"{source}.png", folder / "thing.png")
        shutil.copyfile(masked / f"{source}_mask.png", folder / "thing_mask.png")
        folders.append(folder)
    found = [i for folder in folders for i in inst.folder_instances(folder)]
    assert len(found) == 2 and found[0].id != found[1].id
    again = inst.folder_instances(folders[0])
    assert again[0].id == found[0].id  # stable: the id is the content, not the order of collection


def test_an_error_exit_leaves_no_output_behind(shared_data, tmp_path):
    out = tmp_path / "syn"
    # fewer than 6 instances per class with the class filter on: nothing can be made
    args = [a for a in synth_args(shared_data, out) if a != "--no-class-filter"]
    assert synth_cli.main(args) == EXIT_USAGE
    assert not out.exists()


def test_a_file_where_a_folder_is_needed_is_called_a_file(shared_data, tmp_path, capsys):
    photo = shared_data / "images" / "masked" / "room.png"
    for flag in ("--backgrounds", "--instances"):
        args = synth_args(shared_data, tmp_path / "syn")
        args[args.index(flag) + 1] = str(photo)
        assert synth_cli.main(args) == EXIT_USAGE
        error = capsys.readouterr().err
        assert "is a file" in error and "does not exist" not in error, error


EXPECTED = {"file": "is a file", "missing parent": "does not exist", "unwritable": "not writable"}


@pytest.mark.parametrize("kind", ["file", "missing parent", "unwritable"])
def test_every_command_checks_its_output_path_first(shared_data, tmp_path, unusable_output, capsys, kind):
    out = unusable_output(kind)
    commands = {
        "erasekit-synth": lambda: synth_cli.main(synth_args(shared_data, out)),
        "erasekit-masks": lambda: masks_cli.main([str(shared_data / "images" / "syn_triplets" / "mask"), str(out)]),
    }
    for name, command in commands.items():
        assert command() == EXIT_USAGE, name
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "Traceback" not in error and str(out) in error, (name, error)
        assert EXPECTED[kind] in error, (name, error)
    assert not (tmp_path / "absent").exists()


# --- the SmartEraser converter names the file and what is wrong with it ------------------------------------------

def test_converter_says_truncated_or_not_a_weights_file(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    state = {"conv.weight": torch.zeros(64, 64)}
    cases = {}
    save_file(state, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    cases["diffusion_pytorch_model.safetensors"] = (data[: len(data) // 2], "truncated")
    torch.save(state, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    cases["diffusion_pytorch_model.bin"] = (data[: len(data) // 2], "truncated")
    cases["diffusion_pytorch_model.fp16.safetensors"] = (b"<html>404 not found</html>" * 4, "not a weights file")
    for name, (content, words) in cases.items():
        folder = tmp_path / name.replace(".", "_")
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / name).write_bytes(content)
        assert smarteraser_convert.main([str(folder), str(tmp_path / "out")]) == EXIT_FAILED
        error = capsys.readouterr().err.replace(str(tmp_path), "<tmp>")  # the test's folder name says "truncated"
        assert name in error and words in error, error
        other = {"truncated": "not a weights file", "not a weights file": "truncated"}[words]
        assert other not in error, error


def test_a_write_failure_mid_run_stops_synthesis_cleanly(shared_data, tmp_path, monkeypatch, capsys):
    from erasekit.dataset_tools import triplets

    calls = []
    original = triplets.TripletWriter.write_encoded

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(self.root / "source" / "x.png"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(triplets.TripletWriter, "write_encoded", full_disk)
    out = tmp_path / "syn"
    assert synth_cli.main(synth_args(shared_data, out, samples=6)) == EXIT_FAILED
    error = capsys.readouterr().err
    assert "Traceback" not in error and "No space left on device" in error and "x.png" in error
    summary = json.loads((out / "summary.json").read_text())
    assert "No space left on device" in summary["stopped"] and summary["written"] == 2
    assert len(TripletDataset(out)) == 2
