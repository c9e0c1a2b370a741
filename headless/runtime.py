"""A real ComfyUI in this process, without its server or browser: start-up, this pack, model folders, prompts.

ComfyUI keeps global state (parsed arguments, model folders, registered nodes, loaded models), so a process
holds one ComfyUI: ``start`` imports it once and later calls get the same ``Runtime``. Start-up follows
ComfyUI's own ``main.py``: its arguments are parsed before any ``comfy`` module is imported (that is when
``comfy.model_management`` picks the device, so ``--cpu`` is added only when torch sees no GPU), its
``extra_model_paths.yaml`` and ``--extra-model-paths-config`` files add model folders, the core and
``comfy_extras`` nodes are registered, and EraseKit is loaded as the custom node folder it is.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path

from ..jobs import Interrupted, UsageError

PACK_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("erasekit.headless")


class PromptError(RuntimeError):
    """ComfyUI refused or failed a prompt; ``exception_message`` is the node's own message (or the validator's)."""

    def __init__(self, message, node_id=None, node_type=None, exception_message=None):
        super().__init__(message)
        self.node_id, self.node_type = node_id, node_type
        self.exception_message = message if exception_message is None else exception_message


class PromptInvalid(PromptError, UsageError):
    """ComfyUI's validator refused the prompt (missing model file, unknown node, bad value): no item can run."""


class PromptFailed(PromptError):
    """A node raised while the prompt ran; ``node_type`` / ``node_id`` / ``exception_message`` say which and why."""


def is_comfyui(path):
    return path is not None and (Path(path) / "main.py").is_file() and (Path(path) / "comfy").is_dir()


def find_comfyui(path=None):
    """The ComfyUI checkout to use: ``path`` (``--comfyui``), else ``COMFYUI_PATH``, else ``~/ComfyUI``."""
    candidates = [("--comfyui", path), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH")),
                  ("~/ComfyUI", Path.home() / "ComfyUI")]
    for source, candidate in candidates:
        if not candidate:
            continue
        if is_comfyui(candidate):
            return Path(candidate).resolve()
        if source != "~/ComfyUI":
            raise UsageError(f"{source} {candidate} is not a ComfyUI checkout (it needs main.py and comfy/)")
    raise UsageError("no ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH to your ComfyUI folder "
                     "(the one holding main.py, comfy/ and models/)")


def gpu_present():
    """True when torch sees an accelerator ComfyUI can use (CUDA/ROCm, Apple MPS or Intel XPU)."""
    import torch

    if torch.cuda.is_available():
        return True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


class _Server:
    """The few attributes of ComfyUI's PromptServer that the executor touches; messages are kept."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass


class Execution:
    """One prompt's outcome: the executor (its caches hold every node's outputs) and what ComfyUI reported."""

    def __init__(self, executor, output_nodes):
        self.executor = executor
        self.output_nodes = output_nodes
        self.ui = executor.history_result["outputs"]
        cached = [d for e, d in executor.status_messages if e == "execution_cached"]
        self.cached_nodes = set(cached[0]["nodes"]) if cached else set()

    def outputs(self, node_id):
        """The values a node returned, one per output slot (first item of each output list)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached outputs")
        values = entry.outputs if hasattr(entry, "outputs") else entry
        return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]

    def saved_files(self, node_id):
        """Paths of the files a save node (SaveImage) wrote, in its output order."""
        import folder_paths

        found = []
        for item in (self.ui.get(str(node_id)) or {}).get("images", []):
            base = {"output": folder_paths.get_output_directory(), "temp": folder_paths.get_temp_directory(),
                    "input": folder_paths.get_input_directory()}[item.get("type", "output")]
            found.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return found


class Runtime:
    """The started ComfyUI: node schemas, model look-ups and prompt execution."""

    def __init__(self, comfy_path, pack_module, load_messages):
        self.comfy_path = comfy_path
        self.pack_module = pack_module
        self.load_messages = load_messages
        self._object_info = None

    # ---------------------------------------------------------------- nodes
    @property
    def object_info(self):
        """What ``GET /object_info`` returns, for every registered node."""
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
                                  "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                                  "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes")}
            self._object_info = info
        return self._object_info

    # ---------------------------------------------------------------- models
    @staticmethod
    def find_model(folder, filename):
        """Full path of a model file in ComfyUI's model folder ``folder``, or None."""
        import folder_paths

        folder = folder_paths.map_legacy(folder)
        if folder not in folder_paths.folder_names_and_paths:
            return None
        return folder_paths.get_full_path(folder, filename)

    @staticmethod
    def add_model_paths(config):
        """Model folders from a file in ComfyUI's ``extra_model_paths.yaml`` format."""
        if not Path(config).is_file():
            raise UsageError(f"extra model paths file {config} does not exist")
        _EXTRA_CONFIG.load_extra_path_config(str(config))

    # ---------------------------------------------------------------- running
    @staticmethod
    def new_executor():
        """A ComfyUI PromptExecutor with the classic cache: a node whose inputs did not change since the previous
        prompt on the same executor (a model loader) keeps its outputs instead of running again."""
        import execution

        return execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)

    def validate(self, prompt):
        """ComfyUI's validation of an API prompt; returns the output node ids or raises ``PromptInvalid``."""
        import execution

        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid:
            raise PromptInvalid(describe_validation(prompt, error, node_errors))
        return outputs

    def run(self, prompt, executor=None, output_nodes=None):
        """Validate and execute an API prompt (on ``executor``, or a fresh one); raises on any failure."""
        if output_nodes is None:
            output_nodes = self.validate(prompt)
        executor = executor or self.new_executor()
        executor.execute(prompt, str(uuid.uuid4()), {}, output_nodes)
        if not executor.success:
            failures = [d for e, d in executor.status_messages if e == "execution_error"]
            detail = failures[0] if failures else {}
            interrupted = [d for e, d in executor.status_messages if e == "execution_interrupted"]
            if interrupted:
                raise Interrupted("ComfyUI's execution was interrupted")
            raise PromptFailed(
                f"{detail.get('node_type')} (node {detail.get('node_id')}) failed: {detail.get('exception_type')}: "
                f"{detail.get('exception_message')}\n" + "".join(detail.get("traceback", [])),
                node_id=detail.get("node_id"), node_type=detail.get("node_type"),
                exception_message=detail.get("exception_message", ""))
        return Execution(executor, output_nodes)


def describe_validation(prompt, error, node_errors):
    """One readable paragraph from ComfyUI's validation result."""
    lines = [error.get("message", "invalid prompt") if isinstance(error, dict) else str(error)]
    if isinstance(error, dict) and error.get("details"):
        lines[0] += f" ({error['details']})"
    for node_id, found in (node_errors or {}).items():
        kind = prompt.get(node_id, {}).get("class_type", "?")
        for item in found.get("errors", []):
            lines.append(f"node {node_id} ({kind}): {item.get('message')}: {item.get('details')}")
    return "; ".join(lines)


def parse_comfy_args(comfy_path, args=(), cpu=None):
    """Put the ComfyUI at ``comfy_path`` first on ``sys.path`` and parse its command-line ``args`` now, as its
    ``main.py`` does before any other ``comfy`` module is imported (``comfy.model_management`` picks the device from
    them); ``sys.argv`` is restored. ``cpu``: add ``--cpu`` (None: only when torch sees no GPU)."""
    comfy_path = str(Path(comfy_path).resolve())
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    args = list(args)
    if (cpu if cpu is not None else not gpu_present()) and "--cpu" not in args:
        args.insert(0, "--cpu")
    argv = sys.argv
    sys.argv = [argv[0] if argv else "erasekit", *args]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the arguments now, before model_management picks a device)
    finally:
        sys.argv = argv


_RUNTIME = None
_EXTRA_CONFIG = None  # ComfyUI's utils.extra_config: imported before its nodes, which shadow the name 'utils'


def start(comfy_path, comfy_args=(), extra_model_paths=(), custom_nodes=False, pack_path=None, cpu=None,
          comfyui_extra_paths=True):
    """Import ComfyUI from ``comfy_path`` into this process (once) with this pack loaded; returns the ``Runtime``.

    ``comfy_args``: ComfyUI command-line arguments (``--lowvram``, ``--base-directory D``, ...). ``cpu``: None = add
    ``--cpu`` only when torch sees no GPU. ``extra_model_paths``: files in ComfyUI's extra_model_paths.yaml format.
    ``custom_nodes``: also load the custom nodes installed in that ComfyUI (a workflow may need them).
    ``pack_path``: the EraseKit folder to load (default: this package's own). ``comfyui_extra_paths``: read the
    ComfyUI folder's own extra_model_paths.yaml, as ComfyUI does."""
    global _RUNTIME, _EXTRA_CONFIG
    comfy_path = Path(comfy_path).resolve()
    if _RUNTIME is not None:
        if _RUNTIME.comfy_path != comfy_path:
            raise UsageError(f"this process already runs the ComfyUI at {_RUNTIME.comfy_path}; one ComfyUI per "
                             f"process (asked for {comfy_path})")
        for config in extra_model_paths:
            _RUNTIME.add_model_paths(config)
        return _RUNTIME
    if not is_comfyui(comfy_path):
        raise UsageError(f"{comfy_path} is not a ComfyUI checkout (it needs main.py and comfy/)")
    args = list(comfy_args)
    if not custom_nodes and "--disable-all-custom-nodes" not in args:
        args.append("--disable-all-custom-nodes")
    parse_comfy_args(comfy_path, args, cpu)
    import utils.extra_config

    _EXTRA_CONFIG = utils.extra_config
    import folder_paths
    import nodes
    from comfy.cli_args import args as parsed

    own_config = comfy_path / "extra_model_paths.yaml"
    if comfyui_extra_paths and own_config.is_file():
        Runtime.add_model_paths(own_config)
    for config in [*(c for group in (parsed.extra_model_paths_config or []) for c in group), *extra_model_paths]:
        Runtime.add_model_paths(config)
    for setter, value in ((folder_paths.set_output_directory, parsed.output_directory),
                          (folder_paths.set_input_directory, parsed.input_directory),
                          (folder_paths.set_user_directory, parsed.user_directory)):
        if value:
            setter(os.path.abspath(value))

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
    pack_module, messages = _load_pack(Path(pack_path or PACK_ROOT))
    _RUNTIME = Runtime(comfy_path, pack_module, messages)
    return _RUNTIME


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _load_pack(folder):
    """Load EraseKit from ``folder`` through ComfyUI's own custom-node loader; returns (module, warnings).

    When the ComfyUI's custom_nodes folder already gave us EraseKit's nodes (``custom_nodes=True``), that copy
    stays and this one is not loaded twice."""
    import nodes

    if any(name.startswith("EraseKit") for name in nodes.NODE_CLASS_MAPPINGS):
        log.info("EraseKit's nodes are already registered (from ComfyUI's custom_nodes folder); using that copy")
        return None, []
    capture = _LogCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        ok = asyncio.run(nodes.load_custom_node(str(folder), set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes"))
    finally:
        root.removeHandler(capture)
    messages = [f"{r.levelname}: {r.getMessage()}" for r in capture.records]
    if not ok:
        raise RuntimeError(f"ComfyUI could not load EraseKit from {folder}: " + "; ".join(messages))
    return sys.modules[str(folder).replace(".", "_x_")], messages
