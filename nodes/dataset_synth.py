"""Dataset nodes: Syn4Removal paste synthesis into a triplet folder (core: dataset_tools/synth_job.py, the job
the ``erasekit-synth`` command runs too), and a preview of any triplet folder."""
import json

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..dataset_tools import synth
from ..dataset_tools.synth_job import SynthJob, run_synth_job
from ..dataset_tools.triplets import dataset_fingerprint
from ..jobs import fingerprint
from . import _host, _paths, _triplets
from ._segmenter_models import NONE, sam_choices, sam_path

CATEGORY = "erasekit/dataset"
BLEND_TOOLTIP = ("How the pasted instance is blended: matting = closed-form matting alpha with the official trimap "
                 "(SmartEraser, slow); feather = a linear 3 px inner edge (fast); hard = binary alpha.")
INPUT_PATHS = ("backgrounds", "instances", "coco", "coco_images", "background_annotations", "clip_model",
               "sam_images")  # path inputs, absolute or relative to ComfyUI's input folder


def _input_path(value, what):
    """An absolute path, or one relative to ComfyUI's input folder; '' stays None (not given)."""
    if not (value or "").strip():
        return None
    return _paths.user_path(value, folder_paths.get_input_directory(), what)


def _output_path(value):
    return _paths.user_path(value, folder_paths.get_output_directory(), "output", must_exist=False)


def _job(backgrounds, instances, output, num_samples, size, blend, seed, area_filter, class_filter, coco, coco_images,
         background_annotations, clip_model, sam_model, sam_images, resume=True, append=False):
    """The ``SynthJob`` of the node's inputs: folders resolved, empty inputs unset, one value per list setting."""
    given = locals()  # the parameters by name, before any other local is made
    paths = {name: _input_path(given[name], name) for name in INPUT_PATHS}
    if paths["backgrounds"] is None:
        raise ValueError("backgrounds is empty: give a folder of background photos")
    listed = {name: [paths[name]] if paths[name] else [] for name in ("instances", "coco", "coco_images", "sam_images")}
    return SynthJob(backgrounds=paths["backgrounds"], output=_output_path(output), num_samples=num_samples or None,
                    size=size, blend=blend, seed=seed, area_filter=area_filter, class_filter=class_filter,
                    background_annotations=paths["background_annotations"], clip_model=paths["clip_model"],
                    sam_model=sam_path(sam_model), device=str(comfy.model_management.get_torch_device()),
                    resume=resume, append=append, **listed)


class Syn4RemovalDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSyn4RemovalDataset",
            display_name="Build Removal Dataset (Syn4Removal paste)",
            category=CATEGORY,
            description=(
                "SmartEraser's Syn4Removal recipe: cuts instances out of photos with masks, filters them, and "
                "pastes each onto a background (resize + centre crop, placement away from the edges and "
                "existing objects, random rotation, alpha blending); a sample that meets a bad file is drawn again. "
                "Writes source/mask/target PNGs, manifest.jsonl and dataset.json (the settings); running again "
                "resumes when the settings are the same (other settings need append). Outputs a preview of the "
                "written samples. The erasekit-synth command runs the same job."),
            is_output_node=True,
            inputs=[
                io.String.Input("backgrounds", default="", tooltip="Folder of background photos (searched "
                                "recursively); absolute or relative to ComfyUI's input folder."),
                io.String.Input("instances", default="", tooltip="Folder of image + mask pairs (x.jpg + "
                                "x_mask.png, or images/ + masks/ with equal names); sub-folders are classes. "
                                "May be empty when COCO annotations or SAM images are given."),
                io.String.Input("output", default="erasekit_syn4removal", tooltip="Triplet dataset folder "
                                "to create or resume; absolute or relative to ComfyUI's output folder."),
                io.Int.Input("num_samples", default=0, min=0, max=1 << 30, tooltip="Samples to make; 0 = one per "
                             "background."),
                io.Int.Input("size", default=512, min=64, max=4096, step=8, tooltip="Crop size (official 512). "
                             "Backgrounds with a shorter side are skipped and counted."),
                io.Combo.Input("blend", options=list(synth.BLEND_MODES), default="matting", tooltip=BLEND_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Sample i depends only on the "
                             "seed and i, so a resumed run makes the same samples."),
                io.Boolean.Input("area_filter", default=True, tooltip="Keep instances covering 5-95 % of their "
                                 "image (official)."),
                io.Boolean.Input("class_filter", default=True, tooltip="Keep only classes with at least 6 "
                                 "instances after the other filters (official)."),
                io.String.Input("coco", default="", optional=True, tooltip="Optional COCO instance annotation "
                                "file (polygons or RLE) as a further instance source."),
                io.String.Input("coco_images", default="", optional=True, tooltip="Image folder of the COCO file."),
                io.String.Input("background_annotations", default="", optional=True, tooltip="Optional COCO file "
                                "of the backgrounds: objects under 40 % of the image are obstacles to avoid."),
                io.String.Input("clip_model", default="", optional=True, tooltip="Optional local "
                                "transformers CLIP folder (clip-vit-large-patch14). Given: the official CLIP "
                                "score filter runs; empty: it is off (recorded in the manifest)."),
                io.Int.Input("preview_count", default=4, min=1, max=64, optional=True,
                             tooltip="How many written samples to output as a preview batch."),
                io.Combo.Input("sam_model", options=sam_choices(), default=NONE, optional=True,
                               tooltip="Optional SAM or SAM 2 model (models/sams, models/sam2) that proposes "
                                       "instance masks on the photos of sam_images."),
                io.String.Input("sam_images", default="", optional=True, tooltip="Folder of photos for SAM "
                                "proposals (with sam_model); absolute or relative to ComfyUI's input folder."),
                io.Boolean.Input("resume", default=True, optional=True, tooltip=_triplets.RESUME_TOOLTIP),
                io.Boolean.Input("append", default=False, optional=True, tooltip=_triplets.APPEND_TOOLTIP),
            ],
            outputs=[
                io.Image.Output("source", tooltip="Preview: composites with the pasted object."),
                io.Mask.Output("mask", tooltip="Preview: masks of the pasted objects (1 = remove)."),
                io.Image.Output("target", tooltip="Preview: the untouched backgrounds."),
                io.String.Output("summary", tooltip="Run summary as JSON: written, existing, redrawn; samples not made "
                                 "and files left out, by reason with the first names; filters."),
                io.String.Output("dataset_folder", tooltip="The dataset's absolute folder: link it to a trainer's "
                                 "dataset input so training runs after synthesis."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, output, sam_model=NONE, **inputs):
        def compute():
            paths = [_input_path(inputs.get(name, ""), name) for name in INPUT_PATHS]
            return fingerprint(*paths, sam_path(sam_model)), dataset_fingerprint(_output_path(output))
        return _host.fingerprint(compute)

    @classmethod
    def execute(cls, backgrounds, instances, output, num_samples, size, blend, seed, area_filter, class_filter,
                coco="", coco_images="", background_annotations="", clip_model="", preview_count=4,
                sam_model=NONE, sam_images="", resume=True, append=False) -> io.NodeOutput:
        job = _job(backgrounds, instances, output, num_samples, size, blend, seed, area_filter, class_filter, coco,
                   coco_images, background_annotations, clip_model, sam_model, sam_images, resume, append)
        host = _host.ComfyHost()
        summary = run_synth_job(job, host)
        source, mask, target, _ = _triplets.preview(job.output, 0, preview_count, host)
        return io.NodeOutput(source, mask, target, json.dumps({"output": job.output, **summary}), job.output)


class PreviewTripletDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitPreviewTripletDataset",
            display_name="Load Triplet Dataset Samples",
            category=CATEGORY,
            description=("Reads samples of a triplet dataset folder (source/, mask/, target/, manifest*.jsonl: "
                         "from paste synthesis or video mining) or of a folder of WebDataset shards, validating "
                         "them, as IMAGE/MASK batches."),
            inputs=[
                io.String.Input("dataset_folder", default="erasekit_syn4removal", tooltip="Triplet dataset "
                                "folder, or folder of WebDataset shards (*.tar + *.parquet); absolute or relative "
                                "to ComfyUI's output folder."),
                io.Int.Input("start", default=0, min=0, max=1 << 30, tooltip="Index of the first sample (samples "
                             "are ordered by id)."),
                io.Int.Input("count", default=4, min=1, max=256, tooltip="How many samples to load; they must "
                             "share one size."),
            ],
            outputs=[
                io.Image.Output("source", tooltip="Images with the object."),
                io.Mask.Output("mask", tooltip="Object masks (1 = remove)."),
                io.Image.Output("target", tooltip="Images without the object."),
                io.String.Output("records", tooltip="The manifest records of these samples, as JSON."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_folder, **_):
        return _host.fingerprint(lambda: dataset_fingerprint(_paths.dataset_folder(dataset_folder, "dataset_folder")))

    @classmethod
    def execute(cls, dataset_folder, start, count) -> io.NodeOutput:
        folder = _paths.dataset_folder(dataset_folder, "dataset_folder")
        source, mask, target, records = _triplets.preview(folder, start, count, _host.ComfyHost())
        return io.NodeOutput(source, mask, target, json.dumps(records))


NODES = [Syn4RemovalDataset, PreviewTripletDataset]
