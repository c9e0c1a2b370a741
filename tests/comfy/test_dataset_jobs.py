"""The dataset jobs through ComfyUI's executor: a node and its command write the same dataset byte for byte, and
nodes that read files run again when those files change (their cache fingerprints)."""
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from erasekit.dataset_tools import synth_cli, video_cli
from erasekit.dataset_tools.triplets import TripletWriter

PAIRING = {"foreground_ratio": 0.04, "window_seconds": 6.0, "lighting_mse": 20.0, "mask_augment": "random",
           "outside_changes": "mask"}


def dataset_files(folder):
    """{relative path: bytes} of every file a dataset folder holds (lock files are empty markers)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert files, f"{folder} is empty"
    return files


def assert_same_files(cli_folder, node_folder):
    cli, node = dataset_files(cli_folder), dataset_files(node_folder)
    assert sorted(cli) == sorted(node)
    different = [name for name in cli if cli[name] != node[name]]
    assert not different, f"files that differ between the command's and the node's dataset: {different}"


class OneExecutor:
    """Prompts run through one PromptExecutor, so ComfyUI's output cache carries over between them (as in the
    server); ``run`` returns the ids of the nodes served from that cache."""

    def __init__(self, comfy):
        self.runtime = comfy.runtime
        self.executor = comfy.runtime.new_executor()

    def run(self, prompt):
        import copy

        # the executor writes its fingerprints into the prompt: a fresh copy each time, as the server sends
        self.runtime.run(copy.deepcopy(prompt), executor=self.executor)
        cached = [d["nodes"] for e, d in self.executor.status_messages if e == "execution_cached"]
        return set(cached[0]) if cached else set()

    def outputs(self, node_id):
        entry = self.executor.caches.outputs.get(str(node_id))
        values = entry.outputs if hasattr(entry, "outputs") else entry
        return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]


@pytest.fixture
def videos(comfy, shared_video):
    folder = comfy.input_dir / "job_videos"
    folder.mkdir(exist_ok=True)
    for name in ("road_cars.avi", "highway_busy.avi"):
        source = shared_video(name)
        if not (folder / name).exists():
            shutil.copyfile(source, folder / name)
    return folder


def test_synthesis_node_and_command_write_the_same_dataset(comfy, shared_data, tmp_path):
    images = shared_data / "images"
    from_cli, from_node = tmp_path / "cli", tmp_path / "node"
    assert synth_cli.main(["--backgrounds", str(images / "removal_pairs"), "--instances", str(images / "masked"),
                           "--output", str(from_cli), "--num-samples", "4", "--size", "256", "--blend", "feather",
                           "--seed", "3", "--no-class-filter", "--no-progress"]) == 0
    prompt = {
        "1": {"class_type": "EraseKitSyn4RemovalDataset",
              "inputs": {"backgrounds": str(images / "removal_pairs"), "instances": str(images / "masked"),
                         "output": str(from_node), "num_samples": 4, "size": 256, "blend": "feather", "seed": 3,
                         "area_filter": True, "class_filter": False, "preview_count": 1}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    comfy.run_prompt(prompt)
    assert len(list((from_node / "source").iterdir())) == 4
    assert_same_files(from_cli, from_node)


def test_video_node_and_command_write_the_same_dataset(comfy, videos, tmp_path):
    from_cli, from_node = tmp_path / "cli", tmp_path / "node"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in PAIRING.items()]
    assert video_cli.main([str(videos), "-o", str(from_cli), "--max-frames", "200", *flags]) == 0
    prompt = {
        "1": {"class_type": "EraseKitVideo4RemovalDataset",
              "inputs": {"videos": str(videos), "output": str(from_node), "max_frames": 200, "preview_count": 1,
                         "workers": 1, **PAIRING}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    comfy.run_prompt(prompt)
    assert len(list((from_node / "source").iterdir())) >= 3
    assert_same_files(from_cli, from_node)


def test_triplet_preview_node_gives_the_files_pixels(comfy, shared_data):
    folder = comfy.output_dir / "preview_pixels"
    rng = np.random.default_rng(0)
    with TripletWriter(folder) as writer:
        for index in range(3):
            target = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            mask = rng.random((24, 32)) > 0.7
            writer.write(f"s{index}", np.where(mask[..., None], 255 - target, target), mask, target,
                         {"origin": {"kind": "image", "image": "x.png", "instance": index}})
    prompt = {
        "1": {"class_type": "EraseKitPreviewTripletDataset",
              "inputs": {"dataset_folder": "preview_pixels", "start": 1, "count": 2}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    source, mask, target, _ = comfy.run_prompt(prompt).outputs("1")
    for item, sample in enumerate(("s1", "s2")):
        read = {sub: cv2.imread(str(folder / sub / f"{sample}.png"), cv2.IMREAD_UNCHANGED) for sub in ("source", "mask", "target")}
        assert np.array_equal((source[item].numpy() * 255).round().astype(np.uint8), read["source"][..., ::-1])
        assert np.array_equal((target[item].numpy() * 255).round().astype(np.uint8), read["target"][..., ::-1])
        assert np.array_equal(mask[item].numpy() == 1, read["mask"] == 255)


def test_file_nodes_run_again_when_their_folder_or_file_changes(comfy, videos, shared_data):
    run = OneExecutor(comfy)
    folder = comfy.output_dir / "cache_test"
    rng = np.random.default_rng(1)

    def add_sample(name):
        target = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        with TripletWriter(folder) as writer:
            writer.write(name, 255 - target, np.ones((16, 16), bool), target,
                         {"origin": {"kind": "image", "image": "x.png", "instance": 0}})

    add_sample("a")
    preview = {
        "1": {"class_type": "EraseKitPreviewTripletDataset", "inputs": {"dataset_folder": "cache_test", "start": 0,
                                                                        "count": 8}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    assert "1" not in run.run(preview) and run.outputs("1")[0].shape[0] == 1
    assert "1" in run.run(preview)  # nothing changed: ComfyUI serves the cached output
    add_sample("b")
    assert "1" not in run.run(preview), "the dataset changed but the node was not run again"
    assert run.outputs("1")[0].shape[0] == 2

    video = comfy.input_dir / "cache_test.avi"
    shutil.copyfile(videos / "road_cars.avi", video)
    frames = {
        "1": {"class_type": "EraseKitLoadVideoFrames",
              "inputs": {"video": "cache_test.avi", "start_frame": 0, "frame_count": 2, "every_nth": 1}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    assert "1" not in run.run(frames) and run.outputs("1")[0].shape[1:3] == (360, 640)
    assert "1" in run.run(frames)
    shutil.copyfile(videos / "highway_busy.avi", video)  # another video under the same name
    os.utime(video, ns=(1, 1))
    assert "1" not in run.run(frames)

    images = shared_data / "images"
    backgrounds = comfy.input_dir / "cache_backgrounds"
    backgrounds.mkdir(exist_ok=True)
    first = sorted((images / "removal_pairs").iterdir())[0]
    shutil.copyfile(first, backgrounds / first.name)
    synth = {
        "1": {"class_type": "EraseKitSyn4RemovalDataset",
              "inputs": {"backgrounds": "cache_backgrounds", "instances": str(images / "masked"),
                         "output": "cache_synth", "num_samples": 0, "size": 128, "blend": "hard", "seed": 0,
                         "area_filter": True, "class_filter": False, "preview_count": 1}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    assert "1" not in run.run(synth)  # writes one sample (one per background)...
    assert "1" not in run.run(synth)  # ...so the output folder changed: run again, resuming (nothing to do)
    assert "1" in run.run(synth)  # now nothing changed
    second = sorted((images / "removal_pairs").iterdir())[1]
    shutil.copyfile(second, backgrounds / second.name)  # a new background: one more sample to make
    assert "1" not in run.run(synth)
    assert len(list((comfy.output_dir / "cache_synth" / "source").iterdir())) == 2


@pytest.mark.parametrize("node, settings, node_only", [
    ("EraseKitSyn4RemovalDataset", ("SynthJob",), {"preview_count"}),
    ("EraseKitVideo4RemovalDataset", ("VideoJob", "PairingConfig"), {"preview_count"}),
    ("EraseKitMineVideoPairs", ("PairPreview", "PairingConfig"), set()),
    ("EraseKitPreviewTripletDataset", ("TripletPreview",), set()),
])
def test_node_inputs_are_job_settings_of_the_same_name(comfy, node, settings, node_only):
    """A node sets its job's settings under their own names, so it cannot drift from the command that sets the
    same dataclass (node_only: presentation inputs)."""
    from dataclasses import fields

    from erasekit.dataset_tools import synth_job, triplets, video_job, video_mining

    modules = (synth_job, triplets, video_job, video_mining)
    names = {f.name for name in settings for f in fields(next(getattr(m, name) for m in modules if hasattr(m, name)))}
    info = comfy.object_info[node]["input"]
    inputs = set(info.get("required", {})) | set(info.get("optional", {}))
    assert inputs - node_only <= names, inputs - node_only - names
