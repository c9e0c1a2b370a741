"""Video nodes: load frames, preview the removal pairs Video4Removal mines from a static-camera video, and
write them as a triplet dataset (OmniEraser's recipe, ../shared/METHODS.md §3; core: dataset_tools/video.py).

Mining runs in spawned child processes (dataset_tools/video.py ``VideoJobRunner``), so a video file that
crashes the decoder fails only itself, never ComfyUI. The ``erasekit-video`` command does the same from a shell.
"""
import json
import os

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..dataset_tools import video as V
from ..dataset_tools.triplets import TripletDataset, TripletWriter
from ._paths import register_folder, user_path
from ._triplets import preview, to_image

CATEGORY = "erasekit/dataset"
NONE = "none"
DINO_FOLDER = register_folder("grounding-dino")
SAM_FOLDERS = (register_folder("sams"), register_folder("sam2"))
DINO_URL = "https://huggingface.co/IDEA-Research/grounding-dino-tiny"
SAM_URL = ("https://huggingface.co/facebook/sam2.1-hiera-large (transformers folder, or its sam2.1_hiera_large.pt "
           "checkpoint in models/sam2) or https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth "
           "(segment-anything checkpoint in models/sams)")


def _model_folders(*names):
    """Sub-folders holding a transformers model (config.json) in ComfyUI's model folders ``names``."""
    found = set()
    for name in names:
        for base in folder_paths.get_folder_paths(name):
            if os.path.isdir(base):
                found.update(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "config.json")))
    return sorted(found)


def _sam_choices():
    """Transformers SAM / SAM 2 folders, segment-anything checkpoints in models/sams and SAM 2 ones in models/sam2."""
    files = {f for name in SAM_FOLDERS for f in folder_paths.get_filename_list(name)}
    return sorted(set(_model_folders(*SAM_FOLDERS)) | files)


def _resolve_model(names, choice, url):
    for name in names:
        for base in folder_paths.get_folder_paths(name):
            path = os.path.join(base, choice)
            if os.path.isfile(os.path.join(path, "config.json")) or (name in SAM_FOLDERS and os.path.isfile(path)):
                return path
    where = ", ".join(p for n in names for p in folder_paths.get_folder_paths(n))
    raise FileNotFoundError(f"model {choice!r} was not found in {where}. Public weights: {url}.")


def _setting_inputs():
    d = V.PairingConfig()
    return [
        io.Float.Input("foreground_ratio", default=d.foreground_ratio, min=0.001, max=0.99, step=0.005,
                       tooltip="A frame is a foreground frame when moving objects cover more than this share of "
                               "it (paper: 0.15, for close footage; lower it when objects are small in the frame)."),
        io.Float.Input("window_seconds", default=d.window_seconds, min=0.1, max=600.0, step=0.1,
                       tooltip="A pair's two frames are at most this far apart in time."),
        io.Float.Input("lighting_mse", default=d.lighting_mse, min=0.1, max=1000.0, step=0.5,
                       tooltip="Largest mean squared difference (0-255 scale) allowed between the two frames "
                               "outside the object: larger means the light changed and the pair is refused."),
        io.Combo.Input("mask_augment", options=list(V.MASK_AUGMENTATIONS), default=d.mask_augment,
                       tooltip="Mask augmentation of the paper: dilate, erode, per-object bounding box, or a "
                               "random one of these per sample (seeded by the sample id)."),
        io.Combo.Input("grounding_dino", options=[NONE] + _model_folders(DINO_FOLDER), default=NONE, optional=True,
                       tooltip="GroundingDINO transformers folder in models/grounding-dino. With a SAM model and "
                               "a prompt, masks are the prompt's objects; none = the MOG foreground mask."),
        io.Combo.Input("sam_model", options=[NONE] + _sam_choices(), default=NONE, optional=True,
                       tooltip="SAM or SAM 2 transformers folder in models/sams or models/sam2, or a "
                               "segment-anything checkpoint in models/sams (cuts the detected objects out)."),
        io.String.Input("prompt", default="", optional=True,
                        tooltip='Object classes GroundingDINO looks for, e.g. "car" or "person. bicycle."'),
    ]


def _config(foreground_ratio, window_seconds, lighting_mse, mask_augment):
    defaults = V.PairingConfig()
    return V.PairingConfig(foreground_ratio=foreground_ratio, window_seconds=window_seconds, lighting_mse=lighting_mse,
                           mask_augment=mask_augment, background_ratio=min(defaults.background_ratio, foreground_ratio / 2))


def _segmenter_spec(grounding_dino, sam_model, prompt):
    """Paths and prompt for GroundingDINO + SAM (loaded in the mining process), or None for MOG masks."""
    chosen = [grounding_dino != NONE, sam_model != NONE, bool((prompt or "").strip())]
    if not any(chosen):
        return None
    if not all(chosen):
        raise ValueError("object masks need all three: a grounding_dino model, a sam_model and a prompt "
                         f"(got grounding_dino={grounding_dino!r}, sam_model={sam_model!r}, prompt={prompt!r})")
    return {"grounding_dino": _resolve_model([DINO_FOLDER], grounding_dino, DINO_URL),
            "sam": _resolve_model(SAM_FOLDERS, sam_model, SAM_URL), "text": prompt,
            "device": str(comfy.model_management.get_torch_device())}


def _mine(jobs, config, spec, workers, on_pair):
    """Mine ``jobs`` [(path, start, stop)] in child processes (a decoder crash fails only its video) with
    a progress bar over the videos and interruption; ``on_pair(job, sample_id, source, mask, target,
    record)`` gets each pair. Returns the reports, in job order."""
    bar = comfy.utils.ProgressBar(len(jobs) * 100)
    progress = [0] * len(jobs)
    reports = [None] * len(jobs)
    with V.VideoJobRunner(config, workers=min(workers, len(jobs)), segmenter_spec=spec) as runner:
        for event in runner.run(jobs):
            comfy.model_management.throw_exception_if_processing_interrupted()
            kind, job = event[0], event[1]
            if kind == "pair":
                on_pair(job, *event[2:])
            elif kind == "progress":
                progress[job] = int(100 * event[2] / max(1, event[3]))
            else:
                reports[job] = event[2]
                progress[job] = 100
            bar.update_absolute(sum(progress), len(jobs) * 100)
    return reports


class LoadVideoFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitLoadVideoFrames",
            display_name="Load Video Frames",
            category=CATEGORY,
            description="Decodes a range of a video file's frames (OpenCV) into an IMAGE batch.",
            inputs=[
                io.String.Input("video", default="road_cars.avi", tooltip="Video file; absolute or relative to "
                                "ComfyUI's input folder."),
                io.Int.Input("start_frame", default=0, min=0, max=1 << 30, tooltip="Index of the first frame."),
                io.Int.Input("frame_count", default=16, min=1, max=4096, tooltip="How many frames to output at most "
                             "(each is kept in memory)."),
                io.Int.Input("every_nth", default=1, min=1, max=10000, tooltip="Take every n-th frame (1 = all)."),
            ],
            outputs=[
                io.Image.Output("frames", tooltip="The frames, RGB."),
                io.Float.Output("fps", tooltip="Frames per second the file declares."),
                io.Int.Output("total_frames", tooltip="Frame count the file declares (may be approximate)."),
            ],
        )

    @classmethod
    def execute(cls, video, start_frame, frame_count, every_nth) -> io.NodeOutput:
        path = user_path(video, folder_paths.get_input_directory(), "video")
        try:
            capture, fps, total, _, _ = V.open_video(path)
        except V.VideoSkipped as error:
            raise ValueError(str(error)) from None
        capture.release()
        bar = comfy.utils.ProgressBar(frame_count)
        frames = []
        for _, frame in V.iter_frames(path, start_frame, None, every_nth):
            comfy.model_management.throw_exception_if_processing_interrupted()
            frames.append(frame[..., ::-1])
            bar.update_absolute(len(frames), frame_count)
            if len(frames) >= frame_count:
                break
        if not frames:
            raise ValueError(f"{path} has no decodable frame at or after frame {start_frame} (it declares {total})")
        return io.NodeOutput(to_image(frames), fps, total)


class MineVideoPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitMineVideoPairs",
            display_name="Mine Removal Pairs from Video (Video4Removal)",
            category=CATEGORY,
            description=(
                "OmniEraser's Video4Removal on one static-camera video: MOG2 background model, foreground "
                "frames paired with the empty frame nearest in time and closest in lighting, blurred frames and "
                "busy or lighting-changed pairs refused, a moving camera skipped. Outputs the chosen pairs; "
                "writes nothing."),
            inputs=[
                io.String.Input("video", default="road_cars.avi", tooltip="Video file; absolute or relative to "
                                "ComfyUI's input folder."),
                io.Int.Input("start_frame", default=0, min=0, max=1 << 30, tooltip="First frame to mine."),
                io.Int.Input("end_frame", default=0, min=0, max=1 << 30, tooltip="Frame to stop before; 0 = the end."),
                io.Int.Input("max_pairs", default=8, min=1, max=256, tooltip="Most pairs to output (the first found)."),
                *_setting_inputs(),
            ],
            outputs=[
                io.Image.Output("source", tooltip="Frames with the object."),
                io.Mask.Output("mask", tooltip="Object masks (1 = remove)."),
                io.Image.Output("target", tooltip="The paired empty frames."),
                io.String.Output("summary", tooltip="The video's report as JSON: counts of frame classes and of "
                                 "refused pairs by reason, and per pair its frames and checks."),
            ],
        )

    @classmethod
    def execute(cls, video, start_frame, end_frame, max_pairs, foreground_ratio, window_seconds, lighting_mse,
                mask_augment, grounding_dino=NONE, sam_model=NONE, prompt="") -> io.NodeOutput:
        path = user_path(video, folder_paths.get_input_directory(), "video")
        if end_frame and end_frame <= start_frame:
            raise ValueError(f"end_frame {end_frame} must be 0 (the end) or after start_frame {start_frame}")
        config = _config(foreground_ratio, window_seconds, lighting_mse, mask_augment)
        chosen = []

        def keep(job, sample_id, source, mask, target, record):
            if len(chosen) < max_pairs:
                chosen.append((source, mask, target, record))

        report = _mine([(path, start_frame, end_frame or None)], config,
                       _segmenter_spec(grounding_dino, sam_model, prompt), 1, keep)[0]
        if not chosen:
            raise ValueError(f"{os.path.basename(path)} gave no pairs: {report['reason'] or report['status']}")
        report["chosen"] = [{**r["origin"], "mask_source": r["mask_source"], "mask_augment": r["mask_augment"],
                             **r["stats"]} for _, _, _, r in chosen]
        return io.NodeOutput(to_image([c[0] for c in chosen]),
                             torch.from_numpy(np.stack([c[1] for c in chosen])).float(),
                             to_image([c[2] for c in chosen]), json.dumps(report))


class Video4RemovalDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitVideo4RemovalDataset",
            display_name="Build Removal Dataset from Videos (Video4Removal)",
            category=CATEGORY,
            description=(
                "Mines every video of a folder (or one file) with Video4Removal and writes the pairs as a triplet "
                "dataset (source/, mask/, target/, manifest.jsonl; atomic, resumable). Videos that cannot be "
                "opened, are truncated, have a moving camera or a never-empty scene are reported with the "
                "reason in the summary. Outputs a preview of the written samples."),
            is_output_node=True,
            inputs=[
                io.String.Input("videos", default="", tooltip="Video file or folder of videos (searched "
                                "recursively); absolute or relative to ComfyUI's input folder."),
                io.String.Input("output_folder", default="erasekit_video4removal", tooltip="Triplet dataset folder "
                                "to create or resume; absolute or relative to ComfyUI's output folder."),
                io.Int.Input("max_frames", default=0, min=0, max=1 << 30, tooltip="Mine only the first N frames "
                             "of each video; 0 = whole videos."),
                *_setting_inputs()[:4],
                io.Int.Input("preview_count", default=4, min=1, max=64, tooltip="How many written samples to output "
                             "as a preview batch."),
                io.Int.Input("workers", default=1, min=1, max=64, tooltip="Videos mined at once, each in its own "
                             "process (a file that crashes the decoder loses only itself)."),
                *_setting_inputs()[4:],
            ],
            outputs=[
                io.Image.Output("source", tooltip="Preview: frames with the object."),
                io.Mask.Output("mask", tooltip="Preview: object masks (1 = remove)."),
                io.Image.Output("target", tooltip="Preview: the paired empty frames."),
                io.String.Output("summary", tooltip="Run summary as JSON: per video its status, reason, pairs "
                                 "and samples written."),
                io.String.Output("dataset_folder", tooltip="The dataset's absolute folder: link it to a trainer's "
                                 "dataset input so training runs after mining."),
            ],
        )

    @classmethod
    def execute(cls, videos, output_folder, max_frames, foreground_ratio, window_seconds, lighting_mse,
                mask_augment, preview_count, workers=1, grounding_dino=NONE, sam_model=NONE,
                prompt="") -> io.NodeOutput:
        found = V.find_videos([user_path(videos, folder_paths.get_input_directory(), "videos")])
        if not found:
            raise ValueError(f"no video files ({', '.join(V.VIDEO_EXTENSIONS)}) in {videos!r}")
        output = user_path(output_folder, folder_paths.get_output_directory(), "output_folder", must_exist=False)
        config = _config(foreground_ratio, window_seconds, lighting_mse, mask_augment)
        spec = _segmenter_spec(grounding_dino, sam_model, prompt)
        written = [0] * len(found)
        with TripletWriter(output, resume=True) as writer:
            def store(job, sample_id, source, mask, target, record):
                if not writer.has(sample_id):
                    writer.write(sample_id, source, mask, target, record)
                    written[job] += 1

            reports = _mine([(p, 0, max_frames or None) for p in found], config, spec, workers, store)
        for report, count in zip(reports, written):
            report["written"] = count
        summary = {"output": output, "videos": reports, "written": sum(r["written"] for r in reports)}
        if not any(output_has_manifest(output)) or len(TripletDataset(output)) == 0:
            reasons = "; ".join(f"{os.path.basename(r['video'])}: {r['reason'] or r['status']}" for r in reports)
            raise ValueError(f"no samples in {output}: {reasons}")
        source, mask, target, _ = preview(output, 0, preview_count, skip_other_sizes=True)
        return io.NodeOutput(source, mask, target, json.dumps(summary), output)


def output_has_manifest(folder):
    return (name.startswith("manifest") and name.endswith(".jsonl") for name in os.listdir(folder))


NODES = [LoadVideoFrames, MineVideoPairs, Video4RemovalDataset]
