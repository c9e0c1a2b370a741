"""Run inside the fresh-install venv (scripts/fresh_venv.sh) by test_fresh_install.py: loads ComfyUI with EraseKit in
custom_nodes, as a user's fresh install has them, runs the given workflows and the optional features' entry
points, and prints one JSON report on the last line of stdout.

    python fresh_install_check.py WORKDIR [WORKFLOW.json ...]
"""
import importlib
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def register_checkout_as_erasekit():
    """The harness drives ComfyUI through the pack's own headless runtime (``erasekit.headless``). A fresh install
    has the pack in custom_nodes only, not pip-installed, so the checkout is registered as ``erasekit`` for the
    harness here; ComfyUI still loads the pack from custom_nodes under its folder name (relative imports only,
    tests/test_layers.py)."""
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    from _pack import import_checkout

    import_checkout(root)


register_checkout_as_erasekit()
from harness import ComfyHarness, find_comfyui  # noqa: E402


def _outcome(call):
    """"ok", or the exception's type and message."""
    try:
        call()
        return "ok"
    except Exception as error:  # the report says what happened; the test judges it
        traceback.print_exc(file=sys.stderr)
        return f"{type(error).__name__}: {error}"


def optional_features(pack, workdir):
    """The entry point of each optional feature, called where its package is missing."""
    instances = importlib.import_module(pack + ".dataset_tools.instances")
    segmenters = importlib.import_module(pack + ".dataset_tools.segmenters")
    coco = workdir / "tiny_coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                                 "segmentation": [[0, 0, 3, 0, 3, 3]], "bbox": [0, 0, 3, 3]}],
                                "categories": [{"id": 1, "name": "thing"}]}))
    import torch
    from safetensors.torch import save_file

    checkpoint = workdir / "sam_vit_tiny.safetensors"  # keys of a segment-anything checkpoint, not SAM 2
    save_file({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, str(checkpoint))
    return {
        "pycocotools": _outcome(lambda: instances.coco_instances(coco, workdir)),
        "segment-anything": _outcome(lambda: segmenters.load_sam(checkpoint)),
    }


def run_workflow(harness, path):
    """The workflow at its defaults, making one sample where it would make several (the defaults are what is
    under test here; tests/comfy/test_workflows.py runs the whole graphs)."""
    prompt = harness.workflow_prompt(json.loads(Path(path).read_text()), caps={"steps": 3})
    for entry in prompt.values():
        if entry["inputs"].get("num_samples"):
            entry["inputs"]["num_samples"] = 1
    harness.run_prompt(prompt)


def main(workdir, workflows):
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        raise SystemExit(reason)
    harness = ComfyHarness(comfy_path, workdir).start()
    pack = harness.pack_module()
    report = {
        "load_warnings": harness.load_warnings,
        "registered": harness.pack_node_names(),
        "declared": sorted(node.define_schema().node_id for node in pack.nodes.all_nodes()),
        "workflows": {Path(p).stem: _outcome(lambda p=p: run_workflow(harness, p)) for p in workflows},
        "extras": optional_features(pack.__name__, workdir),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
