"""Dataset nodes: Syn4Removal paste synthesis into a triplet folder, and a preview of any triplet folder."""
import json

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..dataset_tools import instances as inst
from ..dataset_tools import synth
from . import _paths, _triplets

CATEGORY = "erasekit/dataset"
BLEND_TOOLTIP = ("How the pasted instance is blended: matting = closed-form matting alpha with the official trimap "
                 "(SmartEraser, slow); feather = a linear 3 px inner edge (fast); hard = binary alpha.")


def _folder(path, base, what, must_exist=True):
    """An absolute path, or one relative to ComfyUI's input/output folder; '' stays '' when optional."""
    if not must_exist and not (path or "").strip():
        return ""
    return _paths.user_path(path, base, what, must_exist)


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
                "existing objects, random rotation, alpha blending). Writes source/mask/target PNGs and "
                "manifest.jsonl; running again resumes. Outputs a preview of the written samples."),
            is_output_node=True,
            inputs=[
                io.String.Input("backgrounds_folder", default="", tooltip="Folder of background photos (searched "
                                "recursively); absolute or relative to ComfyUI's input folder."),
                io.String.Input("instances_folder", default="", tooltip="Folder of image + mask pairs (x.jpg + "
                                "x_mask.png, or images/ + masks/ with equal names); sub-folders are classes. "
                                "May be empty when COCO annotations are given."),
                io.String.Input("output_folder", default="erasekit_syn4removal", tooltip="Triplet dataset folder "
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
                io.String.Input("coco_annotations", default="", optional=True, tooltip="Optional COCO instance "
                                "file (polygons or RLE) as a further instance source."),
                io.String.Input("coco_images", default="", optional=True, tooltip="Image folder of the COCO file."),
                io.String.Input("background_annotations", default="", optional=True, tooltip="Optional COCO file "
                                "of the backgrounds: objects under 40 % of the image are obstacles to avoid."),
                io.String.Input("clip_model_folder", default="", optional=True, tooltip="Optional local "
                                "transformers CLIP folder (clip-vit-large-patch14). Given: the official CLIP "
                                "score filter runs; empty: it is off (recorded in the manifest)."),
                io.Int.Input("preview_count", default=4, min=1, max=64, optional=True,
                             tooltip="How many written samples to output as a preview batch."),
            ],
            outputs=[
                io.Image.Output("source", tooltip="Preview: composites with the pasted object."),
                io.Mask.Output("mask", tooltip="Preview: masks of the pasted objects (1 = remove)."),
                io.Image.Output("target", tooltip="Preview: the untouched backgrounds."),
                io.String.Output("summary", tooltip="Run summary as JSON: written, existing, skipped reasons, filters."),
                io.String.Output("dataset_folder", tooltip="The dataset's absolute folder: link it to a trainer's "
                                 "dataset input so training runs after synthesis."),
            ],
        )

    @classmethod
    def execute(cls, backgrounds_folder, instances_folder, output_folder, num_samples, size, blend, seed,
                area_filter, class_filter, coco_annotations="", coco_images="", background_annotations="",
                clip_model_folder="", preview_count=4) -> io.NodeOutput:
        inputs = folder_paths.get_input_directory()
        backgrounds = _folder(backgrounds_folder, inputs, "backgrounds_folder")
        output = _folder(output_folder, folder_paths.get_output_directory(), "output_folder", must_exist=False)
        skips, found = {}, []
        if instances_folder.strip():
            found += inst.folder_instances(_folder(instances_folder, inputs, "instances_folder"), skips=skips)
        if coco_annotations.strip():
            found += inst.coco_instances(_folder(coco_annotations, inputs, "coco_annotations"),
                                         _folder(coco_images, inputs, "coco_images"), skips)
        if not found:
            raise ValueError("no instances found: give instances_folder (image + mask pairs) or coco_annotations")
        check_interrupt = comfy.model_management.throw_exception_if_processing_interrupted
        use_clip = bool(clip_model_folder.strip())
        if use_clip:
            from ..dataset_tools.clip_score import ClipScorer

            scorer = ClipScorer.from_folder(_folder(clip_model_folder, inputs, "clip_model_folder"),
                                            comfy.model_management.get_torch_device())
            bar = comfy.utils.ProgressBar(len(found))
            found = inst.score_instances(found, scorer, skips=skips, progress=lambda d, t: bar.update_absolute(d, t),
                                         check_interrupt=check_interrupt)
        annotations = _folder(background_annotations, inputs, "background_annotations") if background_annotations.strip() else None
        paths, obstacles, background_skips = synth.collect_backgrounds(backgrounds, annotations)
        config = synth.SynthConfig(size=size, blend=blend)
        plan = synth.build_plan(paths, obstacles, found, config, seed, num_samples or None,
                                {"use_clip": use_clip, "use_area": area_filter, "use_class_count": class_filter})
        bar = comfy.utils.ProgressBar(plan.num_samples)
        summary = synth.run_synthesis(plan, output, progress=lambda d, t: bar.update_absolute(d, t),
                                      check_interrupt=check_interrupt)
        for reason, count in {**skips, **background_skips}.items():
            summary["skipped"][reason] = summary["skipped"].get(reason, 0) + count
        summary.update(output=output, instances=len(plan.instances), filters=plan.filters)
        source, mask, target, _ = _triplets.preview(output, 0, preview_count)
        return io.NodeOutput(source, mask, target, json.dumps(summary), output)


class PreviewTripletDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitPreviewTripletDataset",
            display_name="Load Triplet Dataset Samples",
            category=CATEGORY,
            description=("Reads samples of a triplet dataset folder (source/, mask/, target/, manifest*.jsonl: "
                         "from paste synthesis or video mining), validating them, as IMAGE/MASK batches."),
            inputs=[
                io.String.Input("dataset_folder", default="erasekit_syn4removal", tooltip="Triplet dataset "
                                "folder; absolute or relative to ComfyUI's output folder."),
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
    def execute(cls, dataset_folder, start, count) -> io.NodeOutput:
        folder = _paths.dataset_folder(dataset_folder, "dataset_folder")
        source, mask, target, records = _triplets.preview(folder, start, count)
        return io.NodeOutput(source, mask, target, json.dumps(records))


NODES = [Syn4RemovalDataset, PreviewTripletDataset]
