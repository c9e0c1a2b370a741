"""``erasekit-run``: the example workflows over a folder of real photos, through ComfyUI's own executor.

Three SmartEraser triplet photos from ../shared/data (with their masks), one corrupt file and one photo whose mask
has another size. OmniEraser runs in this process (its tiny T5 needs the test-only sizing shim); SmartEraser runs
as the command itself in a subprocess that is killed halfway and resumed.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.headless import binding as B
from erasekit.headless.run import RunJob, run_folder
from erasekit.headless.workflow import workflow_to_prompt
from erasekit.jobs import Host, UsageError
from harness import COST_CAPS, PACK_ROOT, cap_inputs

WORKFLOWS = PACK_ROOT / "workflows"
HERE = Path(__file__).resolve().parent
WRONG_SIZE = "mask size differs from the image (mask 64×64, image 128×128)"
GOOD = ("000000006818", "55_000000138891", "I-210614_O04019_W01_F0109")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_data):
    """images/ and masks/ with three real pairs, a corrupt photo and a photo whose mask is half its size."""
    root = tmp_path_factory.mktemp("erasekit_run")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    triplets = shared_data / "images" / "syn_triplets"
    for stem in GOOD:
        # 128 px keeps the tiny models cheap; the photos and masks stay real
        Image.open(triplets / "paste" / f"{stem}.jpg").resize((128, 128)).save(images / f"{stem}.jpg", quality=95)
        Image.open(triplets / "mask" / f"{stem}.jpg").resize((128, 128), Image.NEAREST).save(masks / f"{stem}.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    Image.open(masks / f"{GOOD[0]}.png").save(masks / "corrupt.png")
    Image.open(images / f"{GOOD[1]}.jpg").save(images / "wrong_size.jpg")
    Image.open(masks / f"{GOOD[1]}.png").resize((64, 64)).save(masks / "wrong_size.png")
    return images, masks


def capped_overrides(comfy, workflow_path, extra=()):
    """``--set NODE.INPUT=VALUE`` for every cost input ``COST_CAPS`` lowers in this workflow, plus ``extra``."""
    workflow = json.loads(Path(workflow_path).read_text())
    prompt = workflow_to_prompt(workflow, comfy.object_info)
    capped = json.loads(json.dumps(prompt))
    for entry in capped.values():
        cap_inputs(entry["inputs"], COST_CAPS)
    sets = [f"{node}.{name}={json.dumps(value)}" for node, entry in capped.items()
            for name, value in entry["inputs"].items() if prompt[node]["inputs"][name] != value]
    return sets + list(extra)


def results(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix == ".png")


class CountingHost(Host):
    """Records how many items were finished when each model file was read."""

    def __init__(self):
        self.done = 0
        self.loads = []

    def progress(self, done, total, unit="items"):
        self.done = done


def test_omnieraser_folder_one_result_per_photo_models_loaded_once(comfy, folders, tmp_path, monkeypatch):
    from importlib import import_module

    comfy_utils = import_module("comfy.utils")
    workflow = WORKFLOWS / "omnieraser.json"
    comfy.workflow_prompt(json.loads(workflow.read_text()))  # builds the tiny models it names
    host = CountingHost()
    original = comfy_utils.load_torch_file

    def counting_load(path, *args, **kwargs):
        host.loads.append((host.done, Path(path).name))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(comfy_utils, "load_torch_file", counting_load)
    images, masks = folders
    job = RunJob(workflow=workflow, out=tmp_path / "out", images=images, masks=masks,
                 overrides=capped_overrides(comfy, workflow, ["target_side=128", "steps=2"]))
    report = run_folder(comfy.runtime, job, host)

    assert results(tmp_path / "out") == sorted(f"{stem}.png" for stem in GOOD)
    for stem in GOOD:
        result = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        assert result.shape == (128, 128, 3)
    statuses = {item.id: (item.status, item.reason) for item in report.items}
    assert statuses["corrupt"][0] == "skipped" and "unreadable image" in statuses["corrupt"][1]
    assert statuses["wrong_size"] == ("skipped", WRONG_SIZE)
    assert report.count("done") == 3 and not report.ok
    assert report.binding == B.Binding("5", "6", B.MASK_FILE, ("15",))
    # every model file is read while the first photo runs, none for the others
    loaded = [name for _, name in host.loads]
    assert {"flux1-dev.safetensors", "ae.safetensors", "omnieraser_lora.safetensors"} <= set(loaded)
    assert all(done == 0 for done, _ in host.loads), host.loads
    assert len(loaded) == len(set(loaded))
    # ComfyUI's cache kept the loaders' outputs: for the 2nd and 3rd photo they did not run again
    done = [item for item in report.items if item.status == "done"]
    assert {"1", "2", "3", "4"} <= done[1].cached_nodes and {"1", "2", "3", "4"} <= done[2].cached_nodes
    assert "5" not in done[1].cached_nodes  # the photo loader did run again
    log = [json.loads(line) for line in (tmp_path / "out" / "erasekit-run.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in log) == sorted([*GOOD, "corrupt", "wrong_size"])
    assert not (tmp_path / "out" / ".erasekit-run").exists()


def test_smarteraser_folder_mask_from_image(comfy, folders, tmp_path):
    """SmartEraser's graph loads its mask with LoadImage → ImageToMask: that LoadImage is rebound to the masks."""
    workflow = WORKFLOWS / "smarteraser.json"
    comfy.workflow_prompt(json.loads(workflow.read_text()))
    images, masks = folders
    few = tmp_path / "images"  # one good photo (SmartEraser always works on a 512 crop) and the two bad ones
    few.mkdir()
    for name in (f"{GOOD[0]}.jpg", "corrupt.png", "wrong_size.jpg"):
        (few / name).write_bytes((images / name).read_bytes())
    job = RunJob(workflow=workflow, out=tmp_path / "out", images=few, masks=masks,
                 overrides=capped_overrides(comfy, workflow, ["steps=1"]))
    report = run_folder(comfy.runtime, job)
    assert report.binding == B.Binding("4", "5", B.MASK_VIA_IMAGE, ("11",))
    assert results(tmp_path / "out") == [f"{GOOD[0]}.png"]
    assert Image.open(tmp_path / "out" / f"{GOOD[0]}.png").size == (128, 128)
    assert {i.id: i.reason for i in report.items if i.status == "skipped"} == {
        "corrupt": "unreadable image: corrupt.png", "wrong_size": WRONG_SIZE}


@pytest.mark.timeout(900)  # two ComfyUI start-ups in subprocesses: about a minute on an idle 2-core machine
def test_command_killed_halfway_then_resumed(comfy, folders, tmp_path):
    """``python -m erasekit.headless`` (the erasekit-run command) in its own process, SIGKILLed after its first
    result, then run again with --resume: every photo has exactly one result and nothing is half-written."""
    workflow = WORKFLOWS / "omnieraser.json"
    comfy.workflow_prompt(json.loads(workflow.read_text()))
    images, masks = folders
    out = tmp_path / "out"
    config = comfy.extra_model_paths_file(tmp_path / "models.yaml", custom_nodes=HERE / "custom_nodes")
    command = [sys.executable, "-m", "erasekit.headless", str(workflow), "--images", str(images), "--masks",
               str(masks), "-o", str(out), "--comfyui", str(comfy.comfy_path), "--quiet",
               "--extra-model-paths", str(config), "--custom-nodes"]
    for override in capped_overrides(comfy, workflow, ["target_side=128", "steps=1"]):
        command += ["--set", override]
    # ComfyUI's own flags, after a lone --: of the custom nodes, only the test's T5-sizing shim (see custom_nodes/)
    comfy_flags = ["--", "--disable-all-custom-nodes", "--whitelist-custom-nodes", "erasekit_test_t5_sizing"]

    first = subprocess.Popen(command + comfy_flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (out.is_dir() and results(out)) and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, first.stdout.read()[-3000:]
    assert results(out) == [f"{GOOD[0]}.png"]  # halfway: one result, the next one under way
    assert (out / ".erasekit-run").is_dir()  # the staging area of the killed run, never visible as results

    again = subprocess.run(command + ["--resume"] + comfy_flags, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1, again.stderr[-3000:]  # the two bad inputs fail the run
    assert "2 done, 1 already done, 2 skipped" in again.stderr
    assert results(out) == sorted(f"{stem}.png" for stem in GOOD)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".erasekit-run.lock"]
    for stem in GOOD:
        assert Image.open(out / f"{stem}.png").size == (128, 128)
    log = [json.loads(line) for line in (out / "erasekit-run.jsonl").read_text().splitlines()]
    done = [r["id"] for r in log if r["status"] == "done"]  # the kill may have come before the first record
    assert sorted(set(done)) == sorted(done) and set(GOOD[1:]) <= set(done) <= set(GOOD)  # none done twice
    assert {r["id"]: r["reason"] for r in log if r["status"] == "skipped"} == {
        "corrupt": "unreadable image: corrupt.png", "wrong_size": WRONG_SIZE}


def test_workflow_without_loaders_or_save_is_refused_with_what_is_missing(comfy, folders, tmp_path):
    images, masks = folders
    job = RunJob(workflow=WORKFLOWS / "mask_irregularisation.json", out=tmp_path / "out", images=images, masks=masks)
    with pytest.raises(UsageError, match="no SaveImage node"):
        run_folder(comfy.runtime, job)
    job = RunJob(workflow=WORKFLOWS / "syn4removal.json", out=tmp_path / "out", images=images, masks=masks)
    with pytest.raises(UsageError, match="no LoadImage node whose image feeds the graph"):
        run_folder(comfy.runtime, job)
    assert not (tmp_path / "out").exists() or not results(tmp_path / "out")


def composite_prompt(mask_from_alpha=False):
    """A user's API-format workflow: the photo with its mask painted white (ImageCompositeMasked), saved."""
    mask_link = ["1", 1] if mask_from_alpha else ["2", 0]
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": mask_link}},
        "4": {"class_type": "ImageCompositeMasked",
              "inputs": {"destination": ["1", 0], "source": ["3", 0], "x": 0, "y": 0, "resize_source": False,
                         "mask": mask_link}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "composite"}},
    }
    if mask_from_alpha:
        del prompt["2"]
    return prompt


@pytest.mark.parametrize("mask_from_alpha", [False, True], ids=["LoadImageMask", "painted_alpha"])
def test_api_workflow_gets_each_photo_and_mask(comfy, folders, tmp_path, mask_from_alpha):
    images, masks = folders
    workflow = tmp_path / "composite_api.json"
    workflow.write_text(json.dumps(composite_prompt(mask_from_alpha)))
    report = run_folder(comfy.runtime, RunJob(workflow=workflow, out=tmp_path / "out", images=images, masks=masks))
    assert report.binding.mask_kind == (B.MASK_IN_ALPHA if mask_from_alpha else B.MASK_FILE)
    assert report.count("done") == 3
    for stem in GOOD:
        photo = np.asarray(Image.open(images / f"{stem}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(masks / f"{stem}.png").convert("L")) >= 128
        result = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png").convert("RGB"))
        assert mask.any() and (~mask).any()
        np.testing.assert_array_equal(result[mask], 255)
        np.testing.assert_array_equal(result[~mask], photo[~mask])


def test_prompt_makes_the_masks_with_text_to_mask_core(comfy, folders, tmp_path):
    """--prompt: GroundingDINO + SAM 2 (tiny, random) make each mask through segment/text_masks.py, as the node does."""
    from erasekit.segment.text_masks import load_text_masker

    comfy.ensure_model("grounding-dino", "tiny-grounding-dino")
    comfy.ensure_model("sam2", "tiny-sam2")
    masker = load_text_masker(comfy.models_dir / "grounding-dino" / "tiny-grounding-dino",
                              comfy.models_dir / "sam2" / "tiny-sam2")
    images, _ = folders
    workflow = tmp_path / "composite_api.json"
    workflow.write_text(json.dumps(composite_prompt()))
    job = RunJob(workflow=workflow, out=tmp_path / "out", images=images, prompt="dog. car.", box_threshold=0.0,
                 text_threshold=0.0)
    report = run_folder(comfy.runtime, job, text_masker=masker)
    # the photo whose mask file had the wrong size gets a mask from the text like the others
    assert report.count("done") == 4 and {i.id for i in report.items if i.status == "skipped"} == {"corrupt"}
    for stem in GOOD:
        photo = np.asarray(Image.open(images / f"{stem}.jpg").convert("RGB"))
        expected = masker(photo, "dog. car.", 0.0, 0.0).union()
        kept = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{stem}.png")) > 0
        np.testing.assert_array_equal(kept, expected)
        result = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png").convert("RGB"))
        np.testing.assert_array_equal(result[expected], 255)
        np.testing.assert_array_equal(result[~expected], photo[~expected])


def test_command_usage_errors_exit_2_with_the_reason(comfy, folders, tmp_path, capsys):
    from erasekit.headless.cli import main

    images, masks = folders
    common = ["--images", str(images), "--masks", str(masks), "-o", str(tmp_path / "out"), "--comfyui",
              str(comfy.comfy_path), "--quiet"]
    assert main([str(WORKFLOWS / "mask_irregularisation.json"), *common]) == 2
    assert "no SaveImage node" in capsys.readouterr().err
    workflow = tmp_path / "composite_api.json"
    workflow.write_text(json.dumps(composite_prompt()))
    assert main([str(workflow), *common, "--set", "stepz=3"]) == 2
    assert "no widget input named 'stepz'" in capsys.readouterr().err
    assert main([str(workflow), *common]) == 1  # ran; the corrupt photo and the bad mask were skipped
    assert "3 done, 0 already done, 2 skipped" in capsys.readouterr().err
    assert main([str(workflow), *common]) == 2  # results are there: --resume or another folder
    assert "pass --resume" in capsys.readouterr().err
