"""A real ComfyUI, imported in-process on CPU, with EraseKit loaded as a custom node folder.

One harness per test session (ComfyUI keeps global state). Start-up, the workflow converter and prompt
execution are the package's own (``erasekit.headless``, what ``erasekit-run`` uses); this file adds what only
tests need: where the ComfyUI comes from, temporary model/input/output folders, tiny models built on demand
from the builders in ``tiny/*.py``, and the caps on the example workflows' cost inputs.
"""
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Only the standard library at import time: tests/conftest.py reads the paths below before it puts this checkout
# first on sys.path as ``erasekit``; the package is imported when a function (or ``PromptError``) is first used.
PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER_NAME = "ComfyUI-EraseKit"  # a folder name with a dash: the pack must not care what it is called
TINY_DIR = Path(__file__).resolve().parent / "tiny"

SHARED_DATA = Path(os.environ.get("ERASEKIT_SHARED_DATA", PACK_ROOT.parent / "shared" / "data"))
SHARED_COMFYUI = Path(os.environ.get("ERASEKIT_SHARED_COMFYUI",
                                     PACK_ROOT.parent / "shared" / "comfyui" / "ComfyUI"))
CACHE_DIR = Path(os.environ.get("ERASEKIT_CACHE", Path.home() / ".cache" / "erasekit"))


def __getattr__(name):
    if name == "PromptError":  # tests import PromptError from here
        from erasekit.headless.runtime import PromptError
        return PromptError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def comfyui_source():
    """The ComfyUI tree to use, or (None, reason): ``runtime.find_comfyui``'s (``COMFYUI_PATH``, else ``~/ComfyUI``),
    else the shared ComfyUI 0.3.64 snapshot (``../shared/comfyui/ComfyUI``, read-only where CI runs) itself."""
    from erasekit.headless import runtime
    from erasekit.jobs import UsageError

    try:
        return runtime.find_comfyui(), None
    except UsageError as error:
        if os.environ.get("COMFYUI_PATH"):  # set but wrong: say so rather than test another ComfyUI
            return None, str(error)
    if runtime.is_comfyui(SHARED_COMFYUI):
        return SHARED_COMFYUI, None
    return None, (f"no ComfyUI: set COMFYUI_PATH, keep a checkout at ~/ComfyUI, or provide the shared snapshot at "
                  f"{SHARED_COMFYUI}")


@functools.cache
def find_comfyui():
    """The ComfyUI checkout to test against, or (None, reason): ``comfyui_source()``, the shared snapshot replaced
    by a writable copy of it."""
    path, reason = comfyui_source()
    if path == SHARED_COMFYUI:
        return writable_copy(SHARED_COMFYUI), None
    return path, reason


def writable_copy(source):
    """A writable copy of the ComfyUI at ``source`` in the cache, made once and made again when ``source`` changes.

    ComfyUI writes into its own input/, output/, user/ and custom_nodes/ folders, and the shared snapshot is
    read-only. The copy is built beside its final place and renamed into it, so concurrent test processes
    (pytest-xdist workers, two checkouts) never see a half-made copy."""
    from erasekit.headless.runtime import is_comfyui
    from erasekit.jobs import fingerprint

    parent = CACHE_DIR / "comfyui"
    target = parent / fingerprint(source)
    comfy = target / "ComfyUI"
    if is_comfyui(comfy):
        return comfy
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=parent))
    shutil.copytree(source, staging / "ComfyUI", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for folder, dirs, files in os.walk(staging):
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o200)
    for name in ("input", "output", "custom_nodes", "user"):
        (staging / "ComfyUI" / name).mkdir(exist_ok=True)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    for old in parent.iterdir():  # copies of snapshots that have since changed
        if old != target and not old.name.startswith(".copy-"):
            shutil.rmtree(old, ignore_errors=True)
    return comfy


def load_tiny_builders():
    builders = {}
    for path in sorted(TINY_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"erasekit_tiny_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        for key, build in getattr(module, "MODELS", {}).items():
            if key in builders:
                raise RuntimeError(f"two tiny builders for {key}: {builders[key].__module__} and {path.name}")
            builders[key] = build
    return builders


class ComfyHarness:
    def __init__(self, comfy_path: Path, workdir: Path):
        self.comfy_path = comfy_path
        self.workdir = workdir
        self.models_dir = workdir / "models"
        self.input_dir = workdir / "input"
        self.output_dir = workdir / "output"
        self.custom_nodes_dir = workdir / "custom_nodes"
        self.load_warnings = []
        self._builders = None
        self.runtime = None

    # ---------------------------------------------------------------- start-up
    def start(self):
        """ComfyUI through the package's own start-up (``erasekit.headless.runtime``), with every folder under
        ``workdir`` (ComfyUI's ``--base-directory``), on CPU, without the checkout's extra_model_paths.yaml."""
        from erasekit.headless import runtime

        for d in (self.models_dir, self.input_dir, self.output_dir, self.custom_nodes_dir, self.workdir / "temp"):
            d.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes_dir / PACK_FOLDER_NAME
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        self.runtime = runtime.start(self.comfy_path, comfy_args=["--base-directory", str(self.workdir)], cpu=True,
                                     pack_path=link, comfyui_extra_paths=False)
        self.load_warnings = list(self.runtime.load_messages)
        self._use_temp_model_folders()
        self._copy_inputs()
        return self

    def _use_temp_model_folders(self):
        """Every model folder (core and the pack's) exists under ``models_dir`` and is searched first."""
        import folder_paths
        for name in list(folder_paths.folder_names_and_paths):
            if name in ("custom_nodes", "configs"):
                continue
            path = self.models_dir / name
            path.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(name, str(path), is_default=True)

    def extra_model_paths_file(self, path, custom_nodes=None):
        """This harness's model folders in ComfyUI's extra_model_paths.yaml format, for a ComfyUI in a subprocess
        (``custom_nodes``: a folder of test-only custom nodes to offer it as well)."""
        import folder_paths
        lines = ["erasekit_test_models:", f"  base_path: {self.models_dir}", "  is_default: true"]
        for name in sorted(folder_paths.folder_names_and_paths):
            if name not in ("custom_nodes", "configs") and (self.models_dir / name).is_dir():
                lines.append(f"  {name}: {name}")
        if custom_nodes is not None:
            lines += ["erasekit_test_custom_nodes:", f"  custom_nodes: {custom_nodes}"]
        Path(path).write_text("\n".join(lines) + "\n")
        return Path(path)

    @property
    def shared_data(self):
        """../shared/data (real images and videos made by others), or None when it is absent."""
        return SHARED_DATA if SHARED_DATA.is_dir() else None

    def _copy_inputs(self):
        """Real data (../shared/data) that example workflows name, in ComfyUI's input folder: the images of
        ``images/masked`` and ``images/removal_pairs`` at the top (as LoadImage lists them), every image
        folder as a sub-folder (for folder inputs) and the videos at the top."""
        shared = self.shared_data
        if shared is None:
            return
        images, videos = shared / "images", shared / "video"
        for sub in ("masked", "removal_pairs"):
            for f in sorted((images / sub).glob("*")) if (images / sub).is_dir() else []:
                shutil.copyfile(f, self.input_dir / f.name)
        if images.is_dir():
            for sub in sorted(p for p in images.iterdir() if p.is_dir()):
                shutil.copytree(sub, self.input_dir / sub.name, dirs_exist_ok=True)
        for f in sorted(videos.glob("*")) if videos.is_dir() else []:
            shutil.copyfile(f, self.input_dir / f.name)

    # ---------------------------------------------------------------- models
    @property
    def builders(self):
        if self._builders is None:
            self._builders = load_tiny_builders()
        return self._builders

    def ensure_model(self, folder, filename):
        """Write the tiny model registered for (folder, filename) unless it is there; returns its path."""
        import folder_paths
        folder = folder_paths.map_legacy(folder) if hasattr(folder_paths, "map_legacy") else folder
        target = self.models_dir / folder / filename
        if target.exists():
            return target
        build = self.builders.get((folder, filename))
        if build is None:
            raise KeyError(f"no tiny model builder for {folder}/{filename}; add one to tests/comfy/tiny/")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        build(tmp)
        os.replace(tmp, target)
        return target

    # ---------------------------------------------------------------- node info
    @property
    def object_info(self):
        """What GET /object_info returns, for every registered node."""
        return self.runtime.object_info

    def pack_module(self):
        """EraseKit's package object as ComfyUI imported it."""
        return self.runtime.pack_module

    def node_class(self, name):
        import nodes
        return nodes.NODE_CLASS_MAPPINGS[name]

    def pack_node_names(self):
        return sorted(n for n, i in self.object_info.items() if i["python_module"].endswith(PACK_FOLDER_NAME))

    # ---------------------------------------------------------------- running
    def run_prompt(self, prompt):
        """Validate and execute an API-format prompt on a fresh executor (no cache shared between tests);
        returns the ``Execution``. Raises ``PromptError`` on any error."""
        return self.runtime.run(prompt)

    def workflow_prompt(self, workflow, caps=None):
        """The API prompt for a UI-format workflow, after building the tiny models it names.

        ``caps`` (input name → largest value; see ``COST_CAPS``) lowers the cost inputs of every node: the
        example workflows keep the papers' values (28 or 50 steps, 1024 px, accumulation 8, ...), which cost
        minutes per workflow on a CPU and prove nothing more about the graph than small ones do."""
        from erasekit.headless.workflow import model_files, workflow_to_prompt
        for folder, filename in model_files(workflow):
            self.ensure_model(folder, filename)
        prompt = workflow_to_prompt(workflow, self.object_info)
        caps = caps or {}
        for entry in prompt.values():
            cap_inputs(entry["inputs"], caps)
            if "image_short_side" in caps and entry["class_type"] in IMAGE_LOADERS:
                entry["inputs"]["image"] = self.capped_input(entry["inputs"]["image"], caps["image_short_side"])
        return prompt

    def capped_input(self, name, short_side):
        """``name`` in the input folder, or a copy scaled so its short side is ``short_side`` (masks: nearest
        neighbour, so they stay binary), in ``capped<side>/``; returns the name to give LoadImage."""
        from PIL import Image
        source = self.input_dir / name
        with Image.open(source) as image:
            width, height = image.size
            if min(width, height) <= short_side:
                return name
            scale = short_side / min(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            target = self.input_dir / f"capped{short_side}" / name
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                nearest = "mask" in Path(name).stem.lower()
                image.resize(size, Image.NEAREST if nearest else Image.LANCZOS).save(target)
        return f"capped{short_side}/{name}"

    def run_workflow(self, workflow, caps=None):
        return self.run_prompt(self.workflow_prompt(workflow, caps))


# Cost inputs of nodes and their caps in workflow tests. They shrink what is under test (fewer steps, smaller
# crops, fewer samples and frames), not what it means; inputs whose 0 means "all" are capped too.
COST_CAPS = {
    "steps": 3,  # sampler and trainer steps (papers: 28, 50, 1000)
    "grad_accumulation": 1, "grad_accum": 1,  # micro-batches per optimizer step (OmniEraser: 8)
    "crop_variants": 1,  # cached random crops per training pair
    "resolution": 128,  # training crop side (OmniEraser 1024)
    "target_side": 256,  # working side of Crop Around Mask (OmniEraser 1024, SmartEraser 512)
    "short_side": 256,  # working short side of the whole-image preset (OmniEraser demo: 1024)
    "num_samples": 2,  # Syn4Removal samples
    "size": 256,  # Syn4Removal sample side (official 512)
    "max_pairs": 2, "preview_count": 2, "count": 2,
    "frame_count": 8, "max_frames": 120, "end_frame": 120,  # video frames read
    "image_short_side": 256,  # photos given to LoadImage / LoadImageMask are scaled down to this short side
}
IMAGE_LOADERS = {"LoadImage", "LoadImageMask"}
ZERO_MEANS_ALL = {"max_frames", "end_frame", "num_samples"}


def cap_inputs(inputs, caps):
    """Lower every int input named in ``caps`` to its cap, in place (links and other types are left alone)."""
    for name, cap in caps.items():
        value = inputs.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            if value > cap or (value == 0 and name in ZERO_MEANS_ALL):
                inputs[name] = cap


# The example workflows' working-size inputs at 64 px: a small crop, so a FLUX graph samples in seconds.
SMALL = {"EraseKitCropAroundMask": {"target_side": 64}, "EraseKitWholeImageAtWorkingSize": {"short_side": 64}}


def small_prompt(comfy, name, max_steps):
    """The workflow's API prompt with a 64 px working size and at most ``max_steps`` steps; also the crop node's id."""
    import pytest

    if comfy.shared_data is None:
        pytest.skip("the example workflows load real images from ../shared/data, which is absent")
    workflow = json.loads((PACK_ROOT / "workflows" / f"{name}.json").read_text())
    prompt = comfy.workflow_prompt(workflow, caps={"steps": max_steps})
    crop_id = next(k for k, v in prompt.items() if v["class_type"] in SMALL)
    prompt[crop_id]["inputs"].update(SMALL[prompt[crop_id]["class_type"]])
    return prompt, crop_id


class SamplerSpy:
    """What every sampler received: sigmas, the latent's shape, the T5 length of each conditioning. With
    ``stop`` set it ends the run there (the graph after the sampler is then not under test)."""

    STOPPED = "sampler inputs recorded; stopped by the test"

    def __init__(self):
        self.calls, self.stop = [], False

    def sample(self, original):
        """A stand-in for ``KSAMPLER.sample`` that records its inputs, then runs ``original``."""
        def sample(sampler, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs):
            tokens = {name: [c["cross_attn"].shape[1] for c in conds if "cross_attn" in c]
                      for name, conds in getattr(model_wrap, "conds", {}).items()}
            self.calls.append({"sigmas": sigmas.detach().cpu().clone(), "latent": tuple(noise.shape),
                               "tokens": tokens})
            if self.stop:
                raise RuntimeError(SamplerSpy.STOPPED)
            return original(sampler, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs)

        return sample
