"""A real ComfyUI, imported in-process on CPU, with EraseKit loaded as a custom node folder.

One harness per test session (ComfyUI keeps global state). It owns temporary model, input and output
folders, builds tiny models on demand from the builders in ``tiny/*.py`` and runs prompts through
ComfyUI's own validator and executor.
"""
import asyncio
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER_NAME = "ComfyUI-EraseKit"  # a folder name with a dash: the pack must not care what it is called
TINY_DIR = Path(__file__).resolve().parent / "tiny"

# Models folders every workflow may name; the pack registers its own at import.
CORE_MODEL_FOLDERS = ("checkpoints", "diffusion_models", "vae", "text_encoders", "loras", "clip_vision",
                      "controlnet", "upscale_models", "embeddings")


SHARED_COMFYUI = Path(os.environ.get("ERASEKIT_SHARED_COMFYUI",
                                     PACK_ROOT.parent / "shared" / "comfyui" / "ComfyUI"))
CACHE_DIR = Path(os.environ.get("ERASEKIT_CACHE", Path.home() / ".cache" / "erasekit"))


def is_comfyui(path):
    return path is not None and (Path(path) / "main.py").is_file() and (Path(path) / "comfy").is_dir()


def find_comfyui():
    """The ComfyUI checkout to test against, or (None, reason): ``COMFYUI_PATH``, else ``~/ComfyUI``, else a
    writable copy of the shared ComfyUI 0.3.64 snapshot (``../shared/comfyui/ComfyUI``, read-only where CI runs)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if is_comfyui(env):
            return Path(env), None
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (it needs main.py and comfy/)"
    home = Path.home() / "ComfyUI"
    if is_comfyui(home):
        return home, None
    if is_comfyui(SHARED_COMFYUI):
        return writable_copy(SHARED_COMFYUI), None
    return None, (f"no ComfyUI: set COMFYUI_PATH, keep a checkout at ~/ComfyUI, or provide the shared snapshot at "
                  f"{SHARED_COMFYUI}")


def tree_fingerprint(root):
    """Hash of every file's path, size and mtime under ``root``: changes whenever the tree does."""
    digest = hashlib.sha1()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def writable_copy(source):
    """A writable copy of the ComfyUI at ``source`` in the cache, made once and made again when ``source`` changes.

    ComfyUI writes into its own input/, output/, user/ and custom_nodes/ folders, and the shared snapshot is
    read-only. The copy is built beside its final place and renamed into it, so concurrent test processes
    (pytest-xdist workers, two checkouts) never see a half-made copy."""
    parent = CACHE_DIR / "comfyui"
    target = parent / tree_fingerprint(source)
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


class _Server:
    """The few attributes of ComfyUI's PromptServer that the executor touches."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


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
        self._object_info = None

    # ---------------------------------------------------------------- start-up
    def start(self):
        if str(self.comfy_path) not in sys.path:
            sys.path.insert(0, str(self.comfy_path))
        argv = sys.argv
        sys.argv = [argv[0], "--cpu", "--disable-all-custom-nodes"]
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses --cpu now, before model_management picks a device)
        finally:
            sys.argv = argv
        import folder_paths
        import nodes

        for d in (self.models_dir, self.input_dir, self.output_dir, self.custom_nodes_dir, self.workdir / "temp"):
            d.mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(str(self.input_dir))
        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_temp_directory(str(self.workdir / "temp"))
        folder_paths.models_dir = str(self.models_dir)
        self._use_temp_model_folders(CORE_MODEL_FOLDERS)

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self._load_pack()
        self._use_temp_model_folders(folder_paths.folder_names_and_paths.keys())
        self._copy_inputs()
        return self

    def _use_temp_model_folders(self, names):
        import folder_paths
        for name in list(names):
            if name in ("custom_nodes", "configs"):
                continue
            path = self.models_dir / name
            path.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(name, str(path), is_default=True)

    def _load_pack(self):
        import nodes
        link = self.custom_nodes_dir / PACK_FOLDER_NAME
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        capture = _LogCapture()
        root = logging.getLogger()
        root.addHandler(capture)
        try:
            ok = asyncio.run(nodes.load_custom_node(str(link), set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes"))
        finally:
            root.removeHandler(capture)
        self.load_warnings = [f"{r.levelname}: {r.getMessage()}" for r in capture.records]
        if not ok:
            raise RuntimeError("ComfyUI could not load EraseKit: " + "; ".join(self.load_warnings))

    @property
    def shared_data(self):
        """../shared/data (real images and videos made by others), or None when it is absent."""
        path = Path(os.environ.get("ERASEKIT_SHARED_DATA", PACK_ROOT.parent / "shared" / "data"))
        return path if path.is_dir() else None

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
        if self._object_info is None:
            import nodes
            from comfy_api.internal import _ComfyNodeInternal
            info = {}
            for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
                if issubclass(cls, _ComfyNodeInternal):
                    info[name] = cls.GET_NODE_INFO_V1()
                else:
                    types = cls.INPUT_TYPES()
                    info[name] = {"input": types, "input_order": {k: list(v) for k, v in types.items()},
                                  "output": cls.RETURN_TYPES, "name": name,
                                  "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes")}
            self._object_info = info
        return self._object_info

    def pack_module(self):
        """EraseKit's package object as ComfyUI imported it."""
        link = self.custom_nodes_dir / PACK_FOLDER_NAME
        return sys.modules[str(link).replace(".", "_x_")]

    def node_class(self, name):
        import nodes
        return nodes.NODE_CLASS_MAPPINGS[name]

    def pack_node_names(self):
        return sorted(n for n, i in self.object_info.items() if i["python_module"].endswith(PACK_FOLDER_NAME))

    # ---------------------------------------------------------------- running
    def run_prompt(self, prompt):
        """Validate and execute an API-format prompt; returns a PromptResult. Raises on any error."""
        import execution
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise PromptError(f"invalid prompt: {error}; node errors: {node_errors}")
        server = _Server()
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
        executor.execute(prompt, prompt_id, {}, outputs)
        if not executor.success:
            failures = [d for e, d in executor.status_messages if e == "execution_error"]
            detail = failures[0] if failures else {}
            raise PromptError(
                f"{detail.get('node_type')} (node {detail.get('node_id')}) failed: {detail.get('exception_type')}: "
                f"{detail.get('exception_message')}\n" + "".join(detail.get("traceback", [])),
                exception_message=detail.get("exception_message", ""))
        return PromptResult(executor, outputs)

    def workflow_prompt(self, workflow, caps=None):
        """The API prompt for a UI-format workflow, after building the tiny models it names.

        ``caps`` (input name → largest value; see ``COST_CAPS``) lowers the cost inputs of every node: the
        example workflows keep the papers' values (28 or 50 steps, 1024 px, accumulation 8, ...), which cost
        minutes per workflow on a CPU and prove nothing more about the graph than small ones do."""
        from workflow_to_prompt import workflow_to_prompt, model_files
        for folder, filename in model_files(workflow, self.object_info):
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
        prompt = self.workflow_prompt(workflow, caps)
        result = self.run_prompt(prompt)
        result.prompt = prompt
        return result


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


class PromptError(RuntimeError):
    def __init__(self, message, exception_message=""):
        super().__init__(message)
        self.exception_message = exception_message


class PromptResult:
    def __init__(self, executor, output_nodes):
        self.executor = executor
        self.output_nodes = output_nodes
        self.ui = executor.history_result["outputs"]

    def outputs(self, node_id):
        """The values a node returned, one per output slot (first item of each output list)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached outputs")
        values = entry.outputs if hasattr(entry, "outputs") else entry
        return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
