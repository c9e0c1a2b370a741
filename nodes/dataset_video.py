"""Video nodes: load frames, preview the removal pairs Video4Removal mines from a static-camera video, and
write them as a triplet dataset (the OmniEraser paper's recipe; core: dataset_tools/video_job.py).

Mining runs in isolated processes (dataset_tools/video_isolation.py), so a video file that crashes the decoder
fails only itself, never ComfyUI. The ``erasekit-video`` command runs the same job from a shell.
"""
import json
import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..dataset_tools.triplets import dataset_fingerprint
from ..dataset_tools.video_decode import read_frames
from ..dataset_tools.video_job import PairPreview, VideoJob, preview_video_pairs, run_video_job
from ..dataset_tools.video_mining import MASK_AUGMENTATIONS, OUTSIDE_CHANGES, PairingConfig
from ..jobs import fingerprint
from . import _host
from ._paths import user_path
from ._segmenter_models import NONE, dino_choices, dino_path, sam_choices, sam_path
from ._triplets import APPEND_TOOLTIP, RESUME_TOOLTIP, preview, to_image, to_mask

CATEGORY = "erasekit/dataset"
PAIRING_INPUTS = ("foreground_ratio", "window_seconds", "lighting_mse", "mask_augment", "outside_changes")


def _pairing_inputs():
    d = PairingConfig()
    return [
        io.Float.Input("foreground_ratio", default=d.foreground_ratio, min=0.001, max=0.99, step=0.005,
                       tooltip="A frame is a foreground frame when moving objects cover more than this share of "
                               "it (paper: 0.15, for close footage; lower it when objects are small in the frame). "
                               "A frame counts as empty up to min(0.002, this / 2)."),
        io.Float.Input("window_seconds", default=d.window_seconds, min=0.1, max=600.0, step=0.1,
                       tooltip="A pair's two frames are at most this far apart in time."),
        io.Float.Input("lighting_mse", default=d.lighting_mse, min=0.1, max=1000.0, step=0.5,
                       tooltip="Largest mean squared difference (0-255 scale) allowed between the two frames where "
                               "neither has a moving object: larger means the light changed and the pair is refused."),
        io.Combo.Input("mask_augment", options=list(MASK_AUGMENTATIONS), default=d.mask_augment,
                       tooltip="Mask augmentation of the paper: dilate, erode, per-object bounding box, or a "
                               "random one of these per sample (seeded by the sample id)."),
        io.Combo.Input("outside_changes", options=list(OUTSIDE_CHANGES), default=d.outside_changes,
                       tooltip=f"When the two frames also differ outside the mask by {d.outside_change_pixels} px or "
                               "more (other moving objects, or an object only partly masked): mask = grow the mask "
                               "over the source frame's moving objects that cause it, refusing the pair when the "
                               "background frame's objects do; reject = refuse the pair. Either way the next-best "
                               "empty frame is tried."),
    ]


def _segmenter_inputs():
    return [
        io.Combo.Input("grounding_dino", options=dino_choices(), default=NONE, optional=True,
                       tooltip="GroundingDINO transformers folder in models/grounding-dino. With a SAM model and "
                               "a prompt, masks are the prompt's objects; none = the MOG foreground mask."),
        io.Combo.Input("sam_model", options=sam_choices(), default=NONE, optional=True,
                       tooltip="SAM or SAM 2 transformers folder in models/sams or models/sam2, or a "
                               "segment-anything checkpoint in models/sams (cuts the detected objects out)."),
        io.String.Input("prompt", default="", optional=True,
                        tooltip='Object classes GroundingDINO looks for, e.g. "car" or "person. bicycle."'),
    ]


def _pairing(settings):
    return PairingConfig(**{name: settings[name] for name in PAIRING_INPUTS})


def _segmenter(grounding_dino, sam_model, prompt):
    """The segmenter settings of a job: model paths (None for none), the prompt and ComfyUI's device."""
    return {"grounding_dino": dino_path(grounding_dino), "sam_model": sam_path(sam_model), "prompt": prompt,
            "device": str(comfy.model_management.get_torch_device())}


def _video_path(video):
    return user_path(video, folder_paths.get_input_directory(), "video")


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
    def fingerprint_inputs(cls, video, **_):
        return _host.fingerprint(lambda: fingerprint(_video_path(video)))

    @classmethod
    def execute(cls, video, start_frame, frame_count, every_nth) -> io.NodeOutput:
        frames, fps, total = read_frames(_video_path(video), start_frame, frame_count, every_nth, _host.ComfyHost())
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
                *_pairing_inputs(),
                *_segmenter_inputs(),
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
    def fingerprint_inputs(cls, video, grounding_dino=NONE, sam_model=NONE, **_):
        return _host.fingerprint(lambda: fingerprint(_video_path(video), dino_path(grounding_dino),
                                                     sam_path(sam_model)))

    @classmethod
    def execute(cls, video, start_frame, end_frame, max_pairs, grounding_dino=NONE, sam_model=NONE, prompt="",
                **pairing) -> io.NodeOutput:
        job = PairPreview(video=_video_path(video), start_frame=start_frame, end_frame=end_frame or None,
                          max_pairs=max_pairs, pairing=_pairing(pairing),
                          **_segmenter(grounding_dino, sam_model, prompt))
        chosen, report = preview_video_pairs(job, _host.ComfyHost())
        if not chosen:
            raise ValueError(f"{os.path.basename(job.video)} gave no pairs: {report['reason'] or report['status']}")
        report["chosen"] = [{**c.record["origin"], "mask_source": c.record["mask_source"],
                             "mask_augment": c.record["mask_augment"], **c.record["stats"]} for c in chosen]
        return io.NodeOutput(to_image([c.source for c in chosen]), to_mask([c.mask for c in chosen]),
                             to_image([c.target for c in chosen]), json.dumps(report))


class Video4RemovalDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitVideo4RemovalDataset",
            display_name="Build Removal Dataset from Videos (Video4Removal)",
            category=CATEGORY,
            description=(
                "Mines every video of a folder (or one file) with Video4Removal and writes the pairs as a triplet "
                "dataset (source/, mask/, target/, manifest.jsonl, dataset.json, video-summary.json; atomic). "
                "Running again resumes when the settings are the same: finished videos and written samples are "
                "kept (other settings need append). Videos are told apart by content (copies are mined once); a "
                "file OpenCV cannot decode is tried with PyAV. Videos that cannot be opened, are truncated, have a "
                "moving camera or a never-empty scene are reported with the reason in the summary. Outputs a "
                "preview of the written samples. The erasekit-video command runs the same job."),
            is_output_node=True,
            inputs=[
                io.String.Input("videos", default="", tooltip="Video file or folder of videos (searched "
                                "recursively); absolute or relative to ComfyUI's input folder."),
                io.String.Input("output", default="erasekit_video4removal", tooltip="Triplet dataset folder "
                                "to create or resume; absolute or relative to ComfyUI's output folder."),
                io.Int.Input("max_frames", default=0, min=0, max=1 << 30, tooltip="Mine only the first N frames "
                             "of each video; 0 = whole videos."),
                *_pairing_inputs(),
                io.Int.Input("preview_count", default=4, min=1, max=64, tooltip="How many written samples to output "
                             "as a preview batch."),
                io.Int.Input("workers", default=1, min=1, max=64, tooltip="Videos mined at once, each in its own "
                             "process (a file that crashes the decoder loses only itself)."),
                io.Boolean.Input("resume", default=True, optional=True, tooltip=RESUME_TOOLTIP),
                io.Boolean.Input("append", default=False, optional=True, tooltip=APPEND_TOOLTIP),
                *_segmenter_inputs(),
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

    @staticmethod
    def _videos_path(videos):
        return user_path(videos, folder_paths.get_input_directory(), "videos")

    @staticmethod
    def _output_path(output):
        return user_path(output, folder_paths.get_output_directory(), "output", must_exist=False)

    @classmethod
    def _job(cls, videos, output, max_frames, workers, resume, append, grounding_dino, sam_model, prompt, pairing):
        return VideoJob(videos=[cls._videos_path(videos)], output=cls._output_path(output),
                        pairing=_pairing(pairing), max_frames=max_frames or None, workers=workers, resume=resume,
                        append=append, **_segmenter(grounding_dino, sam_model, prompt))

    @classmethod
    def fingerprint_inputs(cls, videos, output, grounding_dino=NONE, sam_model=NONE, **_):
        def compute():
            out = cls._output_path(output)
            return (fingerprint(cls._videos_path(videos), dino_path(grounding_dino), sam_path(sam_model)),
                    dataset_fingerprint(out))
        return _host.fingerprint(compute)

    @classmethod
    def execute(cls, videos, output, max_frames, preview_count, workers=1, resume=True, append=False,
                grounding_dino=NONE, sam_model=NONE, prompt="", **pairing) -> io.NodeOutput:
        job = cls._job(videos, output, max_frames, workers, resume, append, grounding_dino, sam_model, prompt, pairing)
        host = _host.ComfyHost()
        summary = run_video_job(job, host)
        if not summary["samples"]:
            reasons = "; ".join(f"{os.path.basename(v['video'])}: {v['reason'] or v['status']}"
                                for v in summary["videos"])
            raise ValueError(f"no samples in {job.output}: {reasons}")
        source, mask, target, _ = preview(job.output, 0, preview_count, host, skip_other_sizes=True)
        return io.NodeOutput(source, mask, target, json.dumps({"output": job.output, **summary}), job.output)


NODES = [LoadVideoFrames, MineVideoPairs, Video4RemovalDataset]
